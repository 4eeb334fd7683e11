"""Recipe validation: every shipped recipe validates; each bad recipe gets its message; overrides are
typed."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from aaekit.errors import RecipeError, UserError
from aaekit.plugins import get_registry
from aaekit.recipe import dump_toml, load_recipe, validate
from conftest import ROOT, aaekit

SHIPPED = sorted((ROOT / "recipes").glob("*.toml"))

GOOD = """
[run]
name = "t"
[data]
name = "mnist"
[encoder]
name = "deterministic"
[codes.z]
dim = 2
[codes.z.prior]
name = "gaussian"
"""


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe):
    resolved = load_recipe(recipe)
    assert resolved.values["run"]["name"]
    # the resolved recipe written into a run directory reads back to the same values
    again, problems = validate(tomllib.loads(dump_toml(resolved.values)), get_registry())
    assert problems == [] and again == resolved.values


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


BAD = [
    # (change applied to GOOD, expected fragments of one error line)
    ("[trian]\nepochs = 3\n", ["trian: unknown table", "did you mean 'train'"]),
    ("[train]\nepoch = 3\n", ["train.epoch: unknown key", "did you mean 'epochs'"]),
    ('[train]\nepochs = "ten"\n', ["train.epochs: expected an integer", "'ten'"]),
    ("[train]\nepochs = 0\n", ["train.epochs: expected an integer >= 1", "got 0"]),
    ("[train]\nbatch_size = 2.5\n", ["train.batch_size: expected an integer"]),
    ('[run]\nmixed_precision = "bf61"\n', ["run.mixed_precision", "did you mean 'bf16'"]),
    ("[optim.reconstruction]\nlr = -1\n", ["optim.reconstruction.lr: expected a number >= 0"]),
    ("[optim.recon]\nlr = 1\n", ["optim.recon: unknown phase", "reconstruction"]),
    ("[encoder.extra]\n", []),  # handled below: encoder is already a table; TOML error
]


@pytest.mark.parametrize("change,expected", [b for b in BAD if b[1]], ids=lambda v: str(v)[:30])
def test_bad_recipe_messages(tmp_path, change, expected):
    text = GOOD.replace('[run]\nname = "t"\n', "") if change.startswith("[run]") else GOOD
    if change.startswith("[run]"):
        text = change + 'name = "t"\n' + text
    else:
        text += change
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    lines = info.value.problems
    assert any(all(fragment in line for fragment in expected) for line in lines), lines
    assert all(line.startswith(str(path)) for line in lines)


def test_every_problem_is_reported_at_once(tmp_path):
    text = (
        GOOD.replace('name = "gaussian"', 'name = "gausian"\nstd = 1') + "[train]\nepochs = -1\nbogus = 1\n"
    )
    text = text.replace('name = "deterministic"', 'name = "deterministik"\nhidden = []')
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    joined = "\n".join(info.value.problems)
    for fragment in [
        "codes.z.prior.name: unknown prior 'gausian' (did you mean 'gaussian'?); available:",
        "encoder.name: unknown posterior 'deterministik' (did you mean 'deterministic'?)",
        "train.epochs:",
        "train.bogus: unknown key",
    ]:
        assert fragment in joined, joined
    assert len(info.value.problems) >= 4


def test_component_parameters_are_checked_against_declarations(tmp_path):
    text = GOOD.replace('name = "gaussian"', 'name = "gmm"\ncomponents = 0\nsigma = 2')
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    joined = "\n".join(info.value.problems)
    assert "codes.z.prior.components: expected an integer >= 1, got 0" in joined
    assert "codes.z.prior.sigma: unknown key" in joined and "shift" in joined


def test_missing_required_parts(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, "[run]\nseed = 1\n"))
    joined = "\n".join(info.value.problems)
    assert (
        "data: missing table" in joined and "encoder: missing table" in joined and "codes: missing" in joined
    )


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="not valid TOML"):
        load_recipe(write(tmp_path, "[run\nname = 1"))
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")


def test_overrides_are_typed_like_the_recipe(tmp_path):
    path = write(tmp_path, GOOD)
    r = load_recipe(
        path,
        [
            "train.epochs=3",
            "run.name=123",
            "codes.z.prior.std=5",
            "encoder.hidden=[64, 32]",
            "data.labelled=0.5",
            "train.pictures=false",
        ],
    )
    assert r.values["train"]["epochs"] == 3
    assert r.values["run"]["name"] == "123"  # a string key stays a string
    assert r.values["codes"]["z"]["prior"]["std"] == 5.0 and isinstance(
        r.values["codes"]["z"]["prior"]["std"], float
    )
    assert r.values["encoder"]["hidden"] == [64, 32]
    assert r.values["data"]["labelled"] == 0.5
    assert r.values["train"]["pictures"] is False
    with pytest.raises(RecipeError, match="train.epochs: expected an integer"):
        load_recipe(path, ["train.epochs=many"])
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_recipe(path, ["train.epochs"])


def test_defaults_are_filled(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert r.values["train"]["batch_size"] == 100
    assert r.values["codes"]["z"]["discriminator"]["hidden"] == [1000, 1000]
    assert r.values["optim"]["generator"]["name"] == "adam"
    assert r.values["codes"]["z"]["prior"]["std"] == 1.0  # the prior's own default


def test_validate_command_reports_all_and_exits_nonzero(tmp_path):
    bad = write(tmp_path, GOOD + "[train]\nepochs = 0\nfoo = 1\n")
    out = aaekit("validate", str(ROOT / "recipes" / "gaussian.toml"), str(bad))
    assert out.returncode == 2
    assert "ok: " in out.stdout
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all(str(bad) in line for line in errors)
    assert "Traceback" not in out.stderr
