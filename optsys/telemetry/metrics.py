"""Run metrics: one JSON object per logged step in metrics.jsonl, final numbers in summary.json.

Metric names are `split/name` (train/loss, eval/accuracy, throughput/tokens_per_s, ...), the same
in every sink, so a plot script never has to translate names.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than dropping them
    return value


class MetricsLog:
    """Appends to <out>/metrics.jsonl (flushed every line, so a killed run keeps its history)."""

    def __init__(self, out_dir: Path, enabled: bool = True):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.start = time.time()
        self._file = open(self.out_dir / "metrics.jsonl", "a") if enabled else None

    def log(self, step: int, metrics: dict) -> None:
        if not self._file:
            return
        row = {"step": step, "time_s": round(time.time() - self.start, 3)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def write_summary(self, summary: dict) -> None:
        if not self.enabled:
            return
        plain = {k: _plain(v) for k, v in summary.items()}
        (self.out_dir / "summary.json").write_text(json.dumps(plain, indent=2) + "\n")

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
