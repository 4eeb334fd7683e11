"""The CLI's surface: exit codes, no tracebacks for user mistakes, a light --help."""

from __future__ import annotations

import re
import subprocess
import sys

import aaekit as package
from conftest import ROOT, aaekit, aaekit_process


def test_version_and_module_entry():
    out = aaekit_process("--version")  # the module entry point, in a real interpreter
    assert out.returncode == 0 and package.__version__ in out.stdout


def test_help_does_not_import_torch():
    code = (
        "import sys; from aaekit.cli import cli\n"
        "try:\n    cli.main(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        "for cmd in ('run', 'validate', 'plugins'):\n"
        "    try:\n        cli.main([cmd, '--help'], standalone_mode=False)\n    except SystemExit:\n        "
        "pass\n"
        "assert 'torch' not in sys.modules, 'torch imported by --help'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


SUMMARY = re.compile(r"\d+ problem\(s\) found; nothing was run\.")


def test_user_mistakes_exit_2_without_traceback(tmp_path):
    """Each mistake: exit status 2 and, on stderr, exactly one `error: ...` line per problem, naming it (a
    recipe's problems are followed by their count), and nothing else: no traceback, no second line."""
    gaussian = str(ROOT / "recipes" / "gaussian.toml")
    cases = [
        (("run", str(tmp_path / "missing.toml")), [f"{tmp_path / 'missing.toml'}: recipe file not found"]),
        (("run", gaussian, "train.epochs"), ["override 'train.epochs': expected KEY=VALUE"]),
        (("run", gaussian, "codes.z.prior.name=nope"), ["codes.z.prior.name=nope", "unknown prior 'nope'"]),
        (
            ("run", gaussian, "--plugins-dir", str(tmp_path / "no-such-dir")),
            [f"--plugins-dir {tmp_path / 'no-such-dir'}: not a directory"],
        ),
        (("validate", str(ROOT / "README.md")), [f"{ROOT / 'README.md'}: not valid TOML"]),
        (("run", gaussian, "--resume", "--output-dir", str(tmp_path / "none")), ["holds no run to resume"]),
        (("eval", str(tmp_path / "nowhere")), [f"{tmp_path / 'nowhere'}: no such run directory"]),
        (
            ("sample", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png")),
            [f"{tmp_path / 'nowhere'}: no such run directory"],
        ),
    ]
    for args, fragments in cases:
        out = aaekit(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        lines = out.stderr.splitlines()
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1, (args, out.stderr)
        assert all(fragment in errors[0] for fragment in fragments), (args, fragments, errors[0])
        others = [line for line in lines if not line.startswith("error: ")]
        assert all(SUMMARY.fullmatch(line) for line in others) and len(others) <= 1, (args, out.stderr)
        assert "error:" not in out.stdout, (args, out.stdout)
    # two problems in one recipe: one line each, then their count
    out = aaekit("validate", gaussian, "train.epochs=0", "train.bogus=1")
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert len(lines) == 3 and SUMMARY.fullmatch(lines[2]) and lines[2].startswith("2 "), out.stderr
    assert "train.epochs=0" in lines[0] and "expected an integer >= 1" in lines[0], lines
    assert "train.bogus=1" in lines[1] and "unknown key" in lines[1], lines


def test_unknown_plugin_in_recipe_names_file_key_and_choices(tmp_path):
    out = aaekit(
        "run",
        str(ROOT / "recipes" / "gaussian.toml"),
        "encoder.name=gausian",
        "--output-dir",
        str(tmp_path / "r"),
    )
    assert out.returncode == 2
    assert (
        "command-line override 'encoder.name=gausian' (applied to " in out.stderr
        and "recipes/gaussian.toml): encoder.name: unknown posterior 'gausian' (did you mean 'gaussian'?)"
        in out.stderr
    )
    assert not (tmp_path / "r").exists()


def test_missing_mnist_is_a_clear_error(tmp_path):
    out = aaekit(
        "run",
        str(ROOT / "recipes" / "gaussian.toml"),
        f"data.path={tmp_path}",
        "train.max_steps=1",
        "--output-dir",
        str(tmp_path / "r"),
    )
    assert out.returncode == 2 and "data.path" in out.stderr and "idx" in out.stderr
    assert "Traceback" not in out.stderr


def test_validation_split_larger_than_the_data_is_a_clear_error(tmp_path):
    out = aaekit(
        "run",
        str(ROOT / "recipes" / "gaussian.toml"),
        "data.limit=100",
        "data.validation=100",
        "--output-dir",
        str(tmp_path / "r"),
    )
    assert out.returncode == 2, out.stderr
    assert (
        "data.validation: 100 held out of a training split of 100" in out.stderr
        and "Traceback" not in out.stderr
    )
