"""The command line. Imports stay light at module level so ``aaekit --help`` never loads torch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from aaekit import __version__
from aaekit.errors import RecipeError, TrainingStopped, UserError


class AAEKitGroup(click.Group):
    """User mistakes become one readable message and a non-zero exit, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RecipeError as exc:
            for line in exc.problems:
                click.echo(f"error: {line}", err=True)
            click.echo(f"{len(exc.problems)} problem(s) found; nothing was run.", err=True)
            sys.exit(2)
        except TrainingStopped as exc:
            click.echo(f"stopped: {exc}", err=True)
            sys.exit(exc.exit_code)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


def plugins_dir_option(f):
    return click.option(
        "--plugins-dir",
        "plugins_dirs",
        multiple=True,
        type=click.Path(file_okay=False),
        help="Load one-off plugin .py files from this folder (also AAEKIT_PLUGINS_DIR).",
    )(f)


def registry_for(plugins_dirs, warn: bool = True) -> object:
    """The plugin registry; a plugin that failed to load is named in one warning line (its components are
    missing)."""
    from aaekit.plugins import get_registry

    registry = get_registry(list(plugins_dirs))
    if warn:
        for b in registry.broken:
            click.echo(
                f"warning: plugin {b.plugin} ({b.distribution}) failed to load and is skipped: {b.error}",
                err=True,
            )
    return registry


@click.group(cls=AAEKitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="aaekit")
def cli():
    """aaekit: train Adversarial Autoencoders from TOML recipes.

    \b
    aaekit run recipes/gmm_label.toml train.epochs=3
    aaekit validate recipes/*.toml
    aaekit plugins
    """


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--output-dir", type=click.Path(), help="The run directory (default: runs/<run.name>).")
@click.option(
    "--resume", is_flag=True, help="Continue the run in the run directory from its latest checkpoint."
)
@click.option("--log-with", default=None, help="Also log to an Accelerate tracker (tensorboard, wandb, ...).")
@plugins_dir_option
def run(recipe, overrides, output_dir, resume, log_with, plugins_dirs):
    """Train RECIPE; KEY=VALUE overrides (e.g. train.epochs=3 codes.z.prior.std=5) follow it."""
    from aaekit.recipe import load_recipe

    registry = registry_for(plugins_dirs)
    resolved = load_recipe(recipe, list(overrides), registry)
    from aaekit.runs import train

    run_dir = train(resolved, registry, output_dir=output_dir, resume=resume, log_with=log_with)
    if run_dir is not None:
        click.echo(f"run written to {run_dir}")


@cli.command()
@click.argument("recipes", nargs=-1, required=True, metavar="RECIPE... [KEY=VALUE]...")
@plugins_dir_option
def validate(recipes, plugins_dirs):
    """Check recipes completely (every problem at once) without running them; KEY=VALUE overrides apply to
    each, as with `aaekit run`."""
    from aaekit.recipe import load_recipe

    overrides = [a for a in recipes if "=" in a and not Path(a).is_file()]
    paths = [a for a in recipes if a not in overrides]
    if not paths:
        raise UserError(
            "validate: no recipe given; e.g. aaekit validate recipes/gmm_label.toml train.epochs=3"
        )
    registry = registry_for(plugins_dirs)
    problems = []
    for path in paths:
        try:
            load_recipe(path, overrides, registry)
            click.echo(f"ok: {path}")
        except RecipeError as exc:
            problems += exc.problems
        except UserError as exc:
            problems.append(str(exc))
    if problems:
        raise RecipeError(problems)


@cli.command()
@plugins_dir_option
def plugins(plugins_dirs):
    """List every registered component by kind, with the plugin that provides it, and broken plugins."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from aaekit.plugins import KINDS

    registry = registry_for(plugins_dirs, warn=False)  # listed in the table below
    console = Console()
    for kind in KINDS:
        table = Table(title=f"{kind}s", title_justify="left")
        for col in ("name", "distribution", "version", "description"):
            table.add_column(col)
        for name, entry in sorted(registry.components[kind].items()):
            table.add_row(name, entry.distribution, entry.version, escape(entry.summary))
        console.print(table)
    if registry.broken:
        table = Table(title="broken plugins (not loaded)", title_justify="left", style="red")
        for col in ("plugin", "distribution", "error"):
            table.add_column(col)
        for b in registry.broken:
            table.add_row(b.plugin, b.distribution, escape(b.error))
        console.print(table)


def check_parent_folder(option: str, path: Path) -> None:
    """Refuse a file path whose folder is missing or not writable before any work is done."""
    parent = path.parent
    if not parent.is_dir():
        what = "is a file, not a folder" if parent.exists() else "does not exist"
        raise UserError(f"{option} {path}: the folder {parent} {what}; create it or choose another path")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{option} {path}: the folder {parent} is not writable; choose another path")


def parse_floats(option: str, text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(
            f"{option} {text!r}: expected comma-separated numbers, e.g. {option} 0.1,0.2,0.3"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise UserError(f"{option} {text!r}: give one or more positive numbers, e.g. {option} 0.1,0.2,0.3")
    return values


def parse_labels(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(
            f"--labels {text!r}: expected comma-separated class numbers, e.g. --labels 0,1,2"
        ) from None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


checkpoint_option = click.option(
    "--checkpoint",
    default=None,
    metavar="latest|STEP",
    help="Use the weights of a checkpoint under RUN_DIR/checkpoints ('latest', a step number or a folder "
    "name) "
    "instead of the finished model: for an unfinished or crashed run, or a run at an earlier point.",
)

# Metrics of `aaekit eval`: each takes the loaded run and the command's options and returns a JSON-able dict.
EVAL_METRICS = ("parzen", "classification", "clustering")


@cli.command(name="eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--metric",
    type=click.Choice(("auto", *EVAL_METRICS)),
    default="auto",
    show_default=True,
    help="parzen: Parzen-window log-likelihood of the test set (§3), sigma chosen on validation data; "
    "classification: test error of argmax q(y|x) (§5); clustering: test clustering errors (§6). "
    "auto: classification for a model with a classification head, clustering for one with a "
    "categorical code and no labels, else parzen.",
)
@click.option(
    "-n",
    "--num-samples",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="parzen: decoder samples that make the Parzen window.",
)
@click.option(
    "--sigmas", default=None, help="parzen: comma-separated sigma grid (default: 20 values, 0.05 to 1)."
)
@click.option(
    "--refine/--no-refine",
    default=True,
    show_default=True,
    help="parzen: after the grid, choose sigma from a fine grid between the best value's neighbours.",
)
@click.option(
    "--validation-size",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="parzen: training examples held out to choose sigma when the run kept no validation split.",
)
@click.option(
    "--test-limit", type=click.IntRange(min=0), default=0, help="Use only the first N test examples (0: all)."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the decoder samples.")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the JSON to this file (never overwrites an existing one).",
)
@checkpoint_option
@plugins_dir_option
def evaluate(
    run_dir,
    metric,
    num_samples,
    sigmas,
    refine,
    validation_size,
    test_limit,
    seed,
    device,
    output,
    checkpoint,
    plugins_dirs,
):
    """Evaluate the trained model in RUN_DIR; prints the result as JSON."""
    import json

    from aaekit.api import load

    if output and Path(output).exists():
        raise UserError(f"--output {output}: already exists; choose another file (nothing was overwritten)")
    if output:
        check_parent_folder("--output", Path(output))
    run = load(run_dir, device=device or default_device(), plugins_dirs=plugins_dirs, checkpoint=checkpoint)
    if metric == "auto":
        from aaekit.evaluation.labels import default_metric

        metric = default_metric(run)
        click.echo(f"metric: {metric} (chosen from the run's recipe; --metric picks another)", err=True)
    if metric == "parzen":
        from aaekit.evaluation.parzen import DEFAULT_SIGMAS, evaluate_run

        result = evaluate_run(
            run,
            num_samples=num_samples,
            sigmas=parse_floats("--sigmas", sigmas) or DEFAULT_SIGMAS,
            validation_size=validation_size,
            test_limit=test_limit,
            seed=seed,
            refine=refine,
        )
        click.echo(
            f"parzen: {result['log_likelihood']:.2f} ± {result['standard_error']:.2f} nats on "
            f"{result['num_test']} test examples, {result['num_samples']} samples, sigma {result['sigma']:g} "
            f"chosen on {result['num_validation']} validation examples",
            err=True,
        )
        if "warning" in result:
            click.echo(f"warning: {result['warning']}", err=True)
    else:
        from aaekit.evaluation.labels import evaluate_classification, evaluate_clustering

        evaluate_labels = evaluate_classification if metric == "classification" else evaluate_clustering
        result, summary = evaluate_labels(run, test_limit=test_limit)
        click.echo(summary, err=True)
    if checkpoint is not None:
        result["weights"] = str(run.weights_path)
    text = json.dumps(result, indent=1)
    click.echo(text)
    if output:
        try:
            with open(output, "x", encoding="utf-8") as fh:
                fh.write(text + "\n")
        except OSError as exc:
            raise UserError(
                f"--output {output}: cannot be written ({exc.strerror or exc}); the result is printed "
                "above; choose a path in a folder you can write to"
            ) from None


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "-n",
    "--num",
    type=click.IntRange(min=1),
    default=None,
    help="Samples per label (default 10), or in all where there are no labels (default 100); "
    "with --interpolate, the number of walks (default 10).",
)
@click.option(
    "--labels",
    default=None,
    help="Comma-separated labels, one grid column each (default: every class, "
    "where the prior's components are the classes).",
)
@click.option(
    "--interpolate", is_flag=True, help="Decode straight walks between two prior draws, one per row."
)
@click.option(
    "--steps", type=click.IntRange(min=2), default=10, show_default=True, help="Points on each walk."
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="PNG to write (default: RUN_DIR/sampled.png, or RUN_DIR/interpolation.png).",
)
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@checkpoint_option
@plugins_dir_option
def sample(run_dir, num, labels, interpolate, steps, out, force, seed, device, checkpoint, plugins_dirs):
    """Decode prior samples of the model in RUN_DIR into a PNG grid."""
    from aaekit.api import load
    from aaekit.pictures.sampling import write_interpolation, write_samples

    out = Path(out) if out else Path(run_dir) / ("interpolation.png" if interpolate else "sampled.png")
    if out.exists() and not force:
        raise UserError(f"{out}: already exists; pass --force to overwrite it or --out to write elsewhere")
    check_parent_folder("--out", out)
    run = load(run_dir, device=device or default_device(), plugins_dirs=plugins_dirs, checkpoint=checkpoint)
    chosen = parse_labels(labels)
    try:
        if interpolate:
            rows, cols = write_interpolation(run, out, num or 10, steps, chosen, seed)
        else:
            rows, cols = write_samples(run, out, num, chosen, seed)
    except OSError as exc:
        raise UserError(
            f"--out {out}: cannot be written ({exc.strerror or exc}); choose a path in a folder you "
            "can write to"
        ) from None
    click.echo(f"wrote {out} ({rows} x {cols} images)")


def main(prog_name: str | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli.main(prog_name=prog_name or "aaekit")


if __name__ == "__main__":
    main()
