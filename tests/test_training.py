"""A few real training steps of each posterior on real MNIST: checkpoints, final weights, resume, refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from aaekit.checkpoint import latest_checkpoint, list_checkpoints
from conftest import ROOT, TINY, aaekit, prepared_trainer, tiny_run_args


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "recipe", ["posterior_deterministic.toml", "posterior_gaussian.toml", "posterior_universal.toml"]
)
def test_each_posterior_trains_and_writes_a_loadable_checkpoint(tmp_path, recipe):
    run_dir = tmp_path / "run"
    out = aaekit(
        *tiny_run_args(f"recipes/{recipe}", run_dir, "train.checkpoint_every=2", "train.pictures=false")
    )
    assert out.returncode == 0, out.stderr
    weights = load_file(str(run_dir / "model.safetensors"))
    prefixes = {key.split(".")[0] for key in weights}
    assert prefixes == {"encoder", "decoder", "discriminators"}
    assert any(k.startswith("discriminators.z.") for k in weights)
    assert (run_dir / "recipe.toml").exists()
    rows = metrics(run_dir)
    assert rows[-1]["step"] == 4
    for key in [
        "loss/reconstruction",
        "loss/discriminator.z",
        "loss/generator.z",
        "accuracy/prior.z",
        "accuracy/code.z",
    ]:
        assert key in rows[-1]
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    assert checkpoint.state["step"] == 4
    assert set(checkpoint.model) == set(weights)
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step-00000004", "step-00000002"]


def test_resume_continues_the_step_count_and_never_overwrites(tmp_path):
    run_dir = tmp_path / "run"
    base = tiny_run_args("recipes/gaussian.toml", run_dir, "train.pictures=false")
    first = aaekit(*base)
    assert first.returncode == 0, first.stderr
    before = (run_dir / "metrics.jsonl").read_text()

    again = aaekit(*base)  # same output dir without --resume: refused, nothing touched
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before

    changed = aaekit(*base, "codes.z.dim=3", "--resume")  # a different model cannot resume this run
    assert changed.returncode == 2 and "codes.z.dim" in changed.stderr

    resumed = aaekit(*base, "train.max_steps=8", "run.flush_denormals=false", "--resume")  # both may change
    assert resumed.returncode == 0, resumed.stderr
    rows = metrics(run_dir)
    assert (run_dir / "metrics.jsonl").read_text().startswith(before)  # appended, not rewritten
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert latest_checkpoint(run_dir / "checkpoints").state["step"] == 8


def test_a_model_file_that_cannot_be_written_is_one_line_and_resume_writes_it(tmp_path):
    """A folder in the way of model.safetensors (the file cannot replace it): trained, stopped with exit 4 and
    one line naming the final checkpoint; resuming the finished run writes the model, the same weights."""
    run_dir = tmp_path / "run"
    base = tiny_run_args("recipes/gaussian.toml", run_dir, "train.pictures=false")
    assert aaekit(*base).returncode == 0
    written = load_file(str(run_dir / "model.safetensors"))
    (run_dir / "model.safetensors").unlink()
    (run_dir / "model.safetensors").mkdir()
    (run_dir / "model.safetensors" / "in-the-way").write_text("x")
    blocked = aaekit(*base, "--resume")
    assert blocked.returncode == 4 and "Traceback" not in blocked.stderr, blocked.stderr[-2000:]
    final = latest_checkpoint(run_dir / "checkpoints")
    assert "cannot write the trained model" in blocked.stderr and str(final.path) in blocked.stderr
    shutil.rmtree(run_dir / "model.safetensors")
    resumed = aaekit(*base, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = load_file(str(run_dir / "model.safetensors"))
    assert again.keys() == written.keys() and all(torch.equal(again[k], written[k]) for k in written)


def test_default_run_dir_gets_a_new_name_instead_of_overwriting(tmp_path):
    args = [
        "run",
        str(ROOT / "recipes" / "gaussian.toml"),
        "train.max_steps=1",
        "train.batch_size=20",
        "data.limit=100",
        "encoder.hidden=[8]",
        "decoder.hidden=[8]",
        "codes.z.discriminator.hidden=[8]",
        "train.pictures=false",
        "run.name=twice",
    ]
    assert aaekit(*args, cwd=tmp_path).returncode == 0
    second = aaekit(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert (tmp_path / "runs" / "twice" / "model.safetensors").exists()
    assert (tmp_path / "runs" / "twice-2" / "model.safetensors").exists()


def test_resume_without_a_run_is_a_clear_error(tmp_path):
    out = aaekit(*tiny_run_args("recipes/gaussian.toml", tmp_path / "none"), "--resume")
    assert out.returncode == 2 and "no run to resume" in out.stderr and "Traceback" not in out.stderr


def test_batch_normalised_encoder_saves_its_statistics_and_evaluates_per_example(tmp_path):
    import torch

    import aaekit as api

    run_dir = tmp_path / "run"
    out = aaekit(
        *tiny_run_args(
            "recipes/posterior_deterministic.toml",
            run_dir,
            "encoder.batch_norm=true",
            "encoder.hidden=[32,32]",
            "train.pictures=false",
        )
    )
    assert out.returncode == 0, out.stderr
    weights = load_file(str(run_dir / "model.safetensors"))
    means = [k for k in weights if k.startswith("encoder.trunk.") and k.endswith("running_mean")]
    assert len(means) == 2  # one per hidden layer
    # updated by training, not the zeros they start from
    assert all(weights[k].abs().sum() > 0 for k in means)

    run = api.load(run_dir)
    x = torch.rand(5, 784)
    with torch.no_grad():
        together = run.model.encoder(x)["z"]
        # running statistics, not the batch's: an example's code is its own
        alone = run.model.encoder(x[:1])["z"]
    torch.testing.assert_close(alone[0], together[0])


def test_gaussian_posterior_trains_on_sampled_codes(tmp_path):
    """posterior_gaussian.toml: the engine's phases decode z ~ N(mu(x), sigma(x)^2), not mu(x) (§2); the
    samples come from the run's noise stream. Observed on the decoder's input in a real reconstruction
    phase."""
    import torch

    trainer = prepared_trainer(
        "recipes/posterior_gaussian.toml", tmp_path, [*TINY, "codes.z.discriminator.hidden=[16]"]
    )
    encoder = trainer.model.encoder
    index = trainer.batches.take(20)
    x = trainer.train_data.inputs(index)
    with torch.no_grad():
        mean, logvar = encoder.outputs["z"](encoder.trunk(x)).chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(min=encoder.min_logvar))
    seen = []
    handle = trainer.model.decoder.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach())
    )
    try:
        trainer.reconstruction_phase(x, trainer.train_data.y[index])
    finally:
        handle.remove()
    (z,) = seen
    assert encoder.training
    eps = (z - mean) / std  # 20 x 8 standard normal draws
    assert 0.7 < eps.std().item() < 1.3, eps.std()
    assert eps.mean().abs().item() < 0.35, eps.mean()
