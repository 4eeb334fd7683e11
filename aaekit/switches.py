"""Test-only switches, read from the environment once per run; the engine calls them at two points (before
each step, after the final save). Unset, they do nothing.

- ``AAEKIT_TEST_RAISE_AT="RANK:STEP"``: that rank raises before that step (the other ranks must not hang).
- ``AAEKIT_TEST_SIGNAL_AT="SIGNAL:STEP"`` (e.g. ``SIGINT:26``): the process sends itself that real signal as
  the step begins, so kill, Ctrl-C and SIGTERM tests do not race a run that may finish before a watcher
  reacts.
- ``AAEKIT_DUMP_RANKS=DIR``: every rank saves its own final weights to ``DIR/rank{r}.safetensors``, so tests
  can show that data-parallel ranks end identical.
- ``AAEKIT_TEST_KILL_IN_CHECKPOINT=STEP`` lives in :mod:`aaekit.checkpoint`, where the write it interrupts is.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TestSwitches:
    raise_at: tuple[int, int] | None = None
    signal_at: tuple[int, int] | None = None
    dump_ranks: str = ""

    @classmethod
    def from_env(cls) -> TestSwitches:
        fault = os.environ.get("AAEKIT_TEST_RAISE_AT", "")
        name, _, step = os.environ.get("AAEKIT_TEST_SIGNAL_AT", "").partition(":")
        return cls(
            raise_at=tuple(int(v) for v in fault.split(":")) if fault else None,
            signal_at=(getattr(signal, name), int(step)) if name else None,
            dump_ranks=os.environ.get("AAEKIT_DUMP_RANKS", ""),
        )

    def before_step(self, rank: int, step: int) -> None:
        if self.raise_at == (rank, step):
            raise RuntimeError(f"AAEKIT_TEST_RAISE_AT: rank {rank} fails at step {step}")
        if self.signal_at is not None and self.signal_at[1] == step:
            os.kill(os.getpid(), self.signal_at[0])

    def after_finish(self, state_dict: dict, rank: int) -> None:
        if self.dump_ranks:
            from aaekit.checkpoint import save_tensors

            Path(self.dump_ranks).mkdir(parents=True, exist_ok=True)
            save_tensors(state_dict, Path(self.dump_ranks) / f"rank{rank}.safetensors")
