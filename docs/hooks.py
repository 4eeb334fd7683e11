"""MkDocs hooks: the parts of the documentation that must not drift are generated from the code at build time.

A hand-written page holds a marker line such as ``<!-- generated: recipe-reference -->``; ``on_page_markdown``
replaces it with what the generator of that name returns:

- ``recipe-reference``: every core recipe key (``aaekit.recipe.CORE``) and every key of every registered
  component (``Registered.cls.params``), with its type, default, range and help;
- ``cli-reference``: every command, argument and option of the click group ``aaekit.cli.cli``;
- ``shipped-recipes``: every file in ``recipes/`` with the first sentence of its leading comment;
- ``resumable-keys``: the recipe keys that ``aaekit run --resume`` lets change;
- ``reproduction-tables`` and ``throughput-tables``: the reports in ``benchmarks/results/``;
- ``standings``: the results table of the README, from the run rows in ``benchmarks/results/*.jsonl``.

An unknown marker, a core table that has no place in the reference, or a report that cannot be read fails the
build. ``tests/test_docs.py`` imports this file to check that nothing is left out.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"<!-- generated: ([a-z0-9-]+) -->")

# Where each core table of aaekit.recipe.CORE sits in a recipe. A new core table must be placed here, or the
# build fails (and so the suite): the reference cannot silently leave it out.
CORE_TABLES = {
    "run": "[run]",
    "data": "[data]",
    "encoder": "[encoder]",
    "decoder": "[decoder]",
    "code": "[codes.NAME]",
    "discriminator": "[codes.NAME.discriminator]",
    "optim": "[optim.PHASE]",
    "train": "[train]",
}
# Where each kind of component is named, and the core keys its table shares with the component's own.
KIND_TABLES = {
    "dataset": ("[data]", "data"),
    "posterior": ("[encoder]", "encoder"),
    "prior": ("[codes.NAME.prior]", None),
    "head": ("[heads.KEY]", None),
}


class GenerationError(Exception):
    """A generated page cannot be built; the build stops with this message."""


# ---- MkDocs events -----------------------------------------------------------------------------------------
def on_page_markdown(markdown: str, page, config, files) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise GenerationError(
                f"{page.file.src_uri}: unknown generated block {name!r}; known: "
                f"{', '.join(sorted(GENERATORS))}"
            )
        return GENERATORS[name]()

    return MARKER.sub(replace, markdown)


# ---- small formatting helpers ------------------------------------------------------------------------------
def cell(text: Any) -> str:
    """Text that is safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def code(text: Any) -> str:
    """A code span for a table cell (a pipe inside a code span does not split the cell)."""
    return "`" + str(text).replace("\n", " ").replace("`", "'").strip() + "`"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def type_name(t: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list"}.get(
        t, getattr(t, "__name__", str(t))
    )


# ---- the recipe reference ----------------------------------------------------------------------------------
def param_row(key: str, param) -> str:
    types = param.type if isinstance(param.type, tuple) else (param.type,)
    kind = " or ".join(type_name(t) for t in types)
    if param.item is not None:
        kind = kind.replace("list", f"list of {type_name(param.item)}")
    default = "**required**" if param.required else code(toml_value(param.default))
    limits = []
    if param.choices:
        limits.append("one of " + ", ".join(code(toml_value(c)) for c in param.choices))
    if param.min is not None:
        limits.append(f"≥ {param.min:g}" + (" (each item)" if param.item is not None else ""))
    if param.max is not None:
        limits.append(f"≤ {param.max:g}" + (" (each item)" if param.item is not None else ""))
    if param.min_len is not None:
        limits.append(f"at least {param.min_len} item(s)")
    if param.check is not None:
        limits.append("further rule (see help)")
    return (
        f"| {code(key)} | {cell(kind)} | {default} | {'; '.join(limits) or '—'} | {cell(param.help) or '—'} |"
    )


def param_table(params: dict) -> list[str]:
    lines = ["| key | type | default | range | help |", "|---|---|---|---|---|"]
    lines += [param_row(key, param) for key, param in params.items()]
    return lines


def recipe_reference() -> str:
    from aaekit.plugins import KINDS, get_registry
    from aaekit.recipe import CORE, PHASES

    unplaced = sorted(set(CORE) - set(CORE_TABLES))
    if unplaced:
        raise GenerationError(
            f"docs/hooks.py: core recipe table(s) {unplaced} have no place in the recipe "
            "reference; add them to CORE_TABLES"
        )
    unknown_kinds = sorted(set(KINDS) - set(KIND_TABLES))
    if unknown_kinds:
        raise GenerationError(
            f"docs/hooks.py: component kind(s) {unknown_kinds} have no table; add them to KIND_TABLES"
        )
    registry = get_registry()
    out = [
        "## Core keys",
        "",
        "The engine's own keys, whatever components a recipe names. `NAME` is a code's name (`z`, `y`, ...), "
        f"`PHASE` one of {', '.join(f'`{p}`' for p in PHASES)}, `KEY` a head's key.",
        "",
    ]
    for table, params in CORE.items():
        out += [f"### `{CORE_TABLES[table]}` {{#core-{table}}}", ""]
        if table in ("data", "encoder"):
            kind = "dataset" if table == "data" else "posterior"
            out += [
                f"Besides these, the table takes the keys of the {kind} it names "
                f"([{kind}s](#{kind}s) below).",
                "",
            ]
        out += param_table(params) + [""]
    out += [
        "### `[codes.NAME.prior]` and `[heads.KEY]` {#core-prior-head}",
        "",
        "Each takes `name` (**required**, a string: the registered prior or head) and that component's keys.",
        "",
    ]

    for kind in KINDS:
        table, _ = KIND_TABLES[kind]
        entries = sorted(registry.components[kind].items())
        out += [
            f"## {kind.capitalize()}s {{#{kind}s}}",
            "",
            f"Named by `name` in `{table}`; the keys below go in the same table.",
            "",
        ]
        if not entries:
            out += ["None registered.", ""]
        for name, entry in entries:
            out += [f"### `{name}` {{#{kind}-{name.replace('_', '-')}}}", ""]
            doc = " ".join((entry.cls.__doc__ or "").strip().split("\n\n")[0].split())
            source = f"From `{entry.distribution}` {entry.version}."
            out += [f"{doc} {source}".strip(), ""]
            params = dict(getattr(entry.cls, "params", {}) or {})
            out += (param_table(params) if params else ["No keys of its own."]) + [""]
    broken = registry.broken
    if broken:
        out += ['!!! warning "Plugins that failed to load while this page was built"', ""]
        out += [f"    - `{b.plugin}` ({b.distribution}): {cell(b.error)}" for b in broken] + [""]
    return "\n".join(out)


def recipe_keys() -> list[str]:
    """Every documented key as TABLE.KEY (for the docs test): core keys and every component's keys."""
    from aaekit.plugins import KINDS, get_registry
    from aaekit.recipe import CORE

    keys = [f"{CORE_TABLES[t].strip('[]')}.{k}" for t, params in CORE.items() for k in params]
    registry = get_registry()
    for kind in KINDS:
        for name, entry in registry.components[kind].items():
            keys += [f"{kind}:{name}.{k}" for k in (getattr(entry.cls, "params", {}) or {})]
    return keys


def recipe_summary(path: Path) -> str:
    """The first sentence of a recipe file's leading comment."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    return (match.group(1) if match else text) or "(no leading comment)"


def shipped_recipes() -> str:
    out = ["| recipe | what it is (its leading comment) |", "|---|---|"]
    for path in sorted((ROOT / "recipes").glob("*.toml")):
        out.append(f"| `recipes/{path.name}` | {cell(recipe_summary(path))} |")
    return "\n".join(out)


def resumable_keys() -> str:
    """The keys ``--resume`` lets change, read from wherever the engine keeps them."""
    import importlib

    for module in ("aaekit.engine", "aaekit.runs"):
        try:
            keys = getattr(importlib.import_module(module), "RESUMABLE_CHANGES", None)
        except ImportError:
            keys = None
        if keys:
            return ", ".join(f"`{k}`" for k in sorted(keys))
    raise GenerationError(
        "docs/hooks.py: RESUMABLE_CHANGES is no longer in aaekit.engine or aaekit.runs; "
        "tell resumable_keys() where it went"
    )


# ---- the CLI reference -------------------------------------------------------------------------------------
def clean_help(text: str | None) -> list[str]:
    """click's help text as markdown paragraphs: ``\\b`` blocks (kept as they are) become code blocks."""
    import inspect

    paragraphs = inspect.cleandoc(text or "").split("\n\n")
    out = []
    for para in paragraphs:
        if para.startswith("\b\n"):
            out += ["```text", para[2:], "```", ""]
        else:
            out += [" ".join(para.split()), ""]
    return out


def command_section(command, ctx, level: int) -> list[str]:
    import click

    path = ctx.command_path
    out = [f"{'#' * level} `{path}` {{#{path.replace(' ', '-')}}}", ""]
    usage = " ".join([path, *command.collect_usage_pieces(ctx)])
    out += ["```text", f"Usage: {usage}", "```", ""]
    out += clean_help(command.help)
    arguments = [p for p in command.get_params(ctx) if isinstance(p, click.Argument)]
    options = [p for p in command.get_params(ctx) if isinstance(p, click.Option)]
    if arguments:
        out += ["| argument | required | takes |", "|---|---|---|"]
        for arg in arguments:
            takes = "any number" if arg.nargs == -1 else str(arg.nargs)
            out.append(f"| `{arg.human_readable_name}` | {'yes' if arg.required else 'no'} | {takes} |")
        out.append("")
    if options:
        out += ["| option | what it does |", "|---|---|"]
        for option in options:
            record = option.get_help_record(ctx)
            if record is None:
                continue
            flags, help_text = record
            out.append(f"| {code(flags)} | {cell(help_text) or '—'} |")
        out.append("")
    return out


def cli_reference() -> str:
    import click

    from aaekit.cli import cli

    root = click.Context(cli, info_name="aaekit")
    out = command_section(cli, root, 2)
    for name in cli.list_commands(root):
        command = cli.get_command(root, name)
        out += command_section(command, click.Context(command, info_name=name, parent=root), 2)
    return "\n".join(out)


def cli_surface() -> dict[str, list[str]]:
    """Every command and the flags of its options (for the docs test)."""
    import click

    from aaekit.cli import cli

    root = click.Context(cli, info_name="aaekit")
    surface = {
        "aaekit": [
            f for p in cli.get_params(root) if isinstance(p, click.Option) for f in p.opts + p.secondary_opts
        ]
    }
    for name in cli.list_commands(root):
        command = cli.get_command(root, name)
        ctx = click.Context(command, info_name=name, parent=root)
        surface[f"aaekit {name}"] = [
            f
            for p in command.get_params(ctx)
            if isinstance(p, click.Option)
            for f in p.opts + p.secondary_opts
        ]
    return surface


# ---- benchmark reports -------------------------------------------------------------------------------------
def report_files() -> list[Path]:
    return sorted(p for p in RESULTS.iterdir() if p.suffix in (".json", ".jsonl"))


def read_report(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except (OSError, ValueError) as exc:
        raise GenerationError(f"{path.relative_to(ROOT)}: cannot be read as JSON ({exc})") from None


def file_date(path: Path) -> str:
    match = re.search(r"\d{4}-\d{2}-\d{2}", path.name)
    return match.group(0) if match else ""


def number(value: Any, digits: int = 1) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—" if value is None else cell(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def report_kind(data: Any) -> str:
    if isinstance(data, list):
        return "rows"
    if (
        isinstance(data, dict)
        and data.get("benchmark") == "reproduce"
        and isinstance(data.get("experiments"), list)
    ):
        return "reproduce"
    if (
        isinstance(data, dict)
        and data.get("benchmark") == "throughput"
        and isinstance(data.get("results"), dict)
    ):
        return "throughput"
    if (
        isinstance(data, dict)
        and isinstance(data.get("runs"), list)
        and str(data.get("benchmark", "")).startswith("parzen")
    ):
        return "parzen-sigma"
    return "other"


def reproduce_section(path: Path, data: dict) -> list[str]:
    when = data.get("finished") or file_date(path) or "undated"
    title = f"{data.get('hardware', 'unrecorded hardware')}, {when}"
    out = [
        f"### {cell(title)}",
        "",
        f"`{path.relative_to(ROOT)}`: {cell(data.get('budget', ''))}"
        + (" (a `--quick` smoke run)" if data.get("quick") else "")
        + ".",
        "",
    ]
    out += [
        "| experiment | paper | aaekit | train time | steps (epochs) | status |",
        "|---|---|---|---|---|---|",
    ]
    for e in data["experiments"]:
        unit, value, error = e.get("unit", ""), e.get("aaekit"), e.get("standard_error")
        if isinstance(value, (int, float)):
            shown = (
                (f"{value:.1f}" if unit == "nats" else f"{value:.2f}")
                + (f" ± {error:.1f}" if isinstance(error, (int, float)) else "")
                + f" {unit}"
            )
        else:
            shown = "—"
        epochs = f" ({e['epochs']})" if e.get("epochs") is not None else ""
        train = f"{e['train_s']:.0f} s" if isinstance(e.get("train_s"), (int, float)) else "—"
        out.append(
            f"| {cell(e.get('table') or e.get('experiment', '?'))} | {cell(e.get('paper', '—'))} | "
            f"{cell(shown.strip())} | {train} | {number(e.get('steps'))}{epochs} | "
            f"{cell(e.get('status', '—'))} |"
        )
    if data.get("note"):
        out += ["", f"Note recorded with the report: {cell(data['note'])}"]
    return out + [""]


def throughput_section(path: Path, data: dict) -> list[str]:
    machine = data.get("machine", {}) or {}
    device = machine.get("gpu") or machine.get("cpu") or "unrecorded hardware"
    out = [f"### {cell(device)}, {file_date(path) or 'undated'} (`{path.stem}`)", ""]
    facts = [f"`{path.relative_to(ROOT)}`"]
    if machine.get("gpu"):
        facts.append(f"host CPU {machine.get('cpu', '?')}")
    if machine.get("torch_threads") is not None:
        facts.append(
            f"{machine['torch_threads']} torch threads on {machine.get('logical_cpus', '?')} logical CPUs"
        )
    if machine.get("torch"):
        facts.append(f"torch {machine['torch']}")
    if machine.get("load_average_at_start"):
        facts.append(f"load average {machine['load_average_at_start'][0]:.1f} at the start")
    setting = data.get("setting", {}) or {}
    if setting.get("rounds"):
        facts.append(
            f"{setting['rounds']} alternating rounds of {setting.get('steps_per_round', '?')} steps, "
            f"{setting.get('statistic', 'medians')}"
        )
    out += [
        "; ".join(cell(f) for f in facts) + (" (a `--quick` smoke run)" if data.get("quick") else "") + ".",
        "",
    ]
    out += [
        "| contender | samples/s | step | GFLOP/s | matmul ceiling (GFLOP/s) | of ceiling |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in data["results"].items():
        if not isinstance(r, dict):
            continue
        fraction = r.get("fraction_of_ceiling")
        out.append(
            f"| {code(name)} | {number(r.get('samples_per_s'), 0)} | {number(r.get('step_ms'))} ms | "
            f"{number(r.get('gflops'), 0)} | {number(r.get('ceiling_gflops'), 0)} | "
            f"{f'{fraction:.0%}' if isinstance(fraction, (int, float)) else '—'} |"
        )
    speedups = {k: v for k, v in (data.get("speedups") or {}).items() if isinstance(v, (int, float))}
    if speedups:
        out += [
            "",
            "Speed-ups (medians): " + ", ".join(f"{code(k)} {v:.2f}x" for k, v in speedups.items()) + ".",
        ]
    return out + [""]


def parzen_sigma_section(path: Path, data: dict) -> list[str]:
    out = [
        f"### {cell(data.get('benchmark', path.stem))}",
        "",
        f"`{path.relative_to(ROOT)}`: {cell(data.get('hardware', 'unrecorded hardware'))}, "
        f"{cell(data.get('date', file_date(path)))}; {cell(data.get('recipe', ''))}.",
        "",
        "| run | steps (epochs) | train time | grid σ → nats | fine σ → nats |",
        "|---|---|---|---|---|",
    ]

    def scored(r: dict, prefix: str) -> str:
        ll, se, sigma = (r.get(f"{prefix}_{k}") for k in ("log_likelihood", "standard_error", "sigma"))
        if not isinstance(ll, (int, float)):
            return "—"
        return f"{sigma} → {ll:.1f}" + (f" ± {se:.1f}" if isinstance(se, (int, float)) else "")

    for r in data["runs"]:
        train = f"{r['train_s']:.0f} s" if isinstance(r.get("train_s"), (int, float)) else "—"
        out.append(
            f"| {cell(r.get('what', r.get('run', '?')))} | {number(r.get('steps'))} ({r.get('epochs', '?')}) "
            f"| {train} | {scored(r, 'grid')} | {scored(r, 'fine')} |"
        )
    return out + [""]


def rows_section(path: Path, rows: list) -> list[str]:
    out = [
        f"### `{path.name}`",
        "",
        f"`{path.relative_to(ROOT)}` ({file_date(path) or 'undated'}), one line per run:",
        "",
    ]
    columns: list[str] = []
    for row in rows:
        for key, value in row.items() if isinstance(row, dict) else ():
            if key not in columns and not isinstance(value, (dict, list)) and key not in ("run",):
                columns.append(key)
    if not columns:
        return out + ["(no rows)", ""]
    out += ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        values = []
        for c in columns:
            v = row.get(c) if isinstance(row, dict) else None
            if c.startswith("error.") and isinstance(v, float):
                values.append(f"{v:.1%}")
            elif isinstance(v, float):
                values.append(number(v, 1))
            else:
                values.append(cell("—" if v is None else v))
        out.append("| " + " | ".join(values) + " |")
    return out + [""]


def other_section(path: Path, data: Any) -> list[str]:
    out = [
        f"### `{path.name}`",
        "",
        f"`{path.relative_to(ROOT)}`, a report of a shape this page does not tabulate; its top-level values:",
        "",
    ]
    if isinstance(data, dict):
        out += [f"- {code(k)}: {cell(v)}" for k, v in data.items() if not isinstance(v, (dict, list))]
    return out + [""]


def reports(kinds: tuple[str, ...]) -> list[tuple[Path, Any, str]]:
    found = []
    for path in report_files():
        data = read_report(path)
        kind = report_kind(data)
        if kind in kinds:
            found.append((path, data, kind))
    # newest first; files of one day keep their names' order
    return sorted(
        found,
        key=lambda item: (
            (item[1].get("finished", "") if isinstance(item[1], dict) else "") or file_date(item[0])
        ),
        reverse=True,
    )


def reproduction_tables() -> str:
    out = []
    for path, data, kind in reports(("reproduce", "parzen-sigma", "rows", "other")):
        section = {
            "reproduce": reproduce_section,
            "parzen-sigma": parzen_sigma_section,
            "rows": rows_section,
            "other": other_section,
        }[kind]
        out += section(path, data)
    return "\n".join(out) if out else "No reports in `benchmarks/results/` yet."


def standings() -> str:
    """The README's results table, from the run rows (benchmarks/standings.py), linking within this page."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("bench_standings", ROOT / "benchmarks" / "standings.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module.table(link_prefix="")


def throughput_tables() -> str:
    out = []
    for path, data, _ in reports(("throughput",)):
        out += throughput_section(path, data)
    return "\n".join(out) if out else "No throughput reports in `benchmarks/results/` yet."


GENERATORS = {
    "recipe-reference": recipe_reference,
    "shipped-recipes": shipped_recipes,
    "resumable-keys": resumable_keys,
    "cli-reference": cli_reference,
    "reproduction-tables": reproduction_tables,
    "throughput-tables": throughput_tables,
    "standings": standings,
}
