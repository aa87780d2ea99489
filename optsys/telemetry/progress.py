"""Console progress bars (rich): a run's steps with loss, tokens/s and ETA, and the long phases around them
(held-out loss and accuracy, the reference pass, vLLM start-up, eval pools); silent when disabled.

Only one rich display can be live at a time, so a bar opened while another runs (the held-out loss every
trainer.eval_every steps, under the training bar) becomes a second line of that display and leaves with close().
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_live: list = []  # the rich Progress on screen, if any (one per process)


class StepProgress:
    """A bar of `total` units (None: unknown length, a pulsing bar with the elapsed time) with an ETA."""

    def __init__(self, total: int | None, description: str, enabled: bool = True):
        self.enabled, self.closed = enabled, False
        if not enabled:
            return
        if _live:
            self.bar, self.owner = _live[-1], False
        else:
            # imported here: benchmarks import the trainers on machines (the GPU box) that may lack rich
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar, self.owner = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                transient=False,
            ), True
            self.bar.start()
            _live.append(self.bar)
        self.task = self.bar.add_task(description, total=total, info="")

    def update(self, step: int, info: str = "") -> None:
        if self.enabled and not self.closed:
            self.bar.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if not self.enabled or self.closed:
            return
        self.closed = True
        if self.owner:
            self.bar.stop()
            _live.remove(self.bar)
        else:
            self.bar.remove_task(self.task)


def progress_items(items: Iterable[T], description: str, enabled: bool = True, total: int | None = None
                   ) -> Iterator[T]:
    """Yield `items` while a bar counts them (elapsed, ETA); the bar closes when the loop ends or breaks."""
    if total is None:
        items = list(items)
        total = len(items)
    bar = StepProgress(total, description, enabled=enabled and total > 0)
    try:
        for i, item in enumerate(items, 1):
            yield item
            bar.update(i)
    finally:
        bar.close()
