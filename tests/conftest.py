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
    "train.max_steps=4", "train.log_every=2", "train.batch_size=20",
    "encoder.hidden=[32]", "decoder.hidden=[32]", "data.limit=400",
]


def tiny_code_overrides(recipe_values: dict) -> list[str]:
    return [f"codes.{c}.discriminator.hidden=[16]" for c in recipe_values.get("codes", {})]


def aaekit(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process, exactly as a user would (``python -m aaekit``)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "aaekit", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_run_args(recipe: str, run_dir: Path, *extra: str) -> list[str]:
    import tomllib

    values = tomllib.loads((ROOT / recipe).read_text())
    return ["run", str(ROOT / recipe), *TINY, *tiny_code_overrides(values), *extra, "--output-dir", str(run_dir)]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; reset them so each in-process run starts clean."""
    yield
    try:
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    except Exception:
        pass
