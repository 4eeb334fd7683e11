"""Smoke tests of the benchmark scripts on a tiny budget: they run and write the JSON they promise.
Speed itself is measured by the scripts, never asserted here. The scripts run in this process (their
``main``), so the suite pays no extra interpreter start-up for them; their own subprocesses stay real."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import ROOT, aaekit


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_throughput_quick_writes_every_figure(tmp_path, capsys):
    output = tmp_path / "throughput.json"
    assert script("throughput").main(["--quick", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["quick"] is True
    assert {"cpu", "torch_threads", "torch", "accelerate", "python"} <= set(report["machine"])
    assert set(report["results"]) == {"aaekit_fp32", "aaekit_bf16", "aaekit_bf16_autocast", "plain_fp32"}
    for name, r in report["results"].items():
        assert r["samples_per_s"] > 0 and r["flops_per_step"] > 0 and r["ceiling_gflops"] > 0, name
        assert 0 < r["fraction_of_ceiling"], name
        assert len(r["samples_per_s_rounds"]) == report["setting"]["rounds"]
    assert report["results"]["aaekit_fp32"]["matmul_dtypes"] == ["float32"]
    for name, r in report["results"].items():  # where the time goes: every category, adding up to the step
        split = r["time_breakdown"]["ms_per_step"]
        assert set(split) == {"matmul", "optimizer", "casts", "data", "other_ops", "autograd", "python"}, name
        assert all(v >= 0 for v in split.values()) and split["matmul"] > 0 and split["optimizer"] > 0, (
            name,
            split,
        )
        # the operators' own (self) times are disjoint spans of the profiled steps: together at most the step
        # ("python", the rest, is what remains of it; counting a span's children in it as well would exceed
        # it)
        measured = sum(v for category, v in split.items() if category != "python")
        assert measured <= 1.01 * r["time_breakdown"]["profiled_step_ms"], (name, split, r["time_breakdown"])
    assert report["results"]["plain_fp32"]["time_breakdown"]["ms_per_step"]["data"] > 0  # its DataLoader
    # an index, no loader
    assert report["results"]["aaekit_fp32"]["time_breakdown"]["ms_per_step"]["data"] == 0
    assert "bfloat16" in report["results"]["aaekit_bf16"]["matmul_dtypes"]
    assert {"aaekit_fp32_vs_plain_fp32", "aaekit_bf16_vs_plain_fp32"} <= set(report["speedups"])
    curve = report["bf16_loss_curve"]
    assert len(curve["fp32"]) == len(curve["bf16"]) > 0
    cli = report["cli"]
    assert cli["help_imports_torch"] is False  # `aaekit --help` must stay light
    assert cli["run_start_to_first_step_s"] > 0 and cli["run_peak_rss_mib"] > 0
    long_runs = report["long_runs"]  # real `aaekit run`s with and without denormal flushing
    assert set(long_runs) == {"flush", "no_flush"}
    for run in long_runs.values():
        assert run["steps"][-1] == 12 and len(run["steps"]) == len(run["samples_per_s"]) >= 2
        assert all(v > 0 for v in run["samples_per_s"])
    sizes = [e["train_size"] for e in report["epoch_scaling"]]
    assert sizes == sorted(sizes) and all(e["epoch_s"] > 0 for e in report["epoch_scaling"])
    assert "samples/s" in capsys.readouterr().out


def test_reproduce_quick_trains_and_evaluates_likelihood(tmp_path, capsys):
    reproduce = script("reproduce")
    reproduce.aaekit = aaekit  # the real CLI, in this process (the script itself starts `python -m aaekit`)
    # one experiment keeps it short; the others differ only in their recipe and metric name
    args = ["--quick", "--only", "likelihood", "--results", str(tmp_path), "--runs", str(tmp_path / "runs")]
    assert reproduce.main(args) == 0, capsys.readouterr()
    report = json.loads((tmp_path / "reproduce.json").read_text())
    (row,) = report["experiments"]
    assert row["experiment"] == "likelihood" and row["status"] == "ok", row
    assert isinstance(row["aaekit"], float) and row["metric"] == "parzen"
    assert Path(row["run_dir"]).is_relative_to(tmp_path / "runs")  # --runs: the suite leaves nothing in runs/
    assert (ROOT / row["run_dir"] / "model.safetensors").exists()
    last = json.loads((ROOT / row["run_dir"] / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["steps"] == last["step"] and row["step_cap"] == 6  # the steps taken, beside the budget's cap
    table = (tmp_path / "reproduce.md").read_text()
    assert "| experiment | paper | aaekit |" in table and "340" in table


def test_reproduce_extended_trains_the_extended_recipe_and_its_ledger_row_says_so(tmp_path, capsys):
    reproduce = script("reproduce")
    reproduce.aaekit = aaekit
    args = ["--quick", "--extended", "--results", str(tmp_path), "--runs", str(tmp_path / "runs")]
    assert reproduce.main([*args, "--only", "cluster16"]) == 0, capsys.readouterr()
    (row,) = json.loads((tmp_path / "reproduce.json").read_text())["experiments"]
    assert row["status"] == "ok" and row["recipe"] == "recipes/cluster16_augmented.toml", row
    (ledger,) = [json.loads(line) for line in (tmp_path / "reproduce-runs.jsonl").read_text().splitlines()]
    assert ledger["recipe"] == "cluster16_augmented"
    assert ledger["recipe_values"]["heads"]["consistency"]["name"] == "augmentation_consistency"
    with pytest.raises(SystemExit):  # the likelihood has no extended recipe: nothing to run is an error
        reproduce.main([*args, "--only", "likelihood"])
    assert "none of the chosen experiments has an extended recipe" in capsys.readouterr().err


def test_reproduce_parallel_keeps_the_table_order_and_every_row(tmp_path):
    """--parallel 2: two experiments train at once, as separate `python -m aaekit` processes; the report lists
    both in the table's order whichever finished first."""
    reproduce = script("reproduce")
    chosen = ["semisupervised_all", "likelihood"]  # given out of table order on purpose
    args = ["--quick", "--parallel", "2", "--results", str(tmp_path), "--runs", str(tmp_path / "runs")] + [
        a for k in chosen for a in ("--only", k)
    ]
    assert reproduce.main(args) == 0
    report = json.loads((tmp_path / "reproduce.json").read_text())
    assert [r["experiment"] for r in report["experiments"]] == ["likelihood", "semisupervised_all"]
    assert all(r["status"] == "ok" and isinstance(r["aaekit"], float) for r in report["experiments"])
    assert "2 at a time" in report["budget"]


def test_reproduce_seeds_reports_the_mean_and_every_seed(tmp_path):
    """--seeds 2: the experiment is trained with run.seed 0 and 1 (two runs, two folders) and the table gives
    the mean of their numbers with each seed's."""
    import statistics

    import tomllib

    reproduce = script("reproduce")
    assert (
        reproduce.main(
            [
                "--quick",
                "--seeds",
                "2",
                "--only",
                "cluster16",
                "--results",
                str(tmp_path),
                "--runs",
                str(tmp_path / "runs"),
            ]
        )
        == 0
    )
    (row,) = json.loads((tmp_path / "reproduce.json").read_text())["experiments"]
    assert row["status"] == "ok" and [s["seed"] for s in row["seeds"]] == [0, 1]
    numbers = [s["aaekit"] for s in row["seeds"]]
    assert row["aaekit"] == pytest.approx(statistics.mean(numbers))
    assert row["seeds_std"] == pytest.approx(statistics.stdev(numbers))
    for s in row["seeds"]:
        saved = tomllib.loads((ROOT / s["run_dir"] / "recipe.toml").read_text())
        assert saved["run"]["seed"] == s["seed"]
    assert len({s["run_dir"] for s in row["seeds"]}) == 2
    assert "mean of 2 seeds" in (tmp_path / "reproduce.md").read_text()
    # every run is also a line of the ledger, with the recipe it trained, for benchmarks/standings.py
    ledger = [json.loads(line) for line in (tmp_path / "reproduce-runs.jsonl").read_text().splitlines()]
    assert sorted(r["seed"] for r in ledger) == [0, 1] and all(r["quick"] for r in ledger)
    for r, s in zip(sorted(ledger, key=lambda r: r["seed"]), row["seeds"]):
        assert r["recipe_values"] == tomllib.loads((ROOT / s["run_dir"] / "recipe.toml").read_text())
        assert r["error.paper"] == pytest.approx(s["aaekit"] / 100) and r["recipe"] == "cluster16"


def test_the_readme_results_table_is_what_the_run_rows_give(capsys):
    """No figure in the README's table is typed by hand: it is benchmarks/standings.py's output."""
    assert script("standings").main(["--check"]) == 0, capsys.readouterr().out


def test_a_run_counts_for_the_table_only_while_its_recipe_is_the_one_shipped():
    """A row counts when its recipe, validated by today's code, equals the shipped one but for how it was run
    (seed, precision, threads); a changed schedule, a key that no longer exists or a --quick run does not; a
    time budget counts and is said."""
    import copy

    from aaekit.recipe import read_toml

    standings = script("standings")
    shipped = read_toml(ROOT / "recipes" / "cluster16.toml")

    def row(error: float, seed: int, **changes) -> dict:
        values = copy.deepcopy(shipped)
        for dotted, value in changes.items():
            table, key = dotted.split("__")
            values.setdefault(table, {})[key] = value
        values["run"]["seed"] = seed
        return {
            "recipe": "cluster16",
            "metric": "clustering",
            "error.paper": error,
            "error.majority": error,
            "seed": seed,
            "train_s": 600,
            "epochs": values["train"]["epochs"],
            "hardware": "a CPU",
            "precision": "no",
            "date": "2026-12-02",
            "recipe_values": values,
        }

    counted = [
        row(0.20, 0),
        row(0.30, 1, run__mixed_precision="bf16", run__threads=1, train__pictures=False),
        {**row(0.40, 2, train__max_steps=50), "epochs": 5},  # a budget stopped it after 5 epochs
    ]
    ignored = [
        row(0.01, 3, train__epochs=2),  # another schedule
        row(0.01, 4, encoder__no_such_key=1),  # a key today's code does not know: not this recipe
        {**row(0.01, 5), "quick": True},
        {**row(0.01, 6), "recipe": "cluster30"},
    ]
    (standing,) = [s for s in standings.standings(counted + ignored) if s.experiment.key == "cluster16"]
    assert [sorted(r["seed"] for r in g) for g in standing.groups] == [[0, 1, 2]]
    assert standings.figure(standing.groups[0], standing.experiment) == "**30.0 %** (3 runs: 20.0-40.0 %)"
    same = standings.figure([row(0.2, 0), row(0.2, 1)], standing.experiment)
    assert same == "**20.0 %** (2 runs, each 20.0 %)"
    note = standings.note(standing.groups[0], standing.experiment)
    assert "seeds 0 / 1 / 2: 20.0 / 30.0 / 40.0 %" in note
    assert "stopped by a time budget after 5 of its 40 epochs" in note
    (other,) = [s for s in standings.standings(ignored) if s.experiment.key == "cluster16"]
    assert other.groups == []

    # the extended recipe's runs go to a column of their own, never into the faithful one
    assert standing.experiment.extended == "cluster16_augmented.toml"
    augmented = read_toml(ROOT / "recipes" / "cluster16_augmented.toml")
    extended = {**row(0.10, 7), "recipe": "cluster16_augmented", "recipe_values": augmented}
    not_augmented = {**row(0.05, 8), "recipe": "cluster16_augmented"}  # its name, without its head
    (both,) = [
        s for s in standings.standings([*counted, extended, not_augmented]) if s.experiment.key == "cluster16"
    ]
    assert [sorted(r["seed"] for r in g) for g in both.groups] == [[0, 1, 2]]
    assert [[r["seed"] for r in g] for g in both.extended] == [[7]]


def test_step_ab_times_both_trees_and_refuses_a_tree_without_aaekit(tmp_path, capsys):
    from conftest import two_code_recipe

    recipe = two_code_recipe(
        tmp_path / "r.toml", data={"limit": 200, "labelled": 40}, train={"batch_size": 20}
    )
    bench = script("step_ab")
    assert bench.main([str(ROOT), str(ROOT), "--recipe", str(recipe), "--steps", "3", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[: out.index("\n}\n") + 2])
    assert len(report["rounds"]) == 2 and set(report["rounds"][0]) == {"before", "after"}
    assert all(r[t]["median_ms"] > 0 for r in report["rounds"] for t in ("before", "after"))
    assert report["after_over_before"] > 0 and "after/before" in out
    # a folder that holds no aaekit would measure the installed one: refused, not timed
    with pytest.raises(SystemExit, match="imported aaekit from"):
        bench.main([str(tmp_path), str(ROOT), "--recipe", str(recipe), "--steps", "3", "--rounds", "1"])
