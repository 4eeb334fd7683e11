"""Run directories: chosen so that no earlier run is ever overwritten, and the resolved recipe kept."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

from aaekit.errors import RecipeError, UserError
from aaekit.recipe import Recipe


# A folder is a run once training has started: it then holds metrics, checkpoints or a finished model. A folder
# left by a run that failed before its first step (a recipe.toml at most) is free to be used again.
RUN_MARKERS = ("metrics.jsonl", "checkpoints", "model.safetensors")
MODEL_RECORD = "model.json"  # what the model was built from, so that loading a run never needs its data


def is_run(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in RUN_MARKERS)


def make_writable_dir(path: Path, option: str) -> None:
    """Create the run directory (and its parents) and prove it can be written, before any training starts."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".aaekit-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except FileExistsError:
        raise UserError(f"{option} {path}: a file (not a folder) is in the way; choose another folder") from None
    except NotADirectoryError:
        raise UserError(f"{option} {path}: a part of this path is a file, not a folder; choose another "
                        "folder") from None
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot be created or written ({exc.strerror}); choose a folder you can "
                        "write to") from None


def write_atomically(path: Path, text: str) -> None:
    """Write a small file whole or not at all (a crash mid-write never leaves half a recipe)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_run_record(run_dir: Path, recipe: Recipe, model_record: dict) -> None:
    """The resolved recipe and the model record, written once training is about to start (never by a failed
    start or a refused resume)."""
    write_atomically(run_dir / "recipe.toml", recipe.dumps())
    write_atomically(run_dir / MODEL_RECORD, json.dumps(model_record, indent=1) + "\n")


def read_model_record(run_dir: Path) -> dict | None:
    """The run's model record, or None for a run written before aaekit kept one."""
    path = run_dir / MODEL_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        shape = tuple(int(v) for v in record["input_shape"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: unreadable or damaged ({exc}); it records what the model was built from, so "
                        "the run cannot be loaded without it; restore it from a backup") from None
    return {**record, "input_shape": shape}


def trim_metrics(run_dir: Path, step: int) -> int:
    """On resuming from ``step``, the metric lines past it are trained again: move them to
    metrics.replaced.jsonl (kept, never deleted) so that metrics.jsonl holds each step once. Returns how many."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    kept, replaced = [], []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            later = json.loads(line).get("step", 0) > step
        except ValueError:  # a line cut short by a crash: not a record
            later = True
        (replaced if later else kept).append(line)
    if replaced:
        with open(run_dir / "metrics.replaced.jsonl", "a", encoding="utf-8") as fh:
            fh.writelines(line if line.endswith("\n") else line + "\n" for line in replaced)
        write_atomically(path, "".join(kept))
    return len(replaced)


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
