"""Distributed data parallel, mixed precision and fault tolerance, under real conditions: two real ranks
(CPU, gloo), real SIGKILL/SIGINT, real files. Launches are few and each checks several promises."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, aaekit, aaekit_process, two_code_recipe

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny nets: threads only contend on a shared machine


def write_recipe(tmp_path: Path, steps: int, validation: int = 0, encoder: str = "universal",
                 heads: dict | None = None, batch_norm: bool = False) -> Path:
    """Two codes, a universal posterior (eta noise), input noise and a partially labelled classifier head:
    every random stream of the engine is in use (batch order, labelled stream, prior samples, eta noise)."""
    return two_code_recipe(
        tmp_path / "semi.toml", data={"limit": 400, "labelled": 60, "validation": validation},
        encoder={"name": encoder, "hidden": [16], "input_noise": 0.3, "batch_norm": batch_norm,
                 **({"noise_dim": 4} if encoder == "universal" else {})},
        train={"batch_size": 20, "max_steps": steps, "log_every": 4, "checkpoint_every": 4}, heads=heads or {})


def launch_two_ranks(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``accelerate launch`` with two CPU processes over gloo, as the README tells users."""
    full_env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(29500 + os.getpid() % 1000), "-m", "aaekit", *args]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def metric_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_ranks_identical(dump: Path) -> int:
    rank0, rank1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    differing = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not differing, f"ranks diverged in {differing}"
    return len(rank0)


def assert_written_once(run_dir: Path, steps: int, log_every: int) -> None:
    """metrics.jsonl has exactly one line per logged step (a second writer would duplicate them) and the
    checkpoint folder holds only complete checkpoints."""
    logged = [r["step"] for r in metric_lines(run_dir)]
    assert logged == sorted(set(logged)), logged
    assert logged[-1] == steps and len(logged) >= steps // log_every
    names = [p.name for p in (run_dir / "checkpoints").iterdir()]
    assert names and all(n.startswith("step-") for n in names), names


# ---- multi-process data parallel ------------------------------------------------------------------

def test_two_ranks_semi_supervised_stay_identical_and_evaluate_like_one(tmp_path):
    """Two codes, the classifier head (find_unused_parameters, classification phase on the labelled stream), the
    cluster-heads head (§7) and a batch-normalised encoder (each rank updates the running statistics from its own
    slice: they must still end identical, and validation must use the same ones on both ranks)."""
    steps = 102  # 6 epochs of 17 steps: the last log line is an epoch end, with validation metrics
    # 41 items: uneven shards (21 + 20) to gather. A deterministic posterior here: the universal one draws eta
    # per shard during evaluation, so its validation numbers depend on how the split is sharded (see README).
    # The §7 cluster heads too: a head with weights of its own (W_c must stay identical as well).
    recipe = write_recipe(tmp_path, steps, validation=41, encoder="deterministic",
                          heads={"dimred": {"name": "cluster_heads", "code_y": "y", "code_z": "z"}}, batch_norm=True)
    run_dir, dump = tmp_path / "run", tmp_path / "dump"
    result = launch_two_ranks("run", str(recipe), "train.log_every=17", "--output-dir", str(run_dir),
                              env={"AAEKIT_DUMP_RANKS": str(dump)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("run directory:") == 1  # only rank 0 announces (and creates) the run
    keys = assert_ranks_identical(dump)
    dumped = load_file(str(dump / "rank0.safetensors"))
    assert any(k.startswith("discriminators.y.") for k in dumped) and any(k.startswith("heads.dimred.") for k in dumped)
    assert any(k.endswith("running_mean") for k in dumped)
    assert keys == len(load_file(str(run_dir / "model.safetensors")))
    assert_written_once(run_dir, steps, 17)

    # The validation metrics gathered over two ranks equal a single-process evaluation of the same weights.
    import aaekit
    from aaekit.data import DeviceData, split_off
    from aaekit.evaluate import evaluate_split
    from aaekit.recipe import CORE

    loaded = aaekit.load(run_dir)
    data = loaded.recipe.values["data"]
    dataset = loaded.registry.get("dataset", data["name"]).cls(**{k: v for k, v in data.items() if k not in CORE["data"]})
    _, validation = split_off(dataset.load("train"), 41, 3 + 1)  # the engine's split: seed + 1
    single = evaluate_split(loaded.model, DeviceData(validation, torch.device("cpu")))
    last = metric_lines(run_dir)[-1]
    assert last["step"] == steps and "validation/reconstruction_mse" in last
    assert last["validation/reconstruction_mse"] == pytest.approx(single["reconstruction_mse"], rel=1e-5)
    assert last["validation/error.y"] == pytest.approx(single["error.y"], abs=1e-9)


def test_two_ranks_gmm_label_identical_only_rank0_writes(tmp_path):
    """The label-conditioned GMM recipe (§2.3), pictures on, the training split streamed (data.in_memory = false:
    each rank gathers only its own slice of every batch): every module identical on both ranks."""
    run_dir, dump = tmp_path / "run", tmp_path / "dump"
    steps = 100
    result = launch_two_ranks(
        "run", str(ROOT / "recipes/gmm_label.toml"), "train.epochs=10", f"train.max_steps={steps}", "train.log_every=10",
        "train.batch_size=20", "train.checkpoint_every=30", "encoder.hidden=[16]", "decoder.hidden=[16]",
        "codes.z.discriminator.hidden=[16]", "data.limit=400", "data.in_memory=false", "--output-dir", str(run_dir),
        env={"AAEKIT_DUMP_RANKS": str(dump)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_ranks_identical(dump)
    assert "training split (400 x (28, 28) uint8) streamed from" in result.stdout, result.stdout[-2000:]
    assert_written_once(run_dir, steps, 10)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-00000060", "step-00000090", "step-00000100"]
    for picture in ("samples.png", "reconstructions.png", "latent.png"):
        assert (run_dir / picture).stat().st_size > 0


def test_one_rank_raising_stops_every_rank(tmp_path):
    """Rank 1 fails at step 3 while rank 0 waits in a collective: the launcher must end both, non-zero."""
    recipe = write_recipe(tmp_path, 40)
    started = time.monotonic()
    result = launch_two_ranks("run", str(recipe), "--output-dir", str(tmp_path / "run"),
                              env={"AAEKIT_TEST_RAISE_AT": "1:3"}, timeout=300)
    assert result.returncode != 0
    assert "rank 1 fails at step 3" in result.stdout + result.stderr
    assert time.monotonic() - started < 300


def test_several_processes_that_accelerate_does_not_join_are_refused(tmp_path):
    run_dir = tmp_path / "run"
    result = aaekit("run", str(write_recipe(tmp_path, 4)), "--output-dir", str(run_dir),
                    env={"WORLD_SIZE": "2", **ONE_THREAD})
    assert result.returncode == 2
    assert "WORLD_SIZE=2 but Accelerate sees a single process" in result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()  # refused before anything was written


# ---- mixed precision ------------------------------------------------------------------------------

def test_bf16_trains_close_to_fp32(tmp_path):
    recipe = write_recipe(tmp_path, 8)
    lines = {}
    for precision in ("no", "bf16"):
        run_dir = tmp_path / precision
        result = aaekit("run", str(recipe), f"run.mixed_precision={precision}", "--output-dir", str(run_dir))
        assert result.returncode == 0, result.stderr[-3000:]
        lines[precision] = metric_lines(run_dir)
    for fp32, bf16 in zip(lines["no"], lines["bf16"]):
        for key in [k for k in fp32 if k.startswith("loss/")]:
            assert torch.isfinite(torch.tensor(bf16[key]))
            assert bf16[key] == pytest.approx(fp32[key], rel=0.05, abs=0.02), key
    # bf16 really ran: losses are close, not bit-identical
    assert any(lines["no"][-1][k] != lines["bf16"][-1][k] for k in lines["no"][-1] if k.startswith("loss/"))


# ---- exact resume and faults ----------------------------------------------------------------------

def test_killed_interrupted_and_corrupted_runs_resume_bitwise_identical(tmp_path):
    steps = 40
    recipe = write_recipe(tmp_path, steps)
    reference, broken = tmp_path / "reference", tmp_path / "broken"
    # Every run here in a fresh one-threaded process: float reductions may differ with the thread count.
    result = aaekit_process("run", str(recipe), "--output-dir", str(reference), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]

    # 1. SIGKILL in the middle of writing checkpoint 12 (model file written, the rest not).
    result = aaekit_process("run", str(recipe), "--output-dir", str(broken),
                            env={"AAEKIT_TEST_KILL_IN_CHECKPOINT": "12", **ONE_THREAD})
    assert result.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (broken / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000008"]
    assert list((broken / "checkpoints").glob(".tmp-step-00000012-*"))  # the half-written one, never picked

    # 2. Resume, then SIGKILL in the middle of the run, between checkpoints (at step 18).
    result = aaekit_process("run", str(recipe), "--output-dir", str(broken), "--resume",
                            env={"AAEKIT_TEST_SIGNAL_AT": "SIGKILL:18", **ONE_THREAD})
    assert result.returncode == -signal.SIGKILL
    assert max(p.name for p in (broken / "checkpoints").glob("step-*")) == "step-00000016"

    # 3. Resume, then Ctrl-C (a real SIGINT, at step 26): training goes on to the next log step (28), writes a
    # checkpoint there, prints how to continue and exits with 130.
    result = aaekit_process("run", str(recipe), "--output-dir", str(broken), "--resume",
                            env={"AAEKIT_TEST_SIGNAL_AT": "SIGINT:26", **ONE_THREAD})
    err = result.stderr
    assert result.returncode == 130, err[-3000:]
    assert "interrupted at step 28" in err and "--resume" in err
    newest = max((broken / "checkpoints").glob("step-*"), key=lambda p: p.name)
    assert newest.name == "step-00000028"

    # 4. Corrupt the newest checkpoint: resume reports it and uses the previous good one.
    model_file = newest / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])
    result = aaekit_process("run", str(recipe), "--output-dir", str(broken), "--resume", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipping corrupt checkpoint {newest.name}" in result.stdout + result.stderr
    assert "truncated" in result.stdout + result.stderr

    # Weights, optimizer state (incl. learning rates), every RNG stream and the counters match bit for bit.
    expected, actual = load_file(str(reference / "model.safetensors")), load_file(str(broken / "model.safetensors"))
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    final = f"checkpoints/step-{steps:08d}"
    for name in ("model.safetensors", "optimizers.safetensors", "rng.safetensors", "state.json"):
        assert (reference / final / name).read_bytes() == (broken / final / name).read_bytes(), name


def test_diverging_loss_stops_with_last_good_checkpoint(tmp_path):
    """From epoch 1 (step 20) every learning rate is multiplied by 1e33: the loss turns non-finite."""
    recipe = write_recipe(tmp_path, 60)
    run_dir = tmp_path / "run"
    result = aaekit("run", str(recipe), "train.lr_milestones=[1]", "train.lr_gamma=1e33",
                    "--output-dir", str(run_dir))
    assert result.returncode == 3, result.stderr[-3000:]
    assert "loss diverged" in result.stderr and "Traceback" not in result.stderr
    from aaekit.checkpoint import latest_checkpoint

    good = latest_checkpoint(run_dir / "checkpoints")
    assert 20 <= good.state["step"] < 60 and str(good.path) in result.stderr
    assert all(torch.isfinite(t).all() for t in good.model.values())
    assert not (run_dir / "model.safetensors").exists()
