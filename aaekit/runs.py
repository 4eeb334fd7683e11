"""A run's life: its folder (chosen so that no earlier run is ever overwritten), its record (the resolved
recipe and what the model was built from), and training it on every rank of an ``accelerate launch``, resumed
or not."""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from pathlib import Path

import tomllib

from aaekit.errors import RecipeError, TrainingStopped, UserError
from aaekit.recipe import Recipe

# A folder is a run once training has started: it then holds metrics, checkpoints or a finished model. A
# folder left by a run that failed before its first step (a recipe.toml at most) is free to be used again.
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
        raise UserError(
            f"{option} {path}: a file (not a folder) is in the way; choose another folder"
        ) from None
    except NotADirectoryError:
        raise UserError(
            f"{option} {path}: a part of this path is a file, not a folder; choose another folder"
        ) from None
    except OSError as exc:
        raise UserError(
            f"{option} {path}: cannot be created or written ({exc.strerror}); choose a folder you can "
            "write to"
        ) from None


def write_atomically(path: Path, text: str) -> None:
    """Write a small file whole or not at all (a crash mid-write never leaves half a recipe)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def model_record(values: dict, registry, dataset, dataset_entry) -> dict:
    """What the model was built from, kept in the run folder as model.json: a dataset may set its shape per
    instance (from its files), so loading the run must not depend on the dataset again."""
    value_range = getattr(dataset, "value_range", dataset_entry.cls.value_range)
    return {
        "input_shape": list(dataset.input_shape),
        "num_classes": dataset.num_classes,
        "value_range": [float(v) if math.isfinite(v) else None for v in value_range],
        "plugins_dirs": [str(Path(d).resolve()) for d in getattr(registry, "plugin_dirs", [])],
        "components": component_sources(values, registry),
    }


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
        raise UserError(
            f"{path}: unreadable or damaged ({exc}); it records what the model was built from, so "
            "the run cannot be loaded without it; restore it from a backup"
        ) from None
    return {**record, "input_shape": shape}


def trim_metrics(run_dir: Path, step: int) -> int:
    """On resuming from ``step``, the metric lines past it are trained again: move them to
    metrics.replaced.jsonl (kept, never deleted) so that metrics.jsonl holds each step once. Returns how
    many."""
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
            raise UserError(
                f"--output-dir {path}: already holds a run; pass --resume to continue it, "
                "or choose another --output-dir (nothing was overwritten)"
            )
        return path
    base = Path("runs") / recipe.values["run"]["name"]
    if resume:
        if not is_run(base):
            raise UserError(
                f"--resume: {base} holds no run to resume; run without --resume to start it "
                "(or give the run's folder with --output-dir)"
            )
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
        raise UserError(
            f"{stored_path}: missing or unreadable ({exc}); cannot check what is being resumed"
        ) from None
    changed = [k for k in differences(stored, recipe.values) if k not in allowed]
    if changed:
        raise RecipeError(
            [
                f"{recipe.path}: {k}: differs from the run being resumed ({stored_path}); "
                "resume with the same value or start a new run"
                for k in changed
            ]
        )


def train(
    recipe: Recipe,
    registry,
    *,
    output_dir: str | None = None,
    resume: bool = False,
    log_with: str | None = None,
) -> Path | None:
    """From a validated recipe to a finished run directory; every rank calls it."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from aaekit.engine import RESUMABLE_CHANGES

    # A bare PartialState ignores ACCELERATE_USE_CPU (only AcceleratorState reads it), and once created it
    # fixes the process group, so CPU mode must be passed here or a 2-process CPU launch sees one process.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    refuse_lonely_process(state.num_processes)  # before anything is written
    # Every rank checks before any rank creates the directory; rank 0's choice (the -2, -3 suffix) and whether
    # it could create and write the folder are then broadcast, so that all ranks agree (and all stop on a bad
    # path).
    run_dir, problem = choose_run_dir(recipe, output_dir, resume), ""
    if state.is_main_process:
        try:
            make_writable_dir(run_dir, "--output-dir" if output_dir else "run directory")
        except UserError as exc:
            problem = str(exc)
    if state.num_processes > 1:
        text, problem = broadcast_text(state, f"{run_dir}\0{problem}").split("\0", 1)
        run_dir = Path(text)
    if problem:
        raise UserError(problem)
    if resume:
        check_resumable(recipe, run_dir, RESUMABLE_CHANGES)
    if state.is_main_process:
        print(f"run directory: {run_dir}")
    state.wait_for_everyone()
    threads = torch.get_num_threads()
    try:
        run_training(recipe, run_dir, registry, resume=resume, log_with=log_with)
    finally:
        torch.set_num_threads(threads)  # run.threads applies to the run, not to a caller in the same process
    return run_dir if state.is_main_process else None


def run_training(
    recipe: Recipe, run_dir: Path, registry, *, resume: bool = False, log_with: str | None = None
) -> dict:
    """Train a recipe into ``run_dir`` (created by the caller); resume from its latest checkpoint if asked."""
    from aaekit import checkpoint as ckpt
    from aaekit.engine import Trainer
    from aaekit.monitor import is_out_of_memory, out_of_memory_message

    try:
        trainer = Trainer(recipe, run_dir, registry, log_with=log_with)
    except BaseException as exc:  # building the model or holding the data can ask for more than there is
        if is_out_of_memory(exc):
            raise UserError(out_of_memory_message(exc, recipe)) from None
        raise
    acc = trainer.accelerator
    try:
        checkpoint = ckpt.latest_checkpoint(run_dir / "checkpoints", warn=acc.print) if resume else None
        if resume and checkpoint is None:
            acc.print(f"note: no checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
        trainer.prepare(checkpoint)
        if acc.is_main_process:  # training starts now: only from here is the folder a run
            write_run_record(run_dir, recipe, trainer.model_record)
            replaced = trim_metrics(run_dir, trainer.start["step"]) if resume else 0
            if replaced:
                acc.print(
                    f"note: {replaced} metric line(s) past step {trainer.start['step']} are trained again; "
                    "they were moved to metrics.replaced.jsonl"
                )
        acc.wait_for_everyone()
        if log_with:
            acc.init_trackers(recipe.values["run"]["name"], config=_flat(recipe.values))
        result = trainer.fit()
    except TrainingStopped:
        release_ranks(acc)  # every rank stops alike: divergence and stop requests are agreed on at log steps
        raise
    except UserError:
        raise
    except BaseException as exc:
        if is_out_of_memory(exc) and acc.num_processes == 1:
            raise UserError(out_of_memory_message(exc, recipe)) from None
        if acc.num_processes > 1:
            # The other ranks may be waiting in a collective this one will never join. Leaving at once (no
            # barrier, no atexit teardown) lets the launcher see the failure and stop them, instead of a hang.
            print(
                f"rank {acc.process_index}: training failed:\n{traceback.format_exc()}",
                file=sys.stderr,
                flush=True,
            )
            sys.stdout.flush()
            os._exit(1)
        raise
    finally:
        if log_with:
            acc.end_training()
    release_ranks(acc)
    return result


def broadcast_text(state, text: str) -> str:
    """Rank 0's ``text`` on every rank."""
    import torch

    data = text.encode()
    size = torch.tensor([len(data)], device=state.device)
    torch.distributed.broadcast(size, 0)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=state.device)
    if state.is_main_process:
        buf.copy_(torch.tensor(list(data), dtype=torch.uint8))
    torch.distributed.broadcast(buf, 0)
    return bytes(buf.cpu().tolist()).decode()


def release_ranks(acc) -> None:
    """DDP processes can abort at exit unless models are released first. Only then: free_memory runs a
    full gc.collect, seconds on a large heap, for nothing in a single process."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        acc.free_memory()
        acc.wait_for_everyone()


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def component_sources(values: dict, registry) -> dict:
    """Which plugin (distribution, version) provided each component the recipe names, by recipe key."""
    named = {
        "data": ("dataset", values["data"]["name"]),
        "encoder": ("posterior", values["encoder"]["name"]),
        **{f"codes.{c}.prior": ("prior", code["prior"]["name"]) for c, code in values["codes"].items()},
        **{f"heads.{k}": ("head", h["name"]) for k, h in values["heads"].items()},
    }
    out = {}
    for key, (kind, name) in named.items():
        entry = registry.get(kind, name)
        out[key] = {
            "kind": kind,
            "name": name,
            "plugin": entry.plugin,
            "distribution": entry.distribution,
            "version": entry.version,
        }
    return out


def refuse_lonely_process(num_processes: int) -> None:
    """Launched as several processes (WORLD_SIZE > 1) that Accelerate does not join: each would train
    alone."""
    world_env = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_env > 1 and num_processes == 1:
        raise UserError(
            f"WORLD_SIZE={world_env} but Accelerate sees a single process, so each process would train "
            "alone. On CPU use: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N "
            "--num_machines 1 -m aaekit run ...; on GPUs: accelerate launch --multi_gpu ..."
        )
