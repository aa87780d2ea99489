"""Run metrics: one JSON object per logged step in metrics.jsonl, final numbers in summary.json, and the same
rows in TensorBoard and W&B when those are on; PNG curves of the run when it closes.

Metric names are `split/name` (train/loss, eval/accuracy, throughput/tokens_per_s, ...), the same
in every sink, so a plot script never has to translate names.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from optsys.telemetry.sinks import WandbSink, numbers, open_tensorboard


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than dropping them
    return value


class MetricsLog:
    """Appends to <out>/metrics.jsonl (flushed every line, so a killed run keeps its history) and hands each row
    to the sinks that are on: TensorBoard event files in <out>/tensorboard/ (`tensorboard`), a W&B run
    (`wandb_project` names its project; None = off; `run_config` becomes its config). `close` writes
    <out>/plots/*.png from metrics.jsonl when `plots` is set.

    Only an enabled log (rank 0 under torchrun) writes or opens anything. `start_step` is the checkpoint step a
    resumed run continues from: TensorBoard then hides what the killed run logged after it."""

    def __init__(self, out_dir: Path, enabled: bool = True, *, tensorboard: bool = False,
                 wandb_project: str | None = None, run_config: dict | None = None, plots: bool = False,
                 start_step: int = 0):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.plots = plots and enabled
        self.start = time.time()
        self._file = open(self.out_dir / "metrics.jsonl", "a") if enabled else None
        self._sinks = []
        if enabled and tensorboard:
            sink = open_tensorboard(self.out_dir, start_step)
            self._sinks += [sink] if sink else []
        if enabled and wandb_project is not None:
            self._sinks.append(WandbSink(self.out_dir, wandb_project, run_config or {}))

    def log(self, step: int, metrics: dict) -> None:
        if not self._file:
            return
        row = {"step": step, "time_s": round(time.time() - self.start, 3)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._sinks:
            values = numbers(metrics)
            for sink in self._sinks:
                sink.log(step, values)

    def write_summary(self, summary: dict) -> None:
        if not self.enabled:
            return
        plain = {k: _plain(v) for k, v in summary.items()}
        (self.out_dir / "summary.json").write_text(json.dumps(plain, indent=2) + "\n")

    def close(self) -> None:
        """Close the jsonl file and the sinks; then draw the plots (a failure there is one warning, never an
        error: the run's results are already written)."""
        if self._file:
            self._file.close()
            self._file = None
        for sink in self._sinks:
            sink.close()
        self._sinks = []
        if self.plots:
            self.plots = False
            from optsys.telemetry.plots import plot_run

            try:
                paths = plot_run(self.out_dir)
                print(f"plots: {len(paths)} PNG(s) in {self.out_dir / 'plots'}", flush=True)
            except Exception as e:  # noqa: BLE001 - the run is done; a missing picture must not fail it
                print(f"warning: could not draw the run's plots ({type(e).__name__}: {e}); metrics.jsonl is complete, "
                      f"retry with python -m optsys.telemetry.plots {self.out_dir}", file=sys.stderr, flush=True)
