"""The CLI's surface: exit codes, no tracebacks for user mistakes, a light --help."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, aaekit, aaekit_process

import aaekit as package


def test_version_and_module_entry():
    out = aaekit_process("--version")  # the module entry point, in a real interpreter
    assert out.returncode == 0 and package.__version__ in out.stdout


def test_help_does_not_import_torch():
    code = ("import sys; from aaekit.cli import cli\n"
            "try:\n    cli.main(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            "for cmd in ('run', 'validate', 'plugins'):\n"
            "    try:\n        cli.main([cmd, '--help'], standalone_mode=False)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch imported by --help'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_user_mistakes_exit_2_without_traceback(tmp_path):
    cases = [
        ("run", str(tmp_path / "missing.toml")),
        ("run", str(ROOT / "recipes" / "gaussian.toml"), "train.epochs"),
        ("run", str(ROOT / "recipes" / "gaussian.toml"), "codes.z.prior.name=nope"),
        ("run", str(ROOT / "recipes" / "gaussian.toml"), "--plugins-dir", str(tmp_path / "no-such-dir")),
        ("validate", str(ROOT / "README.md")),
    ]
    for args in cases:
        out = aaekit(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr, (args, out.stderr)
        assert out.stderr.startswith("error:") or "Error" in out.stderr, (args, out.stderr)


def test_unknown_plugin_in_recipe_names_file_key_and_choices(tmp_path):
    out = aaekit("run", str(ROOT / "recipes" / "gaussian.toml"), "encoder.name=gausian", "--output-dir", str(tmp_path / "r"))
    assert out.returncode == 2
    assert "recipes/gaussian.toml: encoder.name: unknown posterior 'gausian' (did you mean 'gaussian'?)" in out.stderr
    assert not (tmp_path / "r").exists()


def test_missing_mnist_is_a_clear_error(tmp_path):
    out = aaekit("run", str(ROOT / "recipes" / "gaussian.toml"), f"data.path={tmp_path}", "train.max_steps=1",
                 "--output-dir", str(tmp_path / "r"))
    assert out.returncode == 2 and "data.path" in out.stderr and "idx" in out.stderr
    assert "Traceback" not in out.stderr


def test_validation_split_larger_than_the_data_is_a_clear_error(tmp_path):
    out = aaekit("run", str(ROOT / "recipes" / "gaussian.toml"), "data.limit=100", "data.validation=100",
                 "--output-dir", str(tmp_path / "r"))
    assert out.returncode == 2, out.stderr
    assert "data.validation: 100 held out of a training split of 100" in out.stderr and "Traceback" not in out.stderr
