"""Stopping a run on request: Ctrl-C (SIGINT) and a scheduler's SIGTERM (preemption, a time limit).

A request only asks: training goes on to the next log step (a step boundary where the ranks synchronise
anyway), writes a checkpoint there and stops, so the checkpoint holds whole steps and whole metric windows and
resuming stays exact. The same request again stops at once (the last periodic checkpoint remains)."""

from __future__ import annotations

import signal
import threading
from typing import Self

from aaekit.errors import TrainingStopped

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopAtOnce(BaseException):
    """The second request: raised wherever the run is (mid-step), so nothing of this step is saved."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopRequests:
    """Installs the handlers for the length of a ``with`` block (only the main thread can)."""

    def __init__(self, say=print):
        self.say = say
        self.requested: int | None = None  # the signal that asked
        self.previous: dict = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.requested is not None:
            raise StopAtOnce(signum)
        self.requested = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.say(
            f"{name}: going on to the next log step, then writing a checkpoint ({name} again to stop at "
            f"once)",
            flush=True,
        )

    def stopped(self, step: int, run_dir) -> TrainingStopped:
        """The error that ends a run stopped at ``step``: it names the checkpoint and the command that
        resumes."""
        signum = self.requested or signal.SIGINT  # a rank that got no signal stops with its peers
        return TrainingStopped(
            f"interrupted at step {step} ({signal.Signals(signum).name}); checkpoint written to "
            f"{run_dir / 'checkpoints'}; continue with: aaekit run {run_dir / 'recipe.toml'} --resume "
            f"--output-dir {run_dir}",
            exit_code=128 + int(signum),
        )

    def stopped_at_once(self, signum: int, step: int, last_good: str | None, run_dir) -> TrainingStopped:
        """The error that ends a run stopped mid-step by a second request: the last checkpoint is what
        remains."""
        resume = (
            f"continue with: aaekit run {run_dir / 'recipe.toml'} --resume --output-dir {run_dir}"
            if last_good
            else "no checkpoint was written yet; start the run again"
        )
        return TrainingStopped(
            f"stopped at once during step {step + 1} ({signal.Signals(signum).name} again); the "
            f"last checkpoint is kept: {last_good or 'none'}; {resume}",
            exit_code=128 + int(signum),
        )
