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
        "--plugins-dir", "plugins_dirs", multiple=True, type=click.Path(file_okay=False),
        help="Load one-off plugin .py files from this folder (also AAEKIT_PLUGINS_DIR).",
    )(f)


def registry_for(plugins_dirs) -> "object":
    from aaekit.plugins import get_registry

    return get_registry(list(plugins_dirs))


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
@click.option("--output-dir", type=click.Path(file_okay=False), help="The run directory (default: runs/<run.name>).")
@click.option("--resume", is_flag=True, help="Continue the run in the run directory from its latest checkpoint.")
@click.option("--log-with", default=None, help="Also log to an Accelerate tracker (tensorboard, wandb, ...).")
@plugins_dir_option
def run(recipe, overrides, output_dir, resume, log_with, plugins_dirs):
    """Train RECIPE; KEY=VALUE overrides (e.g. train.epochs=3 codes.z.prior.std=5) follow it."""
    from aaekit.recipe import load_recipe

    registry = registry_for(plugins_dirs)
    resolved = load_recipe(recipe, list(overrides), registry)
    from aaekit.training import train

    run_dir = train(resolved, registry, output_dir=output_dir, resume=resume, log_with=log_with)
    if run_dir is not None:
        click.echo(f"run written to {run_dir}")


@cli.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
@plugins_dir_option
def validate(recipes, plugins_dirs):
    """Check recipes completely (every problem at once) without running them."""
    from aaekit.recipe import load_recipe

    registry = registry_for(plugins_dirs)
    problems = []
    for path in recipes:
        try:
            load_recipe(path, [], registry)
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

    registry = registry_for(plugins_dirs)
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


def main(prog_name: str | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli.main(prog_name=prog_name or "aaekit")


if __name__ == "__main__":
    main()
