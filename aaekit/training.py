"""From a validated recipe to a finished run directory, on every rank of an ``accelerate launch``."""

from __future__ import annotations

from pathlib import Path

from aaekit.recipe import Recipe


def train(recipe: Recipe, registry, *, output_dir: str | None = None, resume: bool = False,
          log_with: str | None = None) -> Path | None:
    import torch
    from accelerate import PartialState

    from aaekit.engine import RESUMABLE_CHANGES, refuse_lonely_process, run_training
    from aaekit.rundir import check_resumable, choose_run_dir

    from accelerate.utils import parse_flag_from_env

    # A bare PartialState ignores ACCELERATE_USE_CPU (only AcceleratorState reads it), and once created it
    # fixes the process group, so CPU mode must be passed here or a 2-process CPU launch sees one process.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    refuse_lonely_process(state.num_processes)  # before anything is written
    # Every rank checks before any rank creates the directory; rank 0's choice (the -2, -3 suffix) is then
    # broadcast so that all ranks agree.
    run_dir = choose_run_dir(recipe, output_dir, resume)
    if state.num_processes > 1:
        text = str(run_dir or "").encode()
        size = torch.tensor([len(text)], device=state.device)
        torch.distributed.broadcast(size, 0)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=state.device)
        if state.is_main_process:
            buf.copy_(torch.tensor(list(text), dtype=torch.uint8))
        torch.distributed.broadcast(buf, 0)
        run_dir = Path(bytes(buf.cpu().tolist()).decode())
    if resume:
        check_resumable(recipe, run_dir, RESUMABLE_CHANGES)
    if state.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.toml").write_text(recipe.dumps(), encoding="utf-8")
        print(f"run directory: {run_dir}")
    state.wait_for_everyone()
    run_training(recipe, run_dir, registry, resume=resume, log_with=log_with)
    return run_dir if state.is_main_process else None
