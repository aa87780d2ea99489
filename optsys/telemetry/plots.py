"""PNG curves of a training run, drawn from its metrics.jsonl: one figure per metric family in <run>/plots/.

Every run draws them when it finishes (trainer.plots); `python -m optsys.telemetry.plots RUN_DIR` draws them
for any run folder, a killed one too. A family is what belongs on one pair of axes:
  - train/X and eval/X together (train/loss with eval/loss -> loss.png), with their _before/_after variants
    (eval/accuracy_before, eval/accuracy_after -> accuracy.png), chosen with rejected (rewards_chosen,
    rewards_rejected -> rewards.png), mean with max (logp_gap_mean, logp_gap_max -> logp_gap.png), greedy with
    sampled (eval/success_rate_*, eval/sampled_success_rate_*), and every *_fraction (clip, truncated, ...) on
    fractions.png;
  - every reward/*, time/* and throughput/* metric under its prefix (reward.png: mean, std, per function);
  - anything else alone (sync/mb -> sync_mb.png).
The x axis is the step. train/epoch and train/tokens are counters, not curves, and are not drawn; a family
whose values are all missing (NaN) is skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from optsys.telemetry.curves import plot_curves

PLOTS_DIR = "plots"
SPLITS = ("train", "eval")  # the same quantity on the training data and on held-out data
PREFIX_FAMILIES = {"reward": "reward", "time": "seconds", "throughput": "tokens per second"}  # family -> y label
COUNTERS = ("train/epoch", "train/tokens")
_VARIANT = re.compile(r"_(before|after|chosen|rejected|mean|max|min)$")


def family(key: str) -> str | None:
    """The figure a metric goes on (its file stem), or None for what is not drawn."""
    if key in COUNTERS or "/" not in key:
        return None
    prefix, name = key.split("/", 1)
    if prefix in PREFIX_FAMILIES:
        return prefix
    if prefix in SPLITS:
        name = _VARIANT.sub("", name.removeprefix("sampled_"))
        if name.endswith("_fraction"):
            return "fractions"
        return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key)


def _is_fraction(name: str, curves: dict[str, list[dict]]) -> bool:
    """Accuracies and rates are drawn on [0, 1], so a flat 0 or a small change is not blown up to fill the axes."""
    values = [p["value"] for points in curves.values() for p in points if not math.isnan(p["value"])]
    return name in ("accuracy", "reward_accuracy", "success_rate", "fractions") and all(0 <= v <= 1 for v in values)


def _number(value) -> float | None:
    """A logged value as a float to draw: NaN for a missing one ("nan", inf), None for what is not a number."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        value = float(value)
    elif isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        value = math.nan  # metrics.jsonl writes non-finite numbers as strings
    else:
        return None
    return value if math.isfinite(value) else math.nan


def read_series(path: Path) -> tuple[dict[str, list[tuple[int, float]]], int]:
    """{metric: [(step, value), ...]} from a metrics.jsonl, and how many lines could not be read (a run killed
    mid-write can leave half a line)."""
    series: dict[str, list[tuple[int, float]]] = {}
    bad = 0
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        for key, value in row.items():
            number = _number(value) if key not in ("step", "time_s") else None
            if number is not None:
                series.setdefault(key, []).append((step, number))
    return series, bad


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw <run_dir>/metrics.jsonl's curves into out_dir (default <run_dir>/plots/), one PNG per family;
    returns the paths written, sorted. FileNotFoundError when the folder has no metrics.jsonl."""
    run_dir = Path(run_dir)
    source = run_dir / "metrics.jsonl"
    if not source.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl; point this at a run folder "
                                "(the output_dir of python -m optsys.train)")
    series, bad = read_series(source)
    if bad:
        print(f"warning: {source}: {bad} line(s) are not JSON rows with a step and were not drawn", file=sys.stderr)
    families: dict[str, dict[str, list[dict]]] = {}
    for key in sorted(series):
        points = series[key]
        name = family(key)
        if name is None or all(math.isnan(v) for _, v in points):
            continue
        families.setdefault(name, {})[key] = [{"step": s, "value": v} for s, v in points]
    out = Path(out_dir) if out_dir is not None else run_dir / PLOTS_DIR
    paths = []
    for name, curves in sorted(families.items()):
        # legend in the order the curves start (accuracy_before, then accuracy_after)
        curves = dict(sorted(curves.items(), key=lambda kv: (kv[1][0]["step"], kv[0])))
        paths.append(plot_curves(curves, x="step", y="value", path=out / f"{name}.png", log_x=False,
                                 title=f"{run_dir.resolve().name}: {name}", xlabel="step",
                                 ylabel=PREFIX_FAMILIES.get(name, name),
                                 ylim=(-0.03, 1.03) if _is_fraction(name, curves) else None))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optsys.telemetry.plots",
                                     description="Draw a run's metrics.jsonl as PNG curves in RUN_DIR/plots/.")
    parser.add_argument("run_dir", help="a run folder (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    if not paths:
        print(f"{args.run_dir}: metrics.jsonl holds no curves to draw", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
