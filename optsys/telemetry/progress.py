"""A console progress bar (rich) showing loss, tokens/s and ETA; silent when disabled."""

from __future__ import annotations


class StepProgress:
    def __init__(self, total: int, description: str, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        # imported here: benchmarks import the trainers on machines (the GPU box) that may lack rich
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.task = self.bar.add_task(description, total=total, info="")
        self.bar.start()

    def update(self, step: int, info: str = "") -> None:
        if self.enabled:
            self.bar.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()
