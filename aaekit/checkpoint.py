"""Checkpoints that load without executing code: tensors in safetensors, everything else in JSON.

Each checkpoint is a folder ``checkpoints/step-NNNNNNNN`` written under a temporary name and renamed
into place, so an interrupted write never leaves a folder ``--resume`` would pick. ``state.json`` is
written last and names every file with its size, so a truncated or corrupt file is detected on load.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from aaekit.errors import UserError

PREFIX = "step-"
KEEP = 3  # checkpoints kept by default (train.keep_checkpoints)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    except SafetensorError as exc:
        # safetensors reports a failed write (disk full, file too large) as its own error, not as OSError
        tmp.unlink(missing_ok=True)
        raise OSError(f"{tmp.name}: {exc}") from None
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json(obj, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def append_line(path: Path, line: str) -> None:
    """Append one line to a text file; a failed write cuts the file back to its old length (no partial line
    left behind) and raises."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    except OSError:
        try:
            os.truncate(path, size)
        except OSError:
            pass  # the file as it was could not even be restored; the error raised says why
        raise


def load_tensors(path: Path, what: str = "weights") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: {what} file not found; was the run finished (or checkpointed)?")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(
            f"{path}: corrupt or unreadable safetensors file ({exc}); "
            "restore it or retrain (it is not a pickle and will not be loaded as one)"
        ) from None


# --- optimizer state: tensors to safetensors, the rest to JSON ------------------------------------


def optimizer_to_files(name: str, state_dict: dict, tensors: dict) -> dict:
    meta_state = {}
    for index, slots in state_dict["state"].items():
        entry = {}
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{index}/{key}"] = value
                entry[key] = "tensor"
            else:
                entry[key] = value
        meta_state[str(index)] = entry
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        for g in state_dict["param_groups"]
    ]
    return {"state": meta_state, "param_groups": groups}


def optimizer_from_files(name: str, meta: dict, tensors: dict) -> dict:
    state = {}
    for index, slots in meta["state"].items():
        state[int(index)] = {
            key: tensors[f"{name}/{index}/{key}"] if value == "tensor" else value
            for key, value in slots.items()
        }
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# --- checkpoint folders ------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    path: Path
    state: dict
    model: dict[str, torch.Tensor]
    optimizers: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]


FILES = ("model.safetensors", "optimizers.safetensors", "rng.safetensors")


def write_checkpoint(
    root: Path, step: int, model: dict, optimizers: dict, rng: dict, state: dict, keep: int = KEEP
) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        for name, tensors in zip(FILES, (model, optimizers, rng)):
            save_tensors(tensors, tmp / name)
            if os.environ.get("AAEKIT_TEST_KILL_IN_CHECKPOINT") == str(step):  # test-only: die mid-write
                os.kill(os.getpid(), signal.SIGKILL)
        state = dict(state, files={name: (tmp / name).stat().st_size for name in FILES})
        write_json(state, tmp / "state.json")
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written folder would only take up the space
        raise
    if final.exists():  # same step written again (e.g. end of run right after a periodic save)
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    for stale in list_checkpoints(root)[keep:]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, newest first (temporary folders of interrupted writes are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]), reverse=True)


def _verified_state(path: Path) -> dict:
    """state.json of a checkpoint folder, after checking every file it names has its recorded size."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}/state.json: missing or corrupt ({exc})") from None
    for name, size in state.get("files", {}).items():
        actual = (path / name).stat().st_size if (path / name).exists() else None
        if actual != size:
            raise UserError(
                f"{path}/{name}: expected {size} bytes, found {actual}; the file is truncated or missing"
            )
    return state


def read_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    state = _verified_state(path)
    model, optimizers, rng = (load_tensors(path / name, "checkpoint") for name in FILES)
    return Checkpoint(path, state, model, optimizers, rng)


def _model_weights(path: Path) -> dict[str, torch.Tensor]:
    """Only the model weights of a checkpoint folder, after the size check of all its files."""
    _verified_state(path)
    return load_tensors(path / "model.safetensors", "checkpoint")


def _newest_intact(root: Path, read, warn) -> tuple[Path, object, bool] | None:
    """The newest checkpoint under ``root`` that ``read`` loads: (folder, what read returned, whether newer
    corrupt ones were skipped). Corrupt ones are reported through ``warn``; if every one is corrupt, one error
    lists them all; None where there are none."""
    problems = []
    for path in list_checkpoints(root):
        try:
            loaded = read(path)
        except UserError as exc:
            problems.append(str(exc))
            warn(f"warning: skipping corrupt checkpoint {path.name}: {exc}")
            continue
        return path, loaded, bool(problems)
    if problems:
        raise UserError("no usable checkpoint in " + str(root) + ":\n" + "\n".join(problems))
    return None


def checkpoint_model(root: Path, which: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """Model weights of one checkpoint under ``root``: ``which`` is "latest" (the newest that is intact), a
    step number, or a folder name such as "step-00012000". Returns (weights file, tensors)."""
    root = Path(root)
    available = list_checkpoints(root)
    if not available:
        raise UserError(
            f"{root}: no checkpoints to load; the run wrote none (train.checkpoint_every) or they "
            "were removed"
        )
    if which == "latest":
        path, weights, _ = _newest_intact(root, _model_weights, warn=lambda message: None)
        return path / "model.safetensors", weights
    name = f"{PREFIX}{int(which):08d}" if which.isdigit() else which
    path = root / name
    if path not in available:
        names = ", ".join(p.name for p in available)
        raise UserError(f'{root}: no checkpoint {which!r}; available: {names} (or "latest")')
    return path / "model.safetensors", _model_weights(path)


def latest_checkpoint(root: Path, warn=print) -> Checkpoint | None:
    """The newest checkpoint that loads; corrupt ones are reported and skipped."""
    found = _newest_intact(root, read_checkpoint, warn)
    if found is None:
        return None
    path, checkpoint, skipped = found
    if skipped:
        warn(f"resuming from the previous good checkpoint {path.name}")
    return checkpoint


# ---- a training run's whole state: what the engine saves at a checkpoint and restores on --resume
# ----------------


def stream_tensors(trainer) -> tuple[dict[str, torch.Tensor], dict]:
    """Every rank's noise generator state (gathered to all, a collective), plus the shared batch streams."""
    acc = trainer.accelerator
    noise = trainer.noise.get_state()
    if acc.num_processes > 1:
        gathered = acc.gather(noise.to(trainer.device).to(torch.int32).unsqueeze(0))
        tensors = {f"noise.rank{r}": gathered[r].cpu().to(torch.uint8) for r in range(acc.num_processes)}
    else:
        tensors = {"noise.rank0": noise}
    info, tensors["batches"] = trainer.batches.state()
    info = {"batches": info}
    if trainer.labelled_batches is not None:
        info["labelled_batches"], tensors["labelled_batches"] = trainer.labelled_batches.state()
    return tensors, info


def save_training(trainer, step: int, epoch: int) -> Path:
    """Write the checkpoint of ``step`` (collective: every rank calls it; rank 0 writes). Returns its
    folder; raises OSError on every rank when rank 0 cannot write it."""
    acc = trainer.accelerator
    rng, info = stream_tensors(trainer)
    failure = None
    if acc.is_main_process:
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_meta = {
            name: optimizer_to_files(name, opt.state_dict(), opt_tensors)
            for name, opt in trainer.optimizers.items()
        }
        state = {
            "step": step,
            "epoch": epoch,
            "world_size": acc.num_processes,
            "streams": info,
            "optimizers": opt_meta,
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "imbalance": trainer.monitor.imbalance,
        }
        try:
            write_checkpoint(
                trainer.run_dir / "checkpoints",
                step,
                trainer.model.state_dict(),
                opt_tensors,
                rng,
                state,
                keep=trainer.train_cfg["keep_checkpoints"],
            )
        except OSError as exc:
            failure = exc
    raise_on_every_rank(acc, failure)
    return trainer.run_dir / "checkpoints" / f"{PREFIX}{step:08d}"  # on every rank, for its messages


def raise_on_every_rank(acc, failure: OSError | None) -> None:
    """Raise rank 0's write failure on every rank (a collective when there are several), so that the others
    stop with it instead of waiting in the next collective until the launcher ends them."""
    if acc.num_processes > 1:
        failed = torch.tensor([float(failure is not None)], device=acc.device)
        torch.distributed.all_reduce(failed)
        if failed.item() and failure is None:
            failure = OSError("rank 0 could not write it")
    if failure is not None:
        raise failure


def restore_training(trainer, checkpoint: Checkpoint) -> dict:
    """Load optimizer, scaler and stream states (the weights are loaded before preparing); returns the
    start."""
    acc, state = trainer.accelerator, checkpoint.state
    if state.get("world_size", 1) != acc.num_processes:
        acc.print(
            f"note: checkpoint was written by {state.get('world_size')} processes, resuming on "
            f"{acc.num_processes}; the noise streams restart per rank"
        )
    for name, opt in trainer.optimizers.items():
        if name not in state["optimizers"]:
            raise UserError(f"{checkpoint.path}: no optimizer state for phase {name!r}; the recipe changed")
        opt.load_state_dict(optimizer_from_files(name, state["optimizers"][name], checkpoint.optimizers))
    if state.get("scaler") and acc.scaler is not None:
        acc.scaler.load_state_dict(state["scaler"])
    key = f"noise.rank{acc.process_index}"
    if key in checkpoint.rng:
        trainer.noise.set_state(checkpoint.rng[key])
    trainer.batches.restore(state["streams"]["batches"], checkpoint.rng["batches"])
    if trainer.labelled_batches is not None and "labelled_batches" in checkpoint.rng:
        trainer.labelled_batches.restore(
            state["streams"]["labelled_batches"], checkpoint.rng["labelled_batches"]
        )
    trainer.monitor.imbalance.update(state.get("imbalance", {}))
    return {"step": int(state["step"]), "epoch": int(state["epoch"])}
