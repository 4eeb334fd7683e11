"""Shared test helpers: offline hub, one MNIST cache for the whole suite, the CLI as users run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AAEKIT_CACHE_DIR", str(ROOT / ".cache" / "aaekit"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))

# Small networks and a few steps: tests check behaviour, not quality. Prefixed to any short run.
TINY = [
    "train.max_steps=4",
    "train.log_every=2",
    "train.batch_size=20",
    "encoder.hidden=[32]",
    "decoder.hidden=[32]",
    "data.limit=400",
]


def two_code_recipe(path: Path, **tables: dict) -> Path:
    """Write the §5 model in miniature (categorical y + Gaussian z, each with a discriminator, a classifier
    head) on MNIST; ``tables`` are merged in (``data={"limit": 400}``, ``encoder={...}``)."""
    from aaekit.recipe import dump_toml

    values = {
        "run": {"seed": 3},
        "data": {"name": "mnist"},
        "encoder": {"name": "deterministic", "hidden": [16]},
        "decoder": {"hidden": [16]},
        "codes": {
            "y": {
                "kind": "categorical",
                "dim": 10,
                "prior": {"name": "categorical"},
                "discriminator": {"hidden": [16]},
            },
            "z": {"dim": 2, "prior": {"name": "gaussian"}, "discriminator": {"hidden": [16]}},
        },
        "heads": {"cls": {"name": "classifier", "code": "y"}},
        "train": {"pictures": False},
    }
    for table, changes in tables.items():
        values.setdefault(table, {}).update(changes)
    path.write_text(dump_toml(values))
    return path


def prepared_trainer(recipe, run_dir, overrides: list[str]):
    """A Trainer built from a recipe file with overrides and prepared from scratch, as `aaekit run` builds
    it."""
    from aaekit.engine import Trainer
    from aaekit.plugins import get_registry
    from aaekit.recipe import load_recipe

    registry = get_registry()
    trainer = Trainer(load_recipe(recipe, overrides, registry), run_dir, registry)
    trainer.prepare(None)
    return trainer


def tiny_code_overrides(recipe_values: dict) -> list[str]:
    return [f"codes.{c}.discriminator.hidden=[16]" for c in recipe_values.get("codes", {})]


def aaekit(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in this process (click's runner): the same code, exit codes and output as a user's
    shell gets, without paying a fresh interpreter and torch import per call. Exceptions that the CLI does
    not turn into a message appear as a traceback on stderr, exactly where a user would see one.
    ``PYTHONPATH`` in ``env`` is applied to ``sys.path`` for the call (entry points are re-read from it)."""
    import traceback

    from click.testing import CliRunner

    from aaekit import plugins
    from aaekit.cli import cli

    env = dict(env or {})
    extra_paths = [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = extra_paths
    before = os.getcwd()
    os.chdir(cwd or ROOT)
    plugins.reset()
    try:
        result = CliRunner().invoke(cli, list(args), env=env, prog_name="aaekit")
    finally:
        os.chdir(before)
        del sys.path[: len(extra_paths)]
        plugins.reset()
        reset_accelerate()
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "Traceback (most recent call last):\n" + "".join(
            traceback.format_exception(result.exception)
        )
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, stderr)


def aaekit_process(
    *args: str,
    cwd: Path | None = None,
    env: dict | None = None,
    timeout: int = 600,
    file_size_limit: int | None = None,
) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter (``python -m aaekit``): only for what needs a process of its own
    (a real kill, the import footprint, the module entry point, a limit on the size of files it writes)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "aaekit", *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit_file_size(file_size_limit),
    )


def limit_file_size(limit: int | None):
    """A ``preexec_fn`` that makes writing past ``limit`` bytes fail with EFBIG ("File too large"), as a full
    disk or a quota would (Python ignores SIGXFSZ, so the write raises OSError): a real failed write, even for
    root, whom permissions do not stop."""
    if limit is None:
        return None

    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def tiny_run_args(recipe: str, run_dir: Path, *extra: str) -> list[str]:
    import tomllib

    values = tomllib.loads((ROOT / recipe).read_text())
    return [
        "run",
        str(ROOT / recipe),
        *TINY,
        *tiny_code_overrides(values),
        *extra,
        "--output-dir",
        str(run_dir),
    ]


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; reset them so each in-process run starts clean."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    if "accelerate" in sys.modules:
        reset_accelerate()
