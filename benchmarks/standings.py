"""Where the shipped recipes stand against the paper: the results table of the README and of docs/results.md,
generated from the run rows in ``benchmarks/results/*.jsonl``, so that no figure in it is typed by hand.

    .venv/bin/python benchmarks/standings.py            # print the table and its notes
    .venv/bin/python benchmarks/standings.py --write    # rewrite the README's table between its markers
    .venv/bin/python benchmarks/standings.py --check    # exit 1 when the README's table is not the rows' one

A row counts for an experiment only if it records the recipe it trained (``recipe_values``: the run's
resolved ``recipe.toml``) and that recipe is the one shipped now: both are validated by the current code and
compared key by key, leaving out the keys that say how a run was done rather than what it trains (seed, name,
precision, threads, checkpoints, logging, pictures). So a figure leaves the table as soon as its recipe
changes, until it is re-measured. A row that differs from the shipped recipe only in ``train.max_steps``
(``reproduce.py``'s time budget) counts as a budgeted run and says so. The figure is the mean of every run
that counts, whatever machine or precision it ran on (the recipe is the same); the notes list the runs of
each machine and precision apart.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- standings: begin -->", "<!-- standings: end -->"

# How a run was done, not what it trains: a row may differ from the shipped recipe in these and still count.
HOW_KEYS = {
    "run.name",
    "run.seed",
    "run.threads",
    "run.mixed_precision",
    "run.flush_denormals",
    "run.bf16_master_weights",
    "run.cuda_graphs",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.pictures",
    "train.imbalance_warning_steps",
}
BUDGET_KEYS = {"train.max_steps"}  # a time budget stops the recipe early; the notes say after how many epochs


def _reproduce():
    """benchmarks/reproduce.py: the one list of the paper's experiments (recipe, metric, paper's figure)."""
    spec = importlib.util.spec_from_file_location("bench_reproduce", ROOT / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@dataclass
class Standing:
    experiment: object  # reproduce.Experiment
    groups: list[list[dict]]  # the counted rows, one list per (hardware, precision), the largest first
    extended: list[list[dict]]  # the same for the experiment's extended recipe (none: [])


def flat(values: dict, prefix: str = "") -> dict:
    # not aaekit.runs._flat, which turns lists into strings for the trackers: here lists are compared
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resolved(values: dict, registry) -> dict | None:
    """The recipe ``values`` validated and resolved by the current code, flattened; None if it no longer
    validates (a key renamed or removed since the run: that run is not of the shipped recipe)."""
    from aaekit.recipe import validate

    out, problems = validate(json.loads(json.dumps(values)), registry)
    return None if problems else flat(out)


def differing_keys(row_values: dict, shipped: dict) -> set[str]:
    keys = set(row_values) | set(shipped)
    return {k for k in keys if row_values.get(k) != shipped.get(k)} - HOW_KEYS


def read_rows(results: Path = RESULTS) -> list[dict]:
    rows = []
    for path in sorted(results.glob("*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                row["_source"] = f"{path.name}:{number}"
                rows.append(row)
    return rows


def standings(rows: list[dict] | None = None, recipes: Path = ROOT / "recipes") -> list[Standing]:
    from aaekit.plugins import get_registry

    registry = get_registry()
    rows = read_rows() if rows is None else rows
    return [
        Standing(
            exp,
            counted(exp, exp.recipe, rows, recipes, registry),
            counted(exp, exp.extended, rows, recipes, registry) if exp.extended else [],
        )
        for exp in _reproduce().EXPERIMENTS
    ]


def counted(exp, recipe: str, rows: list[dict], recipes: Path, registry) -> list[list[dict]]:
    """The rows that count for ``recipe`` as it is shipped, one list per (hardware, precision)."""
    from aaekit.recipe import read_toml

    shipped = resolved(read_toml(recipes / recipe), registry)
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row.get("recipe") != Path(recipe).stem or "recipe_values" not in row or row.get("quick"):
            continue
        values = resolved(row["recipe_values"], registry)
        if values is None or differing_keys(values, shipped) - BUDGET_KEYS:
            continue
        if row.get("metric") != exp.metric or score(row, exp) is None:
            continue
        groups.setdefault((row.get("hardware", "?"), row.get("precision", "?")), []).append(row)
    return sorted(groups.values(), key=lambda g: (len(g), max(r.get("date", "") for r in g)), reverse=True)


def score(row: dict, exp) -> float | None:
    """The row's figure in the experiment's unit (% for error rates, nats for the likelihood)."""
    for key in exp.result_keys:
        value = row.get(key)
        if isinstance(value, (int, float)):
            return 100 * value if exp.unit == "%" else float(value)
    return None


def fmt(value: float, exp) -> str:
    if exp.unit != "%":
        return f"{value:.1f}"
    return f"{value:.1f} %" if value >= 10 else f"{value:.2f} %"  # clustering errors move by points


def span(values: list) -> str:
    values = sorted(set(values))
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def figure(group: list[dict], exp) -> str:
    scores = [score(r, exp) for r in group]
    mean = statistics.fmean(scores)
    if len(scores) == 1:
        return f"{fmt(mean, exp)} (1 run)"
    low, high = min(scores), max(scores)
    if fmt(low, exp) == fmt(high, exp):
        return f"**{fmt(mean, exp)}** ({len(scores)} runs, each {fmt(low, exp)})"
    low_high = f"{fmt(low, exp)}-{fmt(high, exp)}".replace(" %-", "-")
    return f"**{fmt(mean, exp)}** ({len(scores)} runs: {low_high})"


def note(group: list[dict], exp) -> str:
    """Every run of one group: seeds, figures, time, how it was run and where."""
    rows = sorted(group, key=lambda r: (str(r.get("seed")), r.get("_source", "")))
    seeds = ("seeds " if len(rows) > 1 else "seed ") + " / ".join(str(r.get("seed", "?")) for r in rows)
    scores = " / ".join(fmt(score(r, exp), exp).replace(" %", "") for r in rows) + (
        " %" if exp.unit == "%" else ""
    )
    extra = ""
    if all(isinstance(r.get("error.majority"), float) for r in rows):
        extra = "; majority vote " + " / ".join(f"{100 * r['error.majority']:.1f}" for r in rows) + " %"
    minutes = span([round(r["train_s"] / 60) for r in rows if isinstance(r.get("train_s"), (int, float))])
    stopped = ""
    short = [r for r in rows if isinstance(r.get("epochs"), int) and r["epochs"] < full_epochs(r)]
    if short:  # a time budget (train.max_steps) ended it before the recipe's last epoch
        epochs = " / ".join(str(r["epochs"]) for r in short)
        stopped = f", stopped by a time budget after {epochs} of its {full_epochs(short[0])} epochs"
    hardware = rows[0].get("hardware", "?")
    precision = {"no": "fp32"}.get(rows[0].get("precision"), rows[0].get("precision", "?"))
    return (
        f"{seeds}: {scores}{extra}; {minutes} min of training a run{stopped}; {hardware}, {precision}; "
        f"{span([r.get('date', '?') for r in rows])}"
    )


def full_epochs(row: dict) -> int:
    return int(flat(row.get("recipe_values", {})).get("train.epochs", 0))


def cell(exp, recipe: str, groups: list[list[dict]], notes: list[str], tag: str) -> str:
    """The table cell of ``recipe``'s counted runs; appends their note (every run) to ``notes``."""
    if not groups:
        return "not measured as shipped"
    notes.append(f"- **`{recipe}`**{tag}: " + "; *and* ".join(note(g, exp) for g in groups) + ".")
    return figure([r for g in groups for r in g], exp)


def table(link_prefix: str = "docs/results.md") -> str:
    """The results table with its notes, as markdown; ``link_prefix`` is where the results page is from the
    file the table goes into."""
    lines = [
        "| experiment | paper | best public | aaekit, as shipped | aaekit, extended |",
        "|---|---|---|---|---|",
    ]
    notes = []
    for standing in standings():
        exp = standing.experiment
        name = f"[{exp.label}]({link_prefix}#{exp.section})"
        ours = cell(exp, exp.recipe, standing.groups, notes, "")
        extended = cell(exp, exp.extended, standing.extended, notes, " (extended)") if exp.extended else "—"
        if exp.extended:
            extended += f" (`{exp.extended}`)"
        lines.append(f"| {name} | {exp.paper} | {exp.public} | {ours} | {extended} |")
    return "\n".join(
        [
            *lines,
            "",
            "Each figure is the mean of the recorded runs of the recipe exactly as it is shipped now (any "
            "seed; error rates on the 10,000 test images, the clustering ones by the paper's protocol), "
            "generated by `benchmarks/standings.py` from `benchmarks/results/*.jsonl`. A recipe changed "
            "since its runs shows *not measured as shipped* until it is re-measured. *As shipped* is the "
            "paper's model; *extended* is a recipe of its own that departs from the paper through a plugin "
            "(`plugins/aaekit-extensions`), named in the cell. The runs:",
            "",
            *notes,
        ]
    )


def readme_block(text: str) -> tuple[int, int]:
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        raise SystemExit(f"{README}: the markers {BEGIN} and {END} are missing; put them around the table")
    return begin + len(BEGIN), end


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="rewrite the README's table")
    action.add_argument("--check", action="store_true", help="exit 1 if the README's table is out of date")
    opts = parser.parse_args(argv)
    generated = table()
    if not (opts.write or opts.check):
        print(generated)
        return 0
    text = README.read_text(encoding="utf-8")
    begin, end = readme_block(text)
    if opts.check:
        if text[begin:end].strip() != generated.strip():
            print(
                f"{README}: the results table is not what the rows give; run benchmarks/standings.py --write"
            )
            return 1
        return 0
    README.write_text(text[:begin] + "\n" + generated + "\n" + text[end:], encoding="utf-8")
    print(f"wrote the results table into {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
