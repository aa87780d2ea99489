"""Fused linear cross-entropy / token log-probs vs naive torch (and Liger on CUDA): time and peak memory.

    python bench/kernels.py [--device cpu|cuda] [--quick] [--rounds K] [--modes fwd,fwd+bwd] [--json PATH]

Prints a table and writes bench/results/kernels-<device>.json. Every ratio is against the naive path
(the reference in the op's file: materialize the logits, then F.cross_entropy / log_softmax.gather)
measured in the same run. "fwd" runs under torch.no_grad(); "fwd+bwd" is a full training step for the
loss (grads of hidden and weight); "fwd+bwd-frozen-w" the grad of hidden only (a frozen lm_head: LoRA).
On CUDA the fused rows are each backend (hybrid = what "auto" takes, triton, torch). Peak extra memory
is the peak above the inputs (workspace: less the outputs): torch.cuda.max_memory_allocated on CUDA;
on CPU, each case runs in a fresh subprocess and reports the
growth of its peak resident set (VmHWM) over one step, after a tiny warm-up of the same
code path and with glibc's mmap threshold pinned so freed buffers go back to the OS.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from optsys.kernels import (
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
    linear_token_logprobs,
    linear_token_logprobs_reference,
)

SHAPES = {
    "cpu": [{"name": "cpu-32k", "n": 4096, "h": 512, "v": 32000, "dtype": "float32"}],
    "cuda": [{"name": "llama3-8b", "n": 8192, "h": 4096, "v": 128256, "dtype": "bfloat16"},
             {"name": "qwen2.5-7b", "n": 8192, "h": 3584, "v": 152064, "dtype": "bfloat16"}],
}
QUICK = {
    "cpu": [{"name": "cpu-quick", "n": 1024, "h": 256, "v": 8000, "dtype": "float32"}],
    "cuda": [{"name": "llama3-8b-2k", "n": 2048, "h": 4096, "v": 128256, "dtype": "bfloat16"}],
}


def _liger_loss():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda h, w, t: loss(w, h, t)


def impls(op: str, device: str) -> dict:
    """naive first (the baseline); on CUDA every fused backend, so one GPU run compares them all."""
    naive, fused = ((linear_cross_entropy_reference, fused_linear_cross_entropy) if op == "linear_ce"
                    else (linear_token_logprobs_reference, linear_token_logprobs))
    if device != "cuda":
        return {"naive": naive, "fused": fused}  # backend "auto": the chunked torch path
    out = {"naive": naive}
    for backend in ("hybrid", "triton", "torch"):  # hybrid: what "auto" takes on CUDA
        out[f"fused-{backend}"] = functools.partial(fused, backend=backend)
    liger = _liger_loss() if op == "linear_ce" else None
    if liger is not None:
        out["liger"] = liger
    return out


def make_inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    dt = getattr(torch, dtype)
    hidden = torch.randn(n, h, device=device, dtype=dt, generator=g).requires_grad_()
    weight = torch.randn(v, h, device=device, dtype=dt, generator=g).div_(h**0.5).requires_grad_()  # no temp
    target = torch.randint(0, v, (n,), device=device, generator=g)
    return hidden, weight, target


MODES = ("fwd", "fwd+bwd", "fwd+bwd-frozen-w")
FLOPS_PER_NHV = {"fwd": 2, "fwd+bwd": 6, "fwd+bwd-frozen-w": 4}  # the dense matmul work of each mode


def step(fn, mode, hidden, weight, target):
    """fwd: no grad; fwd+bwd: grads of hidden and weight; fwd+bwd-frozen-w: of hidden only (a frozen
    lm_head, as under LoRA)."""
    if mode == "fwd":
        with torch.no_grad():
            return fn(hidden, weight, target)
    wrt = (hidden,) if mode == "fwd+bwd-frozen-w" else (hidden, weight)
    weight.requires_grad_(mode != "fwd+bwd-frozen-w")
    out = fn(hidden, weight, target)
    grad_out = None if out.dim() == 0 else torch.ones_like(out)
    return torch.autograd.grad(out, wrt, grad_out)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _maxrss_bytes() -> int:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: exec does not reset it, so a child
    process would start from its parent's peak and a smaller growth would read as zero."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(op, impl, mode, shape, device, repeats) -> dict:
    """Time (median of `repeats`) and peak extra memory of one (op, impl, mode) at one shape."""
    fn = impls(op, device)[impl]
    # Warm-up at a tiny shape: library init (BLAS buffers, Triton compile) is not the op's memory.
    step(fn, mode, *make_inputs(64, shape["h"], 1000, shape["dtype"], device))
    inputs = make_inputs(shape["n"], shape["h"], shape["v"], shape["dtype"], device)
    _sync(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        # Peak RSS during the step minus RSS now. Valid because nothing before the step peaked above
        # the current RSS by much (inputs are made without temporaries); the gap is recorded.
        base = _rss_bytes()
        earlier_peak_gap = _maxrss_bytes() - base
    out = step(fn, mode, *inputs)  # measured step (also the warm-up at this shape)
    _sync(device)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _maxrss_bytes()) - base
    out_bytes = sum(t.numel() * t.element_size() for t in (out if isinstance(out, tuple) else (out,)))
    del out
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step(fn, mode, *inputs)
        _sync(device)
        times.append(time.perf_counter() - t0)
    # workspace: the peak less the returned outputs (grads of hidden and weight in fwd+bwd), which every
    # impl must hold: what the op itself costs on top.
    res = {"time_ms": 1e3 * statistics.median(times), "peak_extra_mb": peak / 2**20,
           "workspace_mb": (peak - out_bytes) / 2**20}
    if device == "cpu":
        res["rss_peak_before_step_mb"] = earlier_peak_gap / 2**20  # must stay << peak_extra_mb
    return res


def run_case_isolated(op, impl, mode, shape, device, repeats) -> dict:
    """CPU: one fresh process per case, so its peak RSS belongs to that case alone."""
    spec = json.dumps({"op": op, "impl": impl, "mode": mode, "shape": shape, "device": device, "repeats": repeats})
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # fixed threshold: big frees unmap at once
    res = subprocess.run([sys.executable, __file__, "--case", spec], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def matmul_tflops(dtype=torch.bfloat16, size=8192, repeats=10) -> float:
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - t0) / 1e12


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes, fewer repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every impl of a case K times, interleaved, and keep each one's fastest "
                         "round (a shared machine's load then hits naive and fused alike)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {MODES}")
    ap.add_argument("--json", help="where to write the results (default: bench/results/kernels-<device>.json)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: one isolated CPU case
    args = ap.parse_args()
    if not set(args.modes.split(",")) <= set(MODES):
        ap.error(f"--modes: comma-separated, of {MODES}")
    if args.case:
        c = json.loads(args.case)
        print(json.dumps(run_case(c["op"], c["impl"], c["mode"], c["shape"], c["device"], c["repeats"])))
        return

    dev = args.device
    repeats = args.repeats or (1 if args.quick else 3)
    shapes = (QUICK if args.quick else SHAPES)[dev]
    meta = {"device": torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": repeats, "rounds": args.rounds}
    if dev == "cuda":
        meta["bf16_matmul_tflops"] = matmul_tflops()
    rows = []
    for shape in shapes:
        for op in ("linear_ce", "logprobs"):
            for mode in args.modes.split(","):
                runner = run_case_isolated if dev == "cpu" else run_case
                best = {}
                for _ in range(args.rounds):
                    for impl in impls(op, dev):
                        r = runner(op, impl, mode, shape, dev, repeats)
                        if impl not in best or r["time_ms"] < best[impl]["time_ms"]:
                            best[impl] = r
                        if dev == "cuda":
                            torch.cuda.empty_cache()
                base = best["naive"]
                for impl, r in best.items():
                    r.update(shape=shape["name"], op=op, mode=mode, impl=impl,
                             time_vs_naive=r["time_ms"] / base["time_ms"],
                             mem_vs_naive=r["peak_extra_mb"] / max(base["peak_extra_mb"], 1e-9))
                    if dev == "cuda":
                        flops = FLOPS_PER_NHV[mode] * shape["n"] * shape["h"] * shape["v"]
                        r["tflops"] = flops / (r["time_ms"] / 1e3) / 1e12
                        r["roofline_frac"] = r["tflops"] / meta["bf16_matmul_tflops"]
                    rows.append(r)
                    print_row(r, header=len(rows) == 1)
    out = Path(args.json) if args.json else Path(__file__).parent / "results" / f"kernels-{dev}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "shapes": shapes, "rows": rows}, indent=2))
    print(f"\n{json.dumps(meta)}\nwrote {out}")


def print_row(r, header=False):
    cols = ["shape", "op", "mode", "impl", "time_ms", "time_vs_naive", "peak_extra_mb", "mem_vs_naive",
            "workspace_mb"]
    cols += [c for c in ("tflops", "roofline_frac") if c in r]
    if header:
        print(" | ".join(f"{c:>13}" for c in cols))
    print(" | ".join(f"{r[c]:>13.3f}" if isinstance(r[c], float) else f"{r[c]:>13}" for c in cols), flush=True)


if __name__ == "__main__":
    main()
