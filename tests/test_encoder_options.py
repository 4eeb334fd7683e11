"""The encoder's options for the categorical-code modes: dropout on the input and batch norm on the y
logits."""

from __future__ import annotations

import torch

from aaekit.contracts import CodeSpec
from aaekit.plugins import get_registry
from aaekit.recipe import validate
from conftest import aaekit, two_code_recipe

CODES = [CodeSpec("y", "categorical", 4), CodeSpec("z", "continuous", 2)]


def posterior(**options):
    cls = get_registry().get("posterior", "deterministic").cls
    torch.manual_seed(0)
    return cls(input_dim=50, codes=CODES, hidden=[16], **options)


def test_input_dropout_zeroes_that_fraction_while_training_only_from_the_noise_stream():
    enc = posterior(input_dropout=0.25)
    x = torch.ones(400, 50)
    dropped = enc.dropped_out(x, torch.Generator().manual_seed(1))
    zero = (dropped == 0).float().mean().item()
    assert 0.22 < zero < 0.28
    assert torch.allclose(dropped[dropped != 0], torch.tensor(1 / 0.75))  # the mean is kept
    # the mask comes from the generator given (the run's noise stream, saved in checkpoints)
    assert torch.equal(dropped, enc.dropped_out(x, torch.Generator().manual_seed(1)))
    torch.manual_seed(5)
    train_a = enc(x, generator=torch.Generator().manual_seed(2))["z"]
    torch.manual_seed(6)
    train_b = enc(x, generator=torch.Generator().manual_seed(2))["z"]
    assert torch.equal(train_a, train_b)  # torch's global RNG plays no part
    enc.eval()
    assert torch.equal(enc(x)["z"], posterior()(x)["z"])  # evaluation sees the whole input


def test_logit_batch_norm_normalises_the_categorical_logits_only():
    enc = posterior(logit_batch_norm=True)
    assert set(enc.logit_norms) == {"y"}
    x = torch.randn(64, 50)
    out = enc(x)
    logits = out["y_logits"]
    assert torch.allclose(logits.mean(0), torch.zeros(4), atol=1e-5)  # normalised per category over the batch
    assert torch.allclose(logits.std(0, unbiased=False), torch.ones(4), atol=1e-3)
    assert torch.allclose(out["y"], torch.softmax(logits, 1))
    plain = posterior()(x)
    assert torch.allclose(out["z"], plain["z"])  # z untouched
    with torch.no_grad():
        enc.logit_norms["y"].weight.fill_(10.0)  # a learned scale makes q(y|x) nearly one-hot
    assert enc(x)["y"].max(1).values.mean() > 0.9


def test_the_options_are_validated_and_train(tmp_path):
    registry = get_registry()
    raw = {
        "data": {"name": "mnist"},
        "encoder": {"name": "deterministic", "input_dropout": 1.5},
        "codes": {"z": {"dim": 2, "prior": {"name": "gaussian"}}},
    }
    _, problems = validate(raw, registry)
    assert any("encoder.input_dropout" in p and "<= 0.9" in p for p in problems), problems
    recipe = two_code_recipe(
        tmp_path / "r.toml",
        data={"limit": 200, "labelled": 40},
        encoder={"input_dropout": 0.2, "logit_batch_norm": True},
        train={"batch_size": 20, "max_steps": 4, "log_every": 2},
    )
    out = aaekit("run", str(recipe), "--output-dir", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr[-3000:]
    from aaekit import load

    assert "encoder.logit_norms.y.weight" in load(tmp_path / "run").model.state_dict()
