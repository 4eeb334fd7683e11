"""What only a GPU can show: fp16's gradient scaler is used, saved in every checkpoint and restored on resume;
the training step replayed as a CUDA graph (run.cuda_graphs) trains as the eager one, in every precision,
and resumes exactly.
Skipped on a machine without CUDA (the project's CPU machines); run it where a GPU is lent."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import aaekit, aaekit_process, tiny_run_args, two_code_recipe

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


def metric_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def graphs_recipe(tmp_path, precision: str):
    """The §5 model in miniature with labels (all three phases), 20 steps an epoch, the rates dropping at
    epoch 2 (so a replayed run records twice)."""
    return two_code_recipe(
        tmp_path / f"r-{precision}.toml",
        data={"limit": 400, "labelled": 60},
        run={"seed": 3, "mixed_precision": precision},
        train={"batch_size": 20, "epochs": 3, "lr_milestones": [2], "log_every": 5, "checkpoint_every": 10},
    )


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_replayed_steps_train_as_the_eager_ones(tmp_path, precision):
    recipe = graphs_recipe(tmp_path, precision)
    runs, outputs = {}, {}
    for setting in ("off", "on"):
        runs[setting] = tmp_path / setting
        out = aaekit("run", str(recipe), f"run.cuda_graphs={setting}", "--output-dir", str(runs[setting]))
        assert out.returncode == 0, out.stderr[-3000:]
        outputs[setting] = out.stdout
    # 3 eager steps before each of the two recordings
    assert "recorded 2 time(s) and replayed for 54 of 60 steps" in outputs["on"], outputs["on"]
    assert "cuda graphs" not in outputs["off"]
    tolerance = 1e-4 if precision == "no" else 2e-2
    eager, replayed = metric_lines(runs["off"]), metric_lines(runs["on"])
    assert [r["step"] for r in eager] == [r["step"] for r in replayed]
    for a, b in zip(eager, replayed):
        for key in (k for k in a if k.startswith("loss/")):
            assert math.isclose(a[key], b[key], rel_tol=tolerance, abs_tol=tolerance), (a["step"], key)
    weights = [load_file(str(runs[s] / "model.safetensors")) for s in ("off", "on")]
    for name, value in weights[0].items():
        if value.is_floating_point():
            assert torch.allclose(value, weights[1][name], rtol=tolerance, atol=tolerance), name


def test_a_replayed_run_killed_and_resumed_ends_as_one_run_straight_through(tmp_path):
    recipe = graphs_recipe(tmp_path, "no")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    out = aaekit("run", str(recipe), "run.cuda_graphs=auto", "--output-dir", str(straight))
    assert out.returncode == 0 and "replayed for 54 of 60 steps" in out.stdout, out.stdout + out.stderr
    args = ("run", str(recipe), "run.cuda_graphs=auto", "--output-dir", str(broken))
    killed = aaekit_process(*args, env={"AAEKIT_TEST_SIGNAL_AT": "SIGKILL:35"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = aaekit_process(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (load_file(str(d / "model.safetensors")) for d in (straight, broken))
    for name, value in a.items():
        if value.is_floating_point():
            assert torch.allclose(value, b[name], rtol=1e-5, atol=1e-6), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_train_a_batch_normalised_encoder_with_synchronised_statistics(tmp_path):
    """Under DDP on GPUs the batch-norm layers become SyncBatchNorm (statistics over the global batch); the
    run trains and both ranks end with the same running statistics."""
    import os
    import subprocess
    import sys

    recipe = two_code_recipe(
        tmp_path / "r.toml",
        data={"limit": 400},
        encoder={"name": "deterministic", "hidden": [16], "batch_norm": True},
        train={"batch_size": 20, "max_steps": 8, "log_every": 4},
    )
    run_dir = tmp_path / "run"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd = [*accelerate, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "-m", "aaekit"]
    out = subprocess.run(
        [*cmd, "run", str(recipe), "--output-dir", str(run_dir)],
        env={**os.environ, "AAEKIT_DUMP_RANKS": str(tmp_path / "dump")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "batch norm: 1 layer(s) synchronised across the ranks" in out.stdout, out.stdout
    rank0, rank1 = (load_file(str(tmp_path / "dump" / f"rank{r}.safetensors")) for r in (0, 1))
    stats = [k for k in rank0 if "running_mean" in k]
    assert stats and all(torch.equal(rank0[k], rank1[k]) for k in stats)
