"""Do two metrics.jsonl files log the same train/* values at the given steps, to the bit? (gpu_suite.sh's deepspeed
stage: an uninterrupted run vs its resume.) Prints the differences; exits 1 when there is one.

    python profiling/same_metrics.py full-metrics.jsonl resumed/metrics.jsonl --steps 4 5 6
"""

from __future__ import annotations

import argparse
import json
import sys

KEYS = ("train/loss", "train/grad_norm", "train/lr", "train/tokens")


def train_rows(path: str) -> dict[int, dict]:
    with open(path) as f:
        return {r["step"]: r for r in map(json.loads, f) if "train/loss" in r}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--steps", type=int, nargs="+", required=True)
    args = p.parse_args(argv)
    a, b = train_rows(args.a), train_rows(args.b)
    bad = [f"step {s}: missing in {args.a if s not in a else args.b}" for s in args.steps if s not in a or s not in b]
    bad += [f"step {s} {k}: {a[s].get(k)!r} vs {b[s].get(k)!r}" for s in args.steps if s in a and s in b
            for k in KEYS if a[s].get(k) != b[s].get(k)]
    print("\n".join(bad) if bad else f"steps {args.steps}: {', '.join(KEYS)} equal to the bit")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
