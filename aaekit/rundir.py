"""Run directories: chosen so that no earlier run is ever overwritten, and the resolved recipe kept."""

from __future__ import annotations

import tomllib
from pathlib import Path

from aaekit.errors import RecipeError, UserError
from aaekit.recipe import Recipe


def is_run(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def choose_run_dir(recipe: Recipe, output_dir: str | None, resume: bool) -> Path:
    """``--output-dir`` is the run directory itself; by default runs/<run.name>, or runs/<name>-2, -3, ...
    when that holds an earlier run (never overwritten). Decided identically on every rank."""
    if output_dir:
        path = Path(output_dir)
        if resume and not is_run(path):
            raise UserError(f"--resume: {path} holds no run to resume; run without --resume to start it")
        if not resume and is_run(path):
            raise UserError(f"--output-dir {path}: already holds a run; pass --resume to continue it, "
                            "or choose another --output-dir (nothing was overwritten)")
        return path
    base = Path("runs") / recipe.values["run"]["name"]
    if resume:
        if not is_run(base):
            raise UserError(f"--resume: {base} holds no run to resume; run without --resume to start it "
                            "(or give the run's folder with --output-dir)")
        return base
    path, n = base, 1
    while is_run(path):
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def check_resumable(recipe: Recipe, run_dir: Path, allowed: set[str]) -> None:
    """A resumed run must train the same model: only keys in ``allowed`` may differ from the stored recipe."""
    stored_path = run_dir / "recipe.toml"
    try:
        stored = tomllib.loads(stored_path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"{stored_path}: missing or unreadable ({exc}); cannot check what is being resumed") from None
    changed = [k for k in differences(stored, recipe.values) if k not in allowed]
    if changed:
        raise RecipeError([f"{recipe.path}: {k}: differs from the run being resumed ({stored_path}); "
                           "resume with the same value or start a new run" for k in changed])
