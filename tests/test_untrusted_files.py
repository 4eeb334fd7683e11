"""Nothing aaekit loads is a pickle, and recipes are data, never executed (README): a weights file, a
checkpoint, a recipe or an override crafted to run code when unpickled or evaluated is refused with a readable
error, and its code never runs (it would create a marker file)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import aaekit
from aaekit.errors import UserError
from conftest import ROOT, tiny_run_args
from conftest import aaekit as run_cli


class Payload:
    """Unpickling this object calls open(path, "w"): it creates ``path``, as an attacker's code would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def plant(path, marker) -> None:
    """A torch checkpoint (torch.save: a pickle) of the payload, where aaekit expects a safetensors file."""
    torch.save({"encoder.trunk.0.weight": Payload(marker)}, path)


def assert_one_error_line(result, fragment: str) -> None:
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run with checkpoints at steps 2 and 4, and the arguments that trained it."""
    run_dir = tmp_path_factory.mktemp("untrusted") / "run"
    args = tiny_run_args("recipes/gaussian.toml", run_dir, "train.pictures=false", "train.checkpoint_every=2")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    return run_dir, args


def test_a_pickle_in_place_of_the_weights_is_refused_and_not_run(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished[0], run_dir)
    marker = tmp_path / "code-ran"
    plant(run_dir / "model.safetensors", marker)
    with pytest.raises(UserError, match="corrupt or unreadable safetensors.*not a pickle"):
        aaekit.load(run_dir)
    assert_one_error_line(
        run_cli("eval", str(run_dir), "-n", "10", "--test-limit", "10", "--device", "cpu"),
        "model.safetensors: corrupt or unreadable",
    )
    assert_one_error_line(
        run_cli("sample", str(run_dir), "--out", str(tmp_path / "x.png"), "--device", "cpu"),
        "model.safetensors: corrupt or unreadable",
    )
    assert not marker.exists()


def test_a_checkpoint_of_pickles_is_skipped_and_not_run(finished, tmp_path):
    """Every tensor file of the newest checkpoint replaced by a pickle, and state.json rewritten to name their
    new sizes (so that they pass the size check): resuming reports it and goes on from the checkpoint before;
    eval refuses it."""
    run_dir, args = tmp_path / "run", list(finished[1])
    shutil.copytree(finished[0], run_dir)
    args[args.index("--output-dir") + 1] = str(run_dir)
    marker = tmp_path / "code-ran"
    newest = run_dir / "checkpoints" / "step-00000004"
    state = json.loads((newest / "state.json").read_text())
    for name in state["files"]:
        plant(newest / name, marker)
        state["files"][name] = (newest / name).stat().st_size
    (newest / "state.json").write_text(json.dumps(state))

    assert_one_error_line(
        run_cli(
            "eval", str(run_dir), "--checkpoint", "4", "-n", "10", "--test-limit", "10", "--device", "cpu"
        ),
        "corrupt or unreadable safetensors",
    )
    result = run_cli(*args, "train.max_steps=6", "--resume")
    assert result.returncode == 0, result.stderr
    assert "skipping corrupt checkpoint step-00000004" in result.stdout + result.stderr
    assert "resuming from the previous good checkpoint step-00000002" in result.stdout + result.stderr
    assert max(p.name for p in (run_dir / "checkpoints").glob("step-*")) == "step-00000006"
    assert not marker.exists()


def test_a_recipe_is_data_never_code(tmp_path):
    """A recipe that is Python, and an override that is a Python expression, are refused; neither runs."""
    marker = tmp_path / "code-ran"
    code = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    for recipe in (tmp_path / "recipe.py", tmp_path / "recipe.toml"):
        recipe.write_text(code)
        assert_one_error_line(run_cli("validate", str(recipe)), "not valid TOML")
        assert_one_error_line(
            run_cli("run", str(recipe), "--output-dir", str(tmp_path / "r")), "not valid TOML"
        )

    expression = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    result = run_cli(
        "run",
        str(ROOT / "recipes" / "gaussian.toml"),
        f"train.epochs={expression}",
        "--output-dir",
        str(tmp_path / "r"),
    )
    assert_one_error_line(result, "expected an integer")
    assert "train.epochs" in result.stderr and expression in result.stderr  # quoted back as the text it is
    assert not marker.exists() and not (tmp_path / "r").exists()
