"""Distributed data parallel, mixed precision and fault tolerance, under real conditions: two real ranks
(CPU, gloo), real SIGKILL/SIGINT, real files. Launches are few and each checks several promises."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    ROOT,
    aaekit,
    aaekit_process,
    limit_file_size,
    prepared_trainer,
    tiny_run_args,
    two_code_recipe,
)

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny nets: threads only contend on a shared machine


def write_recipe(
    tmp_path: Path,
    steps: int,
    validation: int = 0,
    encoder: str = "universal",
    heads: dict | None = None,
    batch_norm: bool = False,
) -> Path:
    """Two codes, a universal posterior (eta noise), input noise and a partially labelled classifier head:
    every random stream of the engine is in use (batch order, labelled stream, prior samples, eta noise)."""
    return two_code_recipe(
        tmp_path / "semi.toml",
        data={"limit": 400, "labelled": 60, "validation": validation},
        encoder={
            "name": encoder,
            "hidden": [16],
            "input_noise": 0.3,
            "batch_norm": batch_norm,
            **({"noise_dim": 4} if encoder == "universal" else {}),
        },
        train={"batch_size": 20, "max_steps": steps, "log_every": 4, "checkpoint_every": 4},
        heads=heads or {},
    )


def launch_two_ranks(
    *args: str, env: dict | None = None, timeout: int = 600, file_size_limit: int | None = None
) -> subprocess.CompletedProcess:
    """``accelerate launch`` with two CPU processes over gloo, as the README tells users."""
    full_env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [
        ACCELERATE,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(29500 + os.getpid() % 1000),
        "-m",
        "aaekit",
        *args,
    ]
    return subprocess.run(
        cmd,
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit_file_size(file_size_limit),
    )


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
    """Two codes, the classifier head (find_unused_parameters, classification phase on the labelled stream),
    the cluster-heads head (§7), augmentation consistency (aaekit-extensions) and a batch-normalised encoder
    (each rank updates the running statistics from its own slice: they must still end identical, and
    validation must use the same ones on both ranks)."""
    steps = 102  # 6 epochs of 17 steps: the last log line is an epoch end, with validation metrics
    # 41 items: uneven shards (21 + 20) to gather. A deterministic posterior here: the universal one draws eta
    # per shard during evaluation, so its validation numbers depend on how the split is sharded (see README).
    # The §7 cluster heads too: a head with weights of its own (W_c must stay identical as well).
    recipe = write_recipe(
        tmp_path,
        steps,
        validation=41,
        encoder="deterministic",
        heads={
            "dimred": {"name": "cluster_heads", "code_y": "y", "code_z": "z"},
            # the extensions' head: the encoder runs twice (image and view) before one backward
            "consistency": {"name": "augmentation_consistency"},
        },
        batch_norm=True,
    )
    run_dir, dump = tmp_path / "run", tmp_path / "dump"
    result = launch_two_ranks(
        "run",
        str(recipe),
        "train.log_every=17",
        "--output-dir",
        str(run_dir),
        env={"AAEKIT_DUMP_RANKS": str(dump)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("run directory:") == 1  # only rank 0 announces (and creates) the run
    keys = assert_ranks_identical(dump)
    dumped = load_file(str(dump / "rank0.safetensors"))
    assert any(k.startswith("discriminators.y.") for k in dumped) and any(
        k.startswith("heads.dimred.") for k in dumped
    )
    assert any(k.endswith("running_mean") for k in dumped)
    assert keys == len(load_file(str(run_dir / "model.safetensors")))
    assert_written_once(run_dir, steps, 17)
    assert "loss/penalty.consistency" in metric_lines(run_dir)[-1]

    # The validation metrics gathered over two ranks equal a single-process evaluation of the same weights.
    import aaekit
    from aaekit.data import DeviceData, split_off
    from aaekit.evaluation.validation import evaluate_split
    from aaekit.recipe import CORE

    loaded = aaekit.load(run_dir)
    data = loaded.recipe.values["data"]
    dataset = loaded.registry.get("dataset", data["name"]).cls(
        **{k: v for k, v in data.items() if k not in CORE["data"]}
    )
    _, validation = split_off(dataset.load("train"), 41, 3 + 1)  # the engine's split: seed + 1
    single = evaluate_split(loaded.model, DeviceData(validation, torch.device("cpu")))
    last = metric_lines(run_dir)[-1]
    assert last["step"] == steps and "validation/reconstruction_mse" in last
    assert last["validation/reconstruction_mse"] == pytest.approx(single["reconstruction_mse"], rel=1e-5)
    assert last["validation/error.y"] == pytest.approx(single["error.y"], abs=1e-9)


def test_two_ranks_gmm_label_identical_only_rank0_writes(tmp_path):
    """The label-conditioned GMM recipe (§2.3), pictures on, the training split streamed (data.in_memory =
    false: each rank gathers only its own slice of every batch): every module identical on both ranks."""
    run_dir, dump = tmp_path / "run", tmp_path / "dump"
    steps = 100
    result = launch_two_ranks(
        "run",
        str(ROOT / "recipes/gmm_label.toml"),
        "train.epochs=10",
        f"train.max_steps={steps}",
        "train.log_every=10",
        "train.batch_size=20",
        "train.checkpoint_every=30",
        "encoder.hidden=[16]",
        "decoder.hidden=[16]",
        "codes.z.discriminator.hidden=[16]",
        "data.limit=400",
        "data.in_memory=false",
        "--output-dir",
        str(run_dir),
        env={"AAEKIT_DUMP_RANKS": str(dump)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_ranks_identical(dump)
    assert "training split (400 x (28, 28) uint8) streamed from" in result.stdout, result.stdout[-2000:]
    assert_written_once(run_dir, steps, 10)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-00000060",
        "step-00000090",
        "step-00000100",
    ]
    for picture in ("samples.png", "reconstructions.png", "latent.png"):
        assert (run_dir / picture).stat().st_size > 0


def test_one_rank_raising_stops_every_rank(tmp_path):
    """Rank 1 fails at step 3 while rank 0 waits in a collective: the launcher ends both, non-zero, with the
    failing rank's traceback; rank 0 trains no further (no log line, no checkpoint, no model). A hang would
    end in the subprocess's timeout, a failure of its own."""
    recipe = write_recipe(tmp_path, 40)
    run_dir = tmp_path / "run"
    result = launch_two_ranks(
        "run", str(recipe), "--output-dir", str(run_dir), env={"AAEKIT_TEST_RAISE_AT": "1:3"}, timeout=300
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "rank 1 fails at step 3" in output and "Traceback" in output
    assert not (run_dir / "model.safetensors").exists()
    assert not list(run_dir.glob("checkpoints/step-*"))  # the first checkpoint is due at step 4
    assert not (run_dir / "metrics.jsonl").exists() or not metric_lines(run_dir)


def test_several_processes_that_accelerate_does_not_join_are_refused(tmp_path):
    run_dir = tmp_path / "run"
    result = aaekit(
        "run",
        str(write_recipe(tmp_path, 4)),
        "--output-dir",
        str(run_dir),
        env={"WORLD_SIZE": "2", **ONE_THREAD},
    )
    assert result.returncode == 2
    assert "WORLD_SIZE=2 but Accelerate sees a single process" in result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()  # refused before anything was written


# ---- mixed precision ------------------------------------------------------------------------------


def test_bf16_trains_close_to_fp32(tmp_path):
    """100 steps of the two-code schedule (universal posterior, input noise, the classification phase) in fp32
    and in bf16 (on a CPU: bf16 weights with fp32 masters): bf16 learns what fp32 learns. Its reconstruction
    and classification losses drop by as much within 15 %, and every trained part ends near fp32's weights:
    their distance is under a third of how far fp32's weights travelled from the initial ones both runs share
    (a bf16 layer that is not updated, or updated at another rate, ends about its whole travel away)."""
    steps = 100
    recipe = write_recipe(tmp_path, steps)
    lines, weights = {}, {}
    for precision in ("no", "bf16"):
        run_dir = tmp_path / precision
        result = aaekit(
            "run",
            str(recipe),
            f"run.mixed_precision={precision}",
            "train.log_every=20",
            "train.checkpoint_every=0",
            "--output-dir",
            str(run_dir),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        lines[precision] = metric_lines(run_dir)
        weights[precision] = load_file(str(run_dir / "model.safetensors"))
    assert "fp32 masters" in result.stdout  # the bf16 run held bf16 weights
    for fp32, bf16 in zip(lines["no"], lines["bf16"], strict=True):
        assert all(math.isfinite(bf16[k]) for k in fp32 if k.startswith("loss/")), bf16
    for key in ("loss/reconstruction", "loss/classification"):
        drop = {p: lines[p][0][key] - lines[p][-1][key] for p in lines}
        assert drop["no"] > 0.2 * lines["no"][0][key], (key, drop)  # fp32 learned something to compare with
        assert abs(drop["bf16"] - drop["no"]) <= 0.15 * drop["no"], (key, drop)
    # bf16 really ran: close, not bit-identical
    assert any(lines["no"][-1][k] != lines["bf16"][-1][k] for k in lines["no"][-1] if k.startswith("loss/"))

    # the initial weights: those of a trainer built from the same recipe and seed
    initial = prepared_trainer(recipe, tmp_path / "initial", []).model.state_dict()
    parts = {}  # encoder, decoder, each discriminator (and any head with weights of its own)
    for key, value in initial.items():
        if value.is_floating_point():
            name = key.split(".")[0]
            part = name if name in ("encoder", "decoder") else ".".join(key.split(".")[:2])
            parts.setdefault(part, []).append(key)
    assert {"encoder", "decoder", "discriminators.y", "discriminators.z"} <= set(parts)
    for part, keys in parts.items():
        distance = math.sqrt(sum(float((weights["bf16"][k] - weights["no"][k]).square().sum()) for k in keys))
        travel = math.sqrt(sum(float((weights["no"][k] - initial[k]).square().sum()) for k in keys))
        assert travel > 0 and distance < travel / 3, (part, distance, travel)


# ---- exact resume and faults ----------------------------------------------------------------------


def test_killed_interrupted_and_corrupted_runs_resume_bitwise_identical(tmp_path):
    steps = 40
    recipe = write_recipe(tmp_path, steps)
    reference, broken = tmp_path / "reference", tmp_path / "broken"
    # Every run here in a fresh one-threaded process: float reductions may differ with the thread count.
    result = aaekit_process("run", str(recipe), "--output-dir", str(reference), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]

    # 1. SIGKILL in the middle of writing checkpoint 12 (model file written, the rest not).
    result = aaekit_process(
        "run",
        str(recipe),
        "--output-dir",
        str(broken),
        env={"AAEKIT_TEST_KILL_IN_CHECKPOINT": "12", **ONE_THREAD},
    )
    assert result.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (broken / "checkpoints").glob("step-*")) == [
        "step-00000004",
        "step-00000008",
    ]
    assert list((broken / "checkpoints").glob(".tmp-step-00000012-*"))  # the half-written one, never picked

    # 2. Resume, then SIGKILL in the middle of the run, between checkpoints (at step 18).
    result = aaekit_process(
        "run",
        str(recipe),
        "--output-dir",
        str(broken),
        "--resume",
        env={"AAEKIT_TEST_SIGNAL_AT": "SIGKILL:18", **ONE_THREAD},
    )
    assert result.returncode == -signal.SIGKILL
    assert max(p.name for p in (broken / "checkpoints").glob("step-*")) == "step-00000016"

    # 3. Resume, then Ctrl-C (a real SIGINT, at step 26): training goes on to the next log step (28), writes a
    # checkpoint there, prints how to continue and exits with 130.
    result = aaekit_process(
        "run",
        str(recipe),
        "--output-dir",
        str(broken),
        "--resume",
        env={"AAEKIT_TEST_SIGNAL_AT": "SIGINT:26", **ONE_THREAD},
    )
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
    expected, actual = (
        load_file(str(reference / "model.safetensors")),
        load_file(str(broken / "model.safetensors")),
    )
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    final = f"checkpoints/step-{steps:08d}"
    for name in ("model.safetensors", "optimizers.safetensors", "rng.safetensors", "state.json"):
        assert (reference / final / name).read_bytes() == (broken / final / name).read_bytes(), name


def test_two_ranks_killed_and_resumed_end_bitwise_identical(tmp_path):
    """Exact resume under accelerate launch: two ranks killed (a real SIGKILL, between checkpoints) and
    resumed on two ranks end bit-identical to two ranks run straight through: weights, optimizer state, each
    rank's own noise stream (eta of the universal posterior, input noise, prior samples), the shared batch
    streams, the counters, and the same logged losses."""
    steps = 24
    recipe = write_recipe(tmp_path, steps)
    reference, broken = tmp_path / "reference", tmp_path / "broken"
    result = launch_two_ranks("run", str(recipe), "--output-dir", str(reference))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    result = launch_two_ranks(
        "run", str(recipe), "--output-dir", str(broken), env={"AAEKIT_TEST_SIGNAL_AT": "SIGKILL:14"}
    )
    assert result.returncode != 0
    assert max(p.name for p in (broken / "checkpoints").glob("step-*")) == "step-00000012"
    assert not (broken / "model.safetensors").exists()
    result = launch_two_ranks("run", str(recipe), "--output-dir", str(broken), "--resume")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    final = f"checkpoints/step-{steps:08d}"
    for name in ("model.safetensors", "optimizers.safetensors", "rng.safetensors", "state.json"):
        assert (reference / final / name).read_bytes() == (broken / final / name).read_bytes(), name
    assert (reference / "model.safetensors").read_bytes() == (broken / "model.safetensors").read_bytes()
    rng = load_file(str(reference / final / "rng.safetensors"))
    assert not torch.equal(rng["noise.rank0"], rng["noise.rank1"])  # two streams, both restored
    expected, actual = metric_lines(reference), metric_lines(broken)
    assert [r["step"] for r in actual] == [r["step"] for r in expected] == [4, 8, 12, 16, 20, 24]
    for want, got in zip(expected, actual):
        assert {k: v for k, v in got.items() if k.startswith("loss/")} == {
            k: v for k, v in want.items() if k.startswith("loss/")
        }, got["step"]


def test_resuming_on_another_number_of_processes(tmp_path):
    """A checkpoint written by one process resumes on two ranks, and theirs on one again: training goes on
    from the step, the weights and the optimizer state it holds (a note says the per-rank noise streams
    restart), and the two ranks stay identical."""
    recipe = write_recipe(tmp_path, 8)
    run_dir, dump = tmp_path / "run", tmp_path / "dump"
    result = aaekit("run", str(recipe), "--output-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    result = launch_two_ranks(
        "run",
        str(recipe),
        "train.max_steps=16",
        "--output-dir",
        str(run_dir),
        "--resume",
        env={"AAEKIT_DUMP_RANKS": str(dump)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (
        "written by 1 processes, resuming on 2" in result.stdout and "noise streams restart" in result.stdout
    )
    assert assert_ranks_identical(dump) > 0
    result = aaekit("run", str(recipe), "train.max_steps=24", "--output-dir", str(run_dir), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "written by 2 processes, resuming on 1" in result.stdout + result.stderr

    assert [r["step"] for r in metric_lines(run_dir)] == [4, 8, 12, 16, 20, 24]
    from aaekit.checkpoint import read_checkpoint

    for step, world_size in ((16, 2), (24, 1)):
        checkpoint = read_checkpoint(run_dir / "checkpoints" / f"step-{step:08d}")
        assert checkpoint.state["step"] == step and checkpoint.state["world_size"] == world_size
        # Adam's step counts every update since step 0: the optimizer state went across both changes
        assert float(checkpoint.optimizers["reconstruction/0/step"]) == step
        assert float(checkpoint.optimizers["classification/0/step"]) == step


def test_ctrl_c_twice_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    """The first Ctrl-C asks to stop at the next log step; a second one stops at once, mid-way: no checkpoint
    of the step it stopped in, no further log line, the finished model of the earlier leg untouched; the last
    periodic checkpoint remains and resumes. The next log step is thousands of steps away (an epoch of all of
    MNIST), so the second signal, sent when the first one's message appears, always comes before it."""
    run_dir = tmp_path / "run"
    base = tiny_run_args(
        "recipes/gaussian.toml", run_dir, "train.pictures=false", "data.limit=0", "train.checkpoint_every=4"
    )
    result = aaekit(*base, "train.max_steps=8")
    assert result.returncode == 0, result.stderr[-3000:]
    model = (run_dir / "model.safetensors").read_bytes()

    cmd = [
        sys.executable,
        "-m",
        "aaekit",
        *base[:-2],
        "train.max_steps=2900",
        "train.log_every=5000",
        "train.checkpoint_every=0",
        "--output-dir",
        str(run_dir),
        "--resume",
    ]
    env = {**os.environ, "AAEKIT_TEST_SIGNAL_AT": "SIGINT:10", "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    with open(tmp_path / "stderr.txt", "w+") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            seen = []
            for line in proc.stdout:  # until the first Ctrl-C's message (or the end, if it never comes)
                seen.append(line)
                if "going on to the next log step" in line:
                    proc.send_signal(signal.SIGINT)
                    break
            seen += proc.stdout.read().splitlines(keepends=True)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stderr.seek(0)
        err = stderr.read()
    out = "".join(seen)
    assert "going on to the next log step" in out, out[-3000:] + err[-3000:]
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "interrupted at step" not in out + err  # not the first Ctrl-C's stop at a log step
    stopped = [line for line in err.splitlines() if line.startswith("stopped: stopped at once")]
    assert len(stopped) == 1 and "step-00000008" in stopped[0] and "--resume" in stopped[0], err[-3000:]
    assert "Traceback" not in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]
    assert [r["step"] for r in metric_lines(run_dir)] == [2, 4, 6, 8]
    assert (run_dir / "model.safetensors").read_bytes() == model

    result = aaekit(*base, "train.max_steps=12", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in metric_lines(run_dir)] == [2, 4, 6, 8, 10, 12]


def test_a_checkpoint_that_cannot_be_written_stops_every_rank_by_name(tmp_path):
    """Files past 48 KB cannot be written (a full disk, as far as the run can tell): the first checkpoint,
    due at step 4, fails on rank 0. One process stops with exit 4 and one line; two ranks both stop at that
    step with the same line, instead of rank 1 waiting in a collective until the launcher ends it. Nothing
    half-written is left, and the run's earlier files are intact."""
    recipe = write_recipe(tmp_path, 40)
    for launch, run_dir in ((aaekit_process, tmp_path / "one"), (launch_two_ranks, tmp_path / "two")):
        result = launch(
            "run", str(recipe), "--output-dir", str(run_dir), timeout=300, file_size_limit=48 * 1024
        )
        expected = "stopped: cannot write the checkpoint of step 4 under"
        lines = [line for line in result.stderr.splitlines() if line.startswith(expected)]
        assert lines and all("none yet" in line for line in lines), result.stderr[-3000:]
        assert any("File too large" in line for line in lines), result.stderr[-3000:]
        if launch is aaekit_process:
            assert result.returncode == 4 and "Traceback" not in result.stderr, result.stderr[-3000:]
        else:  # one line per rank; rank 1's names rank 0 (the launcher then reports rank 0's exit 4)
            assert result.returncode != 0 and len(lines) == 2, result.stderr[-3000:]
            assert any("rank 0 could not write it" in line for line in lines)
        assert not list((run_dir / "checkpoints").iterdir())  # no half-written folder
        assert not (run_dir / "model.safetensors").exists()
        assert [row["step"] for row in metric_lines(run_dir)] == [4]  # logged before the save, kept


def test_a_metrics_line_that_cannot_be_written_stops_the_run_and_leaves_whole_lines(tmp_path):
    """A line per step, no periodic checkpoint, files limited to 4 KB: metrics.jsonl fills up after a dozen
    lines. The run stops with exit 4 naming the step, and the file holds only whole lines (the partial one
    is cut off)."""
    recipe = write_recipe(tmp_path, 40)
    run_dir = tmp_path / "run"
    result = aaekit_process(
        "run",
        str(recipe),
        "train.log_every=1",
        "train.checkpoint_every=0",
        "--output-dir",
        str(run_dir),
        timeout=300,
        file_size_limit=4096,
    )
    assert result.returncode == 4 and "Traceback" not in result.stderr, result.stderr[-3000:]
    rows = metric_lines(run_dir)  # every line parses: no partial one
    stopped = [line for line in result.stderr.splitlines() if line.startswith("stopped: cannot write")]
    assert len(stopped) == 1, result.stderr[-3000:]
    assert f"the metrics of step {len(rows) + 1} into" in stopped[0] and "File too large" in stopped[0]
    assert 3 < len(rows) < 40 and not (run_dir / "model.safetensors").exists()


def test_diverging_loss_stops_with_last_good_checkpoint(tmp_path):
    """From epoch 1 (step 20) every learning rate is multiplied by 1e33: the loss turns non-finite."""
    recipe = write_recipe(tmp_path, 60)
    run_dir = tmp_path / "run"
    result = aaekit(
        "run", str(recipe), "train.lr_milestones=[1]", "train.lr_gamma=1e33", "--output-dir", str(run_dir)
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert "loss diverged" in result.stderr and "Traceback" not in result.stderr
    from aaekit.checkpoint import latest_checkpoint

    good = latest_checkpoint(run_dir / "checkpoints")
    assert 20 <= good.state["step"] < 60 and str(good.path) in result.stderr
    assert all(torch.isfinite(t).all() for t in good.model.values())
    assert not (run_dir / "model.safetensors").exists()
