"""A rich progress bar showing the phase losses and samples/s (main process only)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn


class Progress:
    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled = enabled
        self.total = total
        if enabled:
            self.bar = RichProgress(
                TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[losses]}"), TimeRemainingColumn(), transient=False,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, epoch=0, losses="")

    def __enter__(self):
        if self.enabled:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)

    def update(self, step: int, epoch: int, record: dict) -> None:
        if not self.enabled:
            return
        shown = []
        for key, value in record.items():
            if key.startswith("loss/"):
                shown.append(f"{key[5:]} {value:.4g}")
        shown.append(f"{record.get('samples_per_s', 0):,.0f} samples/s")
        self.bar.update(self.task, completed=step, epoch=epoch, losses="  ".join(shown))
