"""Progress of a run (main process only): a rich bar on a terminal; one plain line per log step elsewhere (a
cluster job's log file, a pipe), so that a user tailing the log sees the run as it goes."""

from __future__ import annotations

import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


def loss_text(record: dict) -> str:
    shown = [f"{key[5:]} {value:.4g}" for key, value in record.items() if key.startswith("loss/")]
    shown.append(f"{record.get('samples_per_s', 0):,.0f} samples/s")
    return "  ".join(shown)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total: int, start: int, enabled: bool, terminal: bool | None = None):
        self.enabled = enabled
        self.total = total
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self.start_step, self.start_time = start, time.perf_counter()
        if enabled and self.terminal:
            self.bar = RichProgress(
                TextColumn("[bold]epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[losses]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, epoch=0, losses="")

    def __enter__(self):
        if self.enabled and self.terminal:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled and self.terminal:
            self.bar.__exit__(*exc)

    def update(self, step: int, epoch: int, record: dict) -> None:
        if not self.enabled:
            return
        if self.terminal:
            self.bar.update(self.task, completed=step, epoch=epoch, losses=loss_text(record))
            return
        elapsed = time.perf_counter() - self.start_time
        done = step - self.start_step
        left = elapsed / done * (self.total - step) if done > 0 else 0.0
        print(
            f"step {step}/{self.total}  epoch {epoch}  {loss_text(record)}  {duration(left)} left", flush=True
        )
