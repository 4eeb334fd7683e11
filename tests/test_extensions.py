"""The aaekit-extensions plugin (components that depart from the paper) and the engine hook it uses: a
head's encoder penalty, added in the reconstruction phase."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from test_benchmarks import script
from test_robustness import one_error, plugin_folder

from aaekit.contracts import CodeSpec
from aaekit.plugins import get_registry
from aaekit.recipe import load_recipe, read_toml, validate
from conftest import ROOT, aaekit, two_code_recipe

CODES = [CodeSpec("y", "categorical", 10), CodeSpec("z", "continuous", 2)]


def consistency_head(**params):
    cls = get_registry().get("head", "augmentation_consistency").cls
    return cls(codes=CODES, num_classes=10, input_shape=(28, 28), **params)


def centre_of_mass(images: torch.Tensor) -> torch.Tensor:
    images = images.reshape(-1, 28, 28)
    r = torch.arange(28.0)
    mass = images.sum((1, 2))
    return torch.stack([(images.sum(2) * r).sum(1) / mass, (images.sum(1) * r).sum(1) / mass], 1)


def digits(n: int) -> torch.Tensor:
    from aaekit_builtins.datasets import MNIST

    return MNIST().load("test").x[:n].float().reshape(n, 784) / 255


def test_views_warp_each_image_within_the_declared_ranges_from_the_generator_given():
    x = digits(64)
    still = consistency_head(rotation=0.0, shift=0.0, scale=0.0)
    assert torch.allclose(still.views(x, torch.Generator().manual_seed(0)), x, atol=1e-5)

    shifted = consistency_head(rotation=0.0, shift=3.0, scale=0.0)
    views = shifted.views(x, torch.Generator().manual_seed(0))
    moved = (centre_of_mass(views) - centre_of_mass(x)).abs()
    assert moved.max() < 3.3  # never more than the declared 3 pixels (plus what the border cuts off)
    assert moved.mean() > 0.8  # and by about a pixel and a half on average: uniform in [-3, 3]
    assert len({round(v, 3) for v in moved[:, 0].tolist()}) > 50  # each image its own shift
    # drawn from the run's noise stream: the same stream gives the same views, torch's global RNG no part
    torch.manual_seed(1)
    again = shifted.views(x, torch.Generator().manual_seed(0))
    assert torch.equal(views, again)
    assert not torch.equal(views, shifted.views(x, torch.Generator().manual_seed(1)))

    turned = consistency_head(rotation=30.0, shift=0.0, scale=0.0).views(x, torch.Generator().manual_seed(0))
    assert torch.allclose(turned.sum(1), x.sum(1), rtol=0.1)  # a rotation keeps the ink
    assert not torch.allclose(turned, x, atol=0.1)


def test_the_penalty_is_the_cross_entropy_of_the_views_codes_against_the_images_codes():
    head = consistency_head(weight=2.0, rotation=0.0, shift=0.0, scale=0.0)
    x = digits(8)
    logits = torch.randn(8, 10)

    def encode(views):  # identical views: the penalty is 2 * the entropy of q(y|x)
        assert torch.allclose(views, x, atol=1e-5)
        return {"y_logits": logits, "y": logits.softmax(1)}

    q = logits.softmax(1)
    penalty = head.encoder_penalty(x, {"y": q, "y_logits": logits}, encode, torch.Generator())
    assert torch.allclose(penalty, 2.0 * -(q * q.log()).sum(1).mean(), atol=1e-5)


def test_the_head_is_validated_against_its_code_and_the_data(tmp_path):
    registry = get_registry()
    raw = read_toml(ROOT / "recipes" / "cluster16_augmented.toml")
    assert validate(raw, registry)[1] == []
    raw["heads"]["consistency"]["code"] = "z"
    assert any("heads.consistency.code" in p and "categorical" in p for p in validate(raw, registry)[1])
    out = aaekit(
        "validate",
        str(ROOT / "recipes" / "gmm.toml"),
        "data.name=mixture",
        "heads.c.name=augmentation_consistency",
    )
    assert out.returncode != 0
    assert "heads.c" in out.stderr and "2-D images" in out.stderr and "(2,)" in out.stderr, out.stderr


def tiny_recipe(tmp_path, weight: float):
    return two_code_recipe(
        tmp_path / f"r{weight}.toml",
        data={"limit": 200, "labelled": 40},
        heads={"consistency": {"name": "augmentation_consistency", "weight": weight}},
        train={"batch_size": 20, "max_steps": 6, "log_every": 2, "checkpoint_every": 2},
    )


def test_the_penalty_trains_the_encoder_and_a_resumed_run_ends_bitwise_identical(tmp_path):
    runs = {}
    for weight in (0.0, 5.0):
        runs[weight] = tmp_path / f"run{weight}"
        out = aaekit("run", str(tiny_recipe(tmp_path, weight)), "--output-dir", str(runs[weight]))
        assert out.returncode == 0, out.stderr[-3000:]
    assert '"loss/penalty.consistency"' in (runs[5.0] / "metrics.jsonl").read_text()
    with_penalty, without = (load_file(str(runs[w] / "model.safetensors")) for w in (5.0, 0.0))
    assert not torch.equal(with_penalty["encoder.outputs.y.weight"], without["encoder.outputs.y.weight"])

    # stopped after 2 steps and resumed: the views come from the saved noise stream, so it ends as one run
    resumed = tmp_path / "resumed"
    recipe = str(tiny_recipe(tmp_path, 5.0))
    assert aaekit("run", recipe, "train.max_steps=2", "--output-dir", str(resumed)).returncode == 0
    out = aaekit("run", recipe, "--output-dir", str(resumed), "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    final = load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(final[k], with_penalty[k]) for k in with_penalty)


NOT_A_NUMBER_HEAD = '''
import torch
from aaekit.plugin import Head, hookimpl


class RowsHead(Head):
    """Returns one penalty per row instead of one number."""
    name = "rows"

    def encoder_penalty(self, x, codes, encode, generator):
        return codes["y"].sum(1)


@hookimpl
def register_heads(register):
    register(RowsHead)
'''


def test_an_encoder_penalty_that_is_not_one_number_is_named_before_training(tmp_path):
    plugins = plugin_folder(tmp_path, "rows_head.py", NOT_A_NUMBER_HEAD)
    recipe = two_code_recipe(
        tmp_path / "r.toml", data={"limit": 200}, heads={"r": {"name": "rows"}}, train={"max_steps": 2}
    )
    run_dir = tmp_path / "run"
    out = aaekit("run", str(recipe), "--output-dir", str(run_dir), "--plugins-dir", str(plugins))
    one_error(out, "heads.r", "'rows'", "rows_head.py", "an encoder penalty", "one number")
    assert not (run_dir / "metrics.jsonl").exists()


def components_of(values: dict) -> set[tuple[str, str]]:
    """(kind, name) of every component a resolved recipe names."""
    named = {("dataset", values["data"]["name"]), ("posterior", values["encoder"]["name"])}
    named |= {("prior", code["prior"]["name"]) for code in values["codes"].values()}
    return named | {("head", head["name"]) for head in values["heads"].values()}


def test_only_the_extended_recipes_use_the_extensions_and_each_is_reported_apart():
    """What departs from the paper stays out of the faithful recipes: a shipped recipe uses a component of
    aaekit-extensions exactly when the results table reports it as an extended one."""
    registry = get_registry()
    extended = {exp.extended for exp in script("reproduce").EXPERIMENTS if exp.extended}
    assert extended, "no experiment names an extended recipe"
    for path in sorted((ROOT / "recipes").glob("*.toml")):
        used = {
            registry.get(kind, name).distribution for kind, name in components_of(load_recipe(path).values)
        }
        assert ("aaekit-extensions" in used) == (path.name in extended), path.name
