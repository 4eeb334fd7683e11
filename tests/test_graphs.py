"""run.cuda_graphs where there is no GPU: "on" is one clear error, "auto" changes nothing, and the step with
its host work moved out (what a recording needs) trains exactly as before. The replay itself is checked in
tests/test_gpu.py, which needs a GPU."""

from __future__ import annotations

import pytest
import torch

from conftest import aaekit, prepared_trainer, two_code_recipe

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU side; tests/test_gpu.py")


def test_cuda_graphs_on_without_a_gpu_is_one_clear_error(tmp_path):
    recipe = two_code_recipe(
        tmp_path / "r.toml", data={"limit": 200}, train={"max_steps": 2, "batch_size": 20}
    )
    run_dir = tmp_path / "run"
    out = aaekit("run", str(recipe), "run.cuda_graphs=on", "--output-dir", str(run_dir))
    assert out.returncode == 2, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "run.cuda_graphs" in errors[0] and "need a CUDA device" in errors[0] and '"auto"' in errors[0]
    assert not (run_dir / "metrics.jsonl").exists()  # refused before training: nothing written


def test_cuda_graphs_auto_on_a_cpu_says_why_and_trains_the_same_weights(tmp_path):
    recipe = two_code_recipe(
        tmp_path / "r.toml",
        data={"limit": 200, "labelled": 40},
        train={"max_steps": 6, "batch_size": 20, "log_every": 3},
    )
    runs = {}
    for setting in ("off", "auto"):
        runs[setting] = tmp_path / setting
        out = aaekit("run", str(recipe), f"run.cuda_graphs={setting}", "--output-dir", str(runs[setting]))
        assert out.returncode == 0, out.stderr[-3000:]
        said = "cuda graphs: off (they need a CUDA device and this run is on cpu)" in out.stdout
        assert said == (setting == "auto"), out.stdout
    off, auto = (runs[s] / "model.safetensors" for s in ("off", "auto"))
    assert off.read_bytes() == auto.read_bytes()


def test_the_classification_phase_takes_the_labelled_stream_in_order(tmp_path):
    """The step takes its labelled rows as an argument (drawn outside, for a recording); drawn inside or
    passed in, the same rows in the same order train the same weights."""
    recipe = two_code_recipe(
        tmp_path / "r.toml", data={"limit": 200, "labelled": 40}, train={"batch_size": 20}
    )
    inside, outside = (prepared_trainer(recipe, tmp_path / n, []) for n in ("inside", "outside"))
    for _ in range(3):
        inside.train_step(inside.batches.take(20))
        outside.train_step(*outside.next_batch())
    assert outside.labelled_batches.position == inside.labelled_batches.position == 60 % 40
    for (name, a), b in zip(inside.model.state_dict().items(), outside.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert outside.step == outside.train_step  # no GPU: the eager step


def test_an_unknown_setting_names_the_choices(tmp_path):
    recipe = two_code_recipe(tmp_path / "r.toml", data={"limit": 200})
    out = aaekit("validate", str(recipe), "run.cuda_graphs=yes")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "run.cuda_graphs" in out.stderr and "auto" in out.stderr, out.stderr


def test_fp16_on_a_cpu_is_refused_rather_than_run_in_fp32(tmp_path):
    recipe = two_code_recipe(
        tmp_path / "r.toml", data={"limit": 200}, train={"max_steps": 2, "batch_size": 20}
    )
    out = aaekit("run", str(recipe), "run.mixed_precision=fp16", "--output-dir", str(tmp_path / "run"))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert 'run.mixed_precision: "fp16" needs a GPU' in out.stderr and '"bf16"' in out.stderr, out.stderr
