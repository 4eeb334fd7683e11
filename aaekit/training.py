"""From a validated recipe to a finished run directory, on every rank of an ``accelerate launch``."""

from __future__ import annotations

from pathlib import Path

from aaekit.errors import UserError
from aaekit.recipe import Recipe


def train(recipe: Recipe, registry, *, output_dir: str | None = None, resume: bool = False,
          log_with: str | None = None) -> Path | None:
    from accelerate import PartialState

    from aaekit.engine import RESUMABLE_CHANGES, refuse_lonely_process, run_training
    from aaekit.rundir import check_resumable, choose_run_dir, make_writable_dir

    from accelerate.utils import parse_flag_from_env

    # A bare PartialState ignores ACCELERATE_USE_CPU (only AcceleratorState reads it), and once created it
    # fixes the process group, so CPU mode must be passed here or a 2-process CPU launch sees one process.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    refuse_lonely_process(state.num_processes)  # before anything is written
    # Every rank checks before any rank creates the directory; rank 0's choice (the -2, -3 suffix) and whether it
    # could create and write the folder are then broadcast, so that all ranks agree (and all stop on a bad path).
    run_dir = choose_run_dir(recipe, output_dir, resume)
    problem = ""
    if state.is_main_process:
        try:
            make_writable_dir(run_dir, "--output-dir" if output_dir else "run directory")
        except UserError as exc:
            problem = str(exc)
    if state.num_processes > 1:
        run_dir, problem = broadcast_text(state, f"{run_dir}\0{problem}").split("\0", 1)
        run_dir = Path(run_dir)
    if problem:
        raise UserError(problem)
    if resume:
        check_resumable(recipe, run_dir, RESUMABLE_CHANGES)
    if state.is_main_process:
        print(f"run directory: {run_dir}")
    state.wait_for_everyone()
    run_training(recipe, run_dir, registry, resume=resume, log_with=log_with)
    return run_dir if state.is_main_process else None


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
