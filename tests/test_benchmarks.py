"""Smoke tests of the benchmark scripts on a tiny budget: they run and write the JSON they promise.
Speed itself is measured by the scripts, never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_throughput_quick_writes_every_figure(tmp_path):
    output = tmp_path / "throughput.json"
    out = run_script("throughput.py", "--quick", "--output", str(output))
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report["quick"] is True
    assert {"cpu", "torch_threads", "torch", "accelerate", "python"} <= set(report["machine"])
    assert set(report["results"]) == {"aaekit_fp32", "aaekit_bf16", "plain_fp32"}
    for name, r in report["results"].items():
        assert r["samples_per_s"] > 0 and r["flops_per_step"] > 0 and r["ceiling_gflops"] > 0, name
        assert 0 < r["fraction_of_ceiling"], name
        assert len(r["samples_per_s_rounds"]) == report["setting"]["rounds"]
    assert report["results"]["aaekit_fp32"]["matmul_dtypes"] == ["float32"]
    assert "bfloat16" in report["results"]["aaekit_bf16"]["matmul_dtypes"]
    assert {"aaekit_fp32_vs_plain_fp32", "aaekit_bf16_vs_plain_fp32"} <= set(report["speedups"])
    curve = report["bf16_loss_curve"]
    assert len(curve["fp32"]) == len(curve["bf16"]) > 0
    cli = report["cli"]
    assert cli["help_imports_torch"] is False  # `aaekit --help` must stay light
    assert cli["run_start_to_first_step_s"] > 0 and cli["run_peak_rss_mib"] > 0
    sizes = [e["train_size"] for e in report["epoch_scaling"]]
    assert sizes == sorted(sizes) and all(e["epoch_s"] > 0 for e in report["epoch_scaling"])
    assert "samples/s" in out.stdout


def test_reproduce_quick_trains_and_evaluates_likelihood(tmp_path):
    # one experiment keeps it short; the others differ only in their recipe and metric name
    out = run_script("reproduce.py", "--quick", "--only", "likelihood", "--results", str(tmp_path))
    assert out.returncode == 0, (out.stdout + out.stderr)[-2000:]
    report = json.loads((tmp_path / "reproduce.json").read_text())
    rows = {r["experiment"]: r for r in report["experiments"]}
    assert set(rows) == {"likelihood"}
    for r in rows.values():
        assert r["status"] in ("ok", "skipped"), r
        assert r["status"] == "ok" or r["reason"]
    likelihood = rows["likelihood"]
    if (ROOT / "recipes" / "gaussian.toml").exists() and likelihood["status"] == "ok":
        assert isinstance(likelihood["aaekit"], float) and likelihood["metric"] == "parzen"
        assert (ROOT / likelihood["run_dir"] / "model.safetensors").exists()
    table = (tmp_path / "reproduce.md").read_text()
    assert "| experiment | paper | aaekit |" in table and "340" in table
