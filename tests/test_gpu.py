"""What only a GPU can show: fp16's gradient scaler is used, saved in every checkpoint and restored on resume.
Skipped on a machine without CUDA (the project's CPU machines); run it where a GPU is lent."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import aaekit, tiny_run_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def test_fp16_scaler_is_saved_and_restored(tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_run_args(
        "recipes/gaussian.toml",
        run_dir,
        "run.mixed_precision=fp16",
        "train.max_steps=8",
        "train.checkpoint_every=4",
    )
    out = aaekit(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads((run_dir / "checkpoints" / "step-00000004" / "state.json").read_text())
    scaler = state["scaler"]
    assert scaler is not None and math.isfinite(scaler["scale"]) and scaler["scale"] > 0
    losses = [
        json.loads(line)["loss/reconstruction"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(math.isfinite(v) for v in losses)

    from aaekit.checkpoint import read_checkpoint
    from aaekit.engine import Trainer
    from aaekit.plugins import get_registry
    from aaekit.recipe import load_recipe

    registry = get_registry()
    overrides = [a for a in args[2:] if "=" in a]
    trainer = Trainer(load_recipe(args[1], overrides, registry), tmp_path / "again", registry)
    assert trainer.accelerator.scaler is not None  # fp16 on a GPU runs through the gradient scaler
    trainer.prepare(read_checkpoint(run_dir / "checkpoints" / "step-00000004"))
    assert trainer.accelerator.scaler.get_scale() == scaler["scale"]
    assert trainer.start["step"] == 4
