"""The RL update's log-prob step with the entropy logged: fast backward vs a zero entropy gradient.

    python bench/entropy_grad.py [--n 1024] [--h 256] [--v 32000] [--dtype float32] [--rounds 5] [--json PATH]

An RL update asks `linear_token_logprobs` for the entropy (to log it) and differentiates only the log-probs.
"logged" is that step as it runs now (the unused entropy output gets no gradient, so the backward takes the
log-prob path). "zero-grad" is the same step with `0 * entropy` added to the loss: autograd then hands the op a
zero entropy gradient, which is what every RL update did before the op stopped materializing it (a delta term
in d_logits: the chunked torch path's general three-tile body). "score" is the no-grad forward that scores
the old log-probs and their entropy (no ratio: compare it across code versions). All run in this process,
interleaved, round after round, on the same inputs; the table gives each one's min and median and the ratio of
the medians.
Forward + backward of hidden and weight, backend "auto" (the chunked torch path on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from optsys.kernels import linear_token_logprobs


def step(hidden, weight, target, g, zero_grad_entropy: bool | None):
    """One update step (grads of hidden and weight); zero_grad_entropy None: the no-grad scoring pass instead
    (RL's old log-probs, entropy included)."""
    if zero_grad_entropy is None:
        with torch.no_grad():
            return linear_token_logprobs(hidden, weight, target, return_entropy=True)
    lp, ent = linear_token_logprobs(hidden, weight, target, return_entropy=True)
    loss = (lp * g).sum()
    if zero_grad_entropy:
        loss = loss + 0 * ent.sum()
    return torch.autograd.grad(loss, (hidden, weight))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--h", type=int, default=256)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="where to write the results (default: bench/results/entropy-grad.json)")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    dt = getattr(torch, args.dtype)
    hidden = torch.randn(args.n, args.h, generator=gen).to(dt).requires_grad_()
    weight = (torch.randn(args.v, args.h, generator=gen) / args.h**0.5).to(dt).requires_grad_()
    target = torch.randint(0, args.v, (args.n,), generator=gen)
    g = torch.randn(args.n, generator=gen)
    variants = {"logged": False, "zero-grad": True, "score": None}
    a, b, _ = (step(hidden, weight, target, g, z) for z in variants.values())  # warm-up, and the same grads
    same = all(torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(a, b))
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, z in variants.items():
            t0 = time.perf_counter()
            step(hidden, weight, target, g, z)
            times[name].append(time.perf_counter() - t0)
    rows = [{"variant": k, "min_ms": 1e3 * min(t), "median_ms": 1e3 * statistics.median(t)} for k, t in times.items()]
    base = rows[1]["median_ms"]
    print(f"{'variant':>10} | {'min_ms':>9} | {'median_ms':>9} | vs zero-grad")
    for r in rows:
        ratio = f"{r['median_ms'] / base:.3f}" if r["variant"] != "score" else "-"
        r["vs_zero_grad"] = None if ratio == "-" else float(ratio)
        print(f"{r['variant']:>10} | {r['min_ms']:9.1f} | {r['median_ms']:9.1f} | {ratio}")
    meta = {"n": args.n, "h": args.h, "v": args.v, "dtype": args.dtype, "rounds": args.rounds,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "same_grads": same}
    print(json.dumps(meta))
    out = Path(args.json) if args.json else Path(__file__).parent / "results" / "entropy-grad.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if not same:
        raise SystemExit("the two variants' grads differ")


if __name__ == "__main__":
    main()
