"""The paper's tables, reproduced by one command: each experiment's recipe trained under a time budget, then
evaluated with `aaekit eval`, as a user would run them.

    .venv/bin/python benchmarks/reproduce.py --minutes 30     # every experiment that has a recipe
    .venv/bin/python benchmarks/reproduce.py --minutes 1 --only likelihood
    .venv/bin/python benchmarks/reproduce.py --minutes 15 --set run.mixed_precision=bf16
    .venv/bin/python benchmarks/reproduce.py --quick          # tiny nets, a few steps: checks the pipeline
    .venv/bin/python benchmarks/reproduce.py --seeds 4 --only cluster16   # mean and spread over run.seed 0..3
    .venv/bin/python benchmarks/reproduce.py --extended --only cluster16  # its extended recipe instead

The budget is turned into `train.max_steps` from a short timed run of the same recipe (its logged samples/s).
Experiments whose recipe does not exist are listed as skipped, with the reason.
Writes benchmarks/results/reproduce.json and benchmarks/results/reproduce.md, and appends one line per run
(its recipe included) to benchmarks/results/reproduce-runs.jsonl, from which benchmarks/standings.py makes
the results table; the runs go under runs/reproduce/ (--runs DIR elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AAEKIT_CACHE_DIR", str(ROOT / ".cache" / "aaekit"))


@dataclass
class Experiment:
    key: str
    table: str
    recipe: str
    paper: str
    metric: str  # the `aaekit eval --metric` that scores it
    result_keys: tuple[str, ...]  # where the number is in the eval JSON, first present wins
    unit: str
    eval_args: tuple[str, ...] = ()
    overrides: tuple[str, ...] = field(default_factory=tuple)
    label: str = ""  # the row's name in the results table (benchmarks/standings.py)
    section: str = ""  # its section on docs/results.md
    public: str = "—"  # the best public reproduction's figure, as far as this project knows
    extended: str = ""  # a recipe of its own that departs from the paper (a plugin), reported beside this one


LEDGER = "reproduce-runs.jsonl"  # every run of every reproduction, appended; standings.py reads it
ERROR_KEYS = ("error",)  # `aaekit eval --metric classification`: a fraction
CLUSTER_KEYS = ("error.paper", "error")  # `--metric clustering`: the paper's protocol first
EXPERIMENTS = [
    Experiment(
        "likelihood",
        "Table 1: Parzen log-likelihood, MNIST test (10K samples)",
        "gaussian.toml",
        "340 ± 2",
        "parzen",
        ("log_likelihood",),
        "nats",
        label="Likelihood, Parzen (Table 1), nats",
        section="likelihood",
        public="340 after 2000 epochs (σ chosen on training images)",
    ),
    Experiment(
        "semisupervised_100",
        "Table 2: semi-supervised error, 100 labels",
        "semisupervised_100.toml",
        "1.90 ± 0.10 %",
        "classification",
        ERROR_KEYS,
        "%",
        label="Semi-supervised, 100 labels (Table 2)",
        section="semi-supervised-classification",
        public="~5 %",
        extended="semisupervised_100_augmented.toml",
    ),
    Experiment(
        "semisupervised_1000",
        "Table 2: semi-supervised error, 1000 labels",
        "semisupervised_1000.toml",
        "1.60 ± 0.08 %",
        "classification",
        ERROR_KEYS,
        "%",
        label="Semi-supervised, 1000 labels (Table 2)",
        section="semi-supervised-classification",
        public="2.9 % (with 1280 labels)",
    ),
    Experiment(
        "semisupervised_all",
        "Table 2: supervised error, all labels",
        "semisupervised_all.toml",
        "0.85 ± 0.02 %",
        "classification",
        ERROR_KEYS,
        "%",
        label="Supervised, all labels (Table 2)",
        section="semi-supervised-classification",
    ),
    Experiment(
        "cluster16",
        "Table 3: clustering error, 16 clusters",
        "cluster16.toml",
        "9.55 %",
        "clustering",
        CLUSTER_KEYS,
        "%",
        label="Clustering, 16 clusters (Table 3)",
        section="clustering",
        public="worse than the paper",
        extended="cluster16_augmented.toml",
    ),
    Experiment(
        "cluster30",
        "Table 3: clustering error, 30 clusters",
        "cluster30.toml",
        "4.10 ± 1.13 %",
        "clustering",
        CLUSTER_KEYS,
        "%",
        label="Clustering, 30 clusters (Table 3)",
        section="clustering",
        public="worse than the paper",
        extended="cluster30_augmented.toml",
    ),
    Experiment(
        "dimred2d",
        "§7: 2-D dimensionality reduction, unsupervised (error)",
        "dimred2d.toml",
        "~13.5 %",
        "clustering",
        CLUSTER_KEYS,
        "%",
        label="2-D reduction, unsupervised (§7)",
        section="dimensionality-reduction",
        public="~40 %",
        extended="dimred2d_augmented.toml",
    ),
    Experiment(
        "dimred2d_1000",
        "§7: 2-D dimensionality reduction, 1000 labels (error)",
        "dimred2d_1000.toml",
        "—",
        "classification",
        ERROR_KEYS,
        "%",
        label="2-D reduction, 1000 labels (§7)",
        section="dimensionality-reduction",
    ),
    Experiment(
        "dimred2d_100",
        "§7: 2-D dimensionality reduction, 100 labels (error)",
        "dimred2d_100.toml",
        "—",
        "classification",
        ERROR_KEYS,
        "%",
        label="2-D reduction, 100 labels (§7)",
        section="dimensionality-reduction",
    ),
]

# --quick: tiny nets, a few steps, a cheap evaluation; checks the pipeline, not the numbers.
QUICK_OVERRIDES = [
    "train.batch_size=20",
    "data.validation=0",
    "encoder.hidden=[32]",
    "decoder.hidden=[32]",
    "data.limit=400",
    "train.pictures=false",
    "train.checkpoint_every=0",
]
QUICK_EVAL = {
    "parzen": ["-n", "200", "--validation-size", "100", "--test-limit", "200", "--sigmas", "0.1,0.2,0.4"],
    "classification": ["--test-limit", "200"],
    "clustering": ["--test-limit", "200"],
}


def aaekit(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aaekit", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def tiny_code_overrides(recipe_path: Path) -> list[str]:
    import tomllib

    codes = tomllib.loads(recipe_path.read_text()).get("codes", {})
    return [f"codes.{c}.discriminator.hidden=[16]" for c in codes]


def last_record(run_dir: Path) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def train(recipe: Path, overrides: list[str], run_dir: Path) -> tuple[float, str]:
    start = time.perf_counter()
    out = aaekit("run", str(recipe), *overrides, "--output-dir", str(run_dir))
    if out.returncode != 0:
        raise RuntimeError(
            f"aaekit run failed (exit {out.returncode}): {(out.stderr or out.stdout).strip()[-600:]}"
        )
    return time.perf_counter() - start, out.stdout


def budget_steps(recipe: Path, overrides: list[str], minutes: float, work: Path) -> tuple[int, float]:
    """Steps that fit in the budget, from a short timed run of the same recipe (its steady samples/s)."""
    from aaekit.recipe import load_recipe

    batch = load_recipe(recipe, overrides).values["train"]["batch_size"]
    calib = work / "calibration"
    wall, _ = train(
        recipe,
        [
            *overrides,
            "train.max_steps=30",
            "train.log_every=10",
            "train.checkpoint_every=0",
            "train.pictures=false",
        ],
        calib,
    )
    samples_per_s = last_record(calib)["samples_per_s"]
    # The budget is wall time: what the calibration spent outside its 30 steps (start-up, data) is spent
    # again.
    fixed = max(0.0, wall - 30 * batch / samples_per_s)
    return max(1, int((minutes * 60 - fixed) * samples_per_s / batch)), samples_per_s


def pick_number(result: dict, keys: tuple[str, ...]) -> tuple[str | None, float | None]:
    for k in keys:
        if isinstance(result.get(k), (int, float)):
            return k, float(result[k])
    return None, None


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (GPU)"
    return f"{cpu}, {torch.get_num_threads()} threads (CPU)"


def run_experiment(exp: Experiment, opts, out_root: Path, seed: int | None = None) -> dict:
    """One training run and its evaluation; ``seed`` (with --seeds) overrides the recipe's run.seed."""
    recipe = ROOT / "recipes" / exp.recipe
    row = {
        "experiment": exp.key,
        "table": exp.table,
        "recipe": f"recipes/{exp.recipe}",
        "paper": exp.paper,
        "unit": exp.unit,
    }
    if not recipe.exists():
        return {**row, "status": "skipped", "reason": f"recipes/{exp.recipe} does not exist yet"}
    metric = exp.metric
    work = out_root / (exp.key if seed is None else f"{exp.key}-seed{seed}")
    overrides = [*exp.overrides, *opts.overrides, *([] if seed is None else [f"run.seed={seed}"])]
    if opts.quick:
        overrides += (
            QUICK_OVERRIDES + tiny_code_overrides(recipe) + ["train.max_steps=6", "train.log_every=3"]
        )
        steps, calibrated = 6, None
    else:
        steps, calibrated = budget_steps(recipe, overrides, opts.minutes, work)
        overrides += [f"train.max_steps={steps}"]
    try:
        seconds, _ = train(recipe, overrides, work / "run")
        eval_args = ["eval", str(work / "run"), "--metric", metric, *exp.eval_args]
        if opts.quick:
            eval_args += QUICK_EVAL.get(metric, [])
        started = time.perf_counter()
        out = aaekit(*eval_args)
        eval_seconds = time.perf_counter() - started
        if out.returncode != 0:
            raise RuntimeError(
                f"aaekit eval failed (exit {out.returncode}): {(out.stderr or out.stdout).strip()[-600:]}"
            )
        result = json.loads(out.stdout[out.stdout.index("{") : out.stdout.rindex("}") + 1])
    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
        return {**row, "status": "failed", "reason": str(exc)}
    key, number = pick_number(result, exp.result_keys)
    if number is not None and exp.unit == "%":
        number *= 100  # eval reports error as a fraction
    record = last_record(work / "run")
    # The budget caps the steps; a recipe whose epochs end sooner stops there, as shipped.
    return {
        **row,
        "status": "ok",
        "metric": metric,
        "aaekit": number,
        "result_key": key,
        "standard_error": result.get("standard_error"),
        "steps": record.get("step", steps),
        "step_cap": steps,
        "epochs": record.get("epoch"),
        "calibrated_samples_per_s": calibrated,
        "train_s": round(seconds, 1),
        "eval_s": round(eval_seconds, 1),
        "run_dir": shown(work / "run"),
        "overrides": overrides,
        "eval": result,
    }


def ledger_row(row: dict, run_dir: Path, machine: str, quick: bool) -> dict:
    """One finished run as a line of ``reproduce-runs.jsonl``: its figure, how long it trained, where, and the
    recipe it trained (the run's resolved recipe.toml), which is how ``benchmarks/standings.py`` tells whether
    the figure is still of the recipe as shipped."""
    import tomllib

    values = tomllib.loads((run_dir / "recipe.toml").read_text(encoding="utf-8"))
    return {
        "recipe": Path(row["recipe"]).stem,
        "seed": values["run"]["seed"],
        "train_s": round(row["train_s"]),
        "epochs": row["epochs"],
        "precision": values["run"]["mixed_precision"],
        "hardware": machine,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "name": f"{row['experiment']} ({row['run_dir']})",
        "quick": quick,
        **{k: v for k, v in row["eval"].items() if k != "run"},
        "recipe_values": values,
    }


def shown(path: Path) -> str:
    """A path as the report gives it: relative to the repository where it lies inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def combine_seeds(runs: list[dict]) -> dict:
    """One row for an experiment trained with several seeds: the mean of their numbers, their sample standard
    deviation and each seed's run; failed if any seed failed."""
    if len(runs) == 1 or all(r["status"] == "skipped" for r in runs):
        return runs[0]
    failed = [r for r in runs if r["status"] != "ok"]
    if failed:
        return {**failed[0], "reason": "; ".join(f"seed {r['seed']}: {r['reason']}" for r in failed)}
    numbers = [r["aaekit"] for r in runs]
    per_seed = ("seed", "aaekit", "steps", "epochs", "train_s", "eval_s", "run_dir", "eval")
    return {
        **{k: v for k, v in runs[0].items() if k not in per_seed},
        "aaekit": statistics.mean(numbers),
        "seeds_std": statistics.stdev(numbers),
        "standard_error": None,
        "steps": round(statistics.mean(r["steps"] for r in runs)),
        "epochs": runs[0]["epochs"],
        "train_s": statistics.mean(r["train_s"] for r in runs),
        "seeds": [{k: r[k] for k in per_seed} for r in runs],
    }


def markdown(report: dict) -> str:
    lines = [
        f"Budget: {report['budget']}; hardware: {report['hardware']}; {report['finished']}.",
        "",
        "| experiment | paper | aaekit | train time | steps (epochs) | hardware |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["experiments"]:
        if r["status"] == "ok":
            se = f" ± {r['standard_error']:.1f}" if isinstance(r.get("standard_error"), (int, float)) else ""
            value = (
                f"{r['aaekit']:.2f}{se} {r['unit']}"
                if r["aaekit"] is not None
                else "(no number in eval output)"
            )
            if "seeds" in r:
                value += (
                    f" (mean of {len(r['seeds'])} seeds, sd {r['seeds_std']:.2f}: "
                    + " / ".join(f"{s['aaekit']:.2f}" for s in r["seeds"])
                    + ")"
                )
            lines.append(
                f"| {r['table']} | {r['paper']} | {value} | {r['train_s']:.0f} s | "
                f"{r['steps']} ({r['epochs']}) | {report['hardware']} |"
            )
        else:
            lines.append(f"| {r['table']} | {r['paper']} | {r['status']}: {r['reason']} | — | — | — |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget per experiment")
    parser.add_argument(
        "--only",
        action="append",
        choices=[e.key for e in EXPERIMENTS],
        help="run only this experiment (repeatable)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny nets and a few steps: checks the pipeline")
    parser.add_argument(
        "--extended",
        action="store_true",
        help="train each chosen experiment's extended recipe (aaekit-extensions) instead; those without one "
        "are left out",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="experiments trained at the same time (e.g. 8 on one large GPU)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for every experiment, e.g. run.mixed_precision=bf16 (repeatable)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="train each experiment with run.seed = 0..N-1 and report the mean and spread",
    )
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--runs",
        type=Path,
        default=ROOT / "runs" / "reproduce",
        help="where the runs go, one folder per reproduction (default: runs/reproduce)",
    )
    opts = parser.parse_args(argv)
    if opts.minutes <= 0:
        parser.error("--minutes must be positive")
    if opts.seeds < 1:
        parser.error("--seeds must be at least 1")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    runs_root = opts.runs.resolve()
    out_root = runs_root / stamp
    n = 1
    while out_root.exists():  # never reuse an earlier reproduction's folder
        n += 1
        out_root = runs_root / f"{stamp}-{n}"
    chosen = [e for e in EXPERIMENTS if not opts.only or e.key in opts.only]
    if opts.extended:  # the same experiment, its figure counted in the extended column (standings.py)
        chosen = [replace(e, recipe=e.extended) for e in chosen if e.extended]
        if not chosen:
            parser.error("--extended: none of the chosen experiments has an extended recipe")
    if opts.overrides:  # a mistyped --set fails here, before any training, with the recipe's own message
        from aaekit.errors import UserError
        from aaekit.recipe import load_recipe

        for exp in chosen:
            if (ROOT / "recipes" / exp.recipe).exists():
                try:
                    load_recipe(ROOT / "recipes" / exp.recipe, [*exp.overrides, *opts.overrides])
                except UserError as exc:
                    parser.error(f"--set: {exc}")
    rows: dict[str, dict] = {}
    budget = (
        "quick (tiny nets, 6 steps)" if opts.quick else f"{opts.minutes:g} min of training per experiment"
    )
    if opts.parallel > 1:
        budget += f", {opts.parallel} at a time"
    if opts.seeds > 1:
        budget += f", seeds 0-{opts.seeds - 1}"
    if opts.overrides:
        budget += f", with {' '.join(opts.overrides)}"
    if opts.extended:
        budget += ", the extended recipes"
    lock = threading.Lock()
    machine = hardware()

    def write_report() -> dict:
        """Rewritten after every experiment, so an interrupted reproduction keeps what finished."""
        done = [rows[e.key] for e in chosen if e.key in rows]
        report = {
            "benchmark": "reproduce",
            "quick": opts.quick,
            "budget": budget,
            "hardware": machine,
            "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "runs": shown(out_root),
            "experiments": done,
        }
        opts.results.mkdir(parents=True, exist_ok=True)
        for name, text in (
            ("reproduce.json", json.dumps(report, indent=2) + "\n"),
            ("reproduce.md", markdown(report)),
        ):
            tmp = opts.results / (name + ".tmp")
            tmp.write_text(text)
            tmp.replace(opts.results / name)
        return report

    seeds = [None] if opts.seeds == 1 else list(range(opts.seeds))
    finished: dict[str, list[dict]] = {e.key: [] for e in chosen}

    def one(job: tuple[Experiment, int | None]) -> None:
        exp, seed = job
        name = exp.key if seed is None else f"{exp.key} seed {seed}"
        print(f"[{name}] ...", flush=True)
        row = {**run_experiment(exp, opts, out_root, seed), "seed": seed}
        detail = (
            f"{row['aaekit']} {row['unit']} in {row['train_s']} s" if row["status"] == "ok" else row["reason"]
        )
        print(f"[{name}] {row['status']}: {detail}", flush=True)
        with lock:
            if row["status"] == "ok":  # every run, each seed on its own line; never rewritten
                from aaekit.checkpoint import append_line  # a failed write leaves no partial line

                opts.results.mkdir(parents=True, exist_ok=True)
                line = json.dumps(
                    ledger_row(row, ROOT / row["run_dir"], machine, opts.quick), ensure_ascii=False
                )
                append_line(opts.results / LEDGER, line)
            finished[exp.key].append(row)
            # an experiment enters the report once all its seeds have
            if len(finished[exp.key]) == len(seeds):
                rows[exp.key] = combine_seeds(sorted(finished[exp.key], key=lambda r: r["seed"] or 0))
                write_report()

    # Runs are separate processes: on a large GPU several share it well (each alone leaves it idle).
    with ThreadPoolExecutor(max_workers=max(1, opts.parallel)) as pool:
        list(pool.map(one, [(exp, seed) for exp in chosen for seed in seeds]))
    report = write_report()
    print(markdown(report))
    return 1 if any(r["status"] == "failed" for r in report["experiments"]) else 0


if __name__ == "__main__":
    sys.exit(main())
