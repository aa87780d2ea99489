"""Fused linear cross-entropy / token log-probs vs naive torch (and Liger on CUDA): time and peak memory.

    python bench/kernels.py [--device cpu|cuda] [--quick] [--rounds 3] [--repeats 3] [--threads 2]
                            [--modes fwd,fwd+bwd] [--out PATH]

Prints a table and writes bench/results/kernels-<device>.json (bench/report.py puts the CPU one into
bench/README.md). Every ratio is against the naive path (the reference in the op's file: materialize the
logits, then F.cross_entropy / log_softmax.gather) measured in the same run. "fwd" runs under torch.no_grad();
"fwd+bwd" is a full training step for the loss (grads of hidden and weight); "fwd+bwd-frozen-w" the grad of
hidden only (a frozen lm_head: LoRA). On CUDA the fused rows are each backend (hybrid = what "auto" takes,
triton, torch), and Liger's row is absent, with the reason, when it is not installed (on CPU always: it is
Triton-only).

Repeats (bench/harness.py): every impl of a case is measured `--rounds` times, interleaved (naive fused naive
fused ...), each round the median of `--repeats` timed calls after a warm-up call; the table gives the min and
the median over rounds. On CPU every round is its own process (threads pinned), so its peak RSS is its own.
On CUDA the rounds run in this one process: a process per round would spend more on CUDA start-up and Triton
compilation than on the op, and memory comes from the allocator's own counters, which a process does not share.
Peak extra memory is the peak above the inputs (workspace: less the outputs): torch.cuda.max_memory_allocated
on CUDA; on CPU the growth of the process's peak resident set (VmHWM) over one step, after a tiny warm-up of
the same code path and with glibc's mmap threshold pinned so freed buffers go back to the OS.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (bench/harness.py)

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


def run_case_isolated(op, impl, mode, shape, device, repeats, threads) -> dict:
    """CPU: one fresh process per case and round, threads pinned, so its peak RSS belongs to that case alone."""
    spec = json.dumps({"op": op, "impl": impl, "mode": mode, "shape": shape, "device": device, "repeats": repeats})
    env = harness.pinned_env(threads, {"MALLOC_MMAP_THRESHOLD_": "65536"})  # fixed: big frees unmap at once
    return harness.run_child([sys.executable, __file__, "--case", spec], f"{op} {impl} {mode}", env)


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


LIGER_ABSENT_CPU = "Liger-Kernel is Triton-only (GPU): not run on CPU"
COLUMNS = [["shape", "shape", ""], ["op", "op", ""], ["mode", "mode", ""], ["impl", "impl", ""],
           ["time_ms_min", "time (ms), min", ".0f"], ["time_ms", "time (ms), median", ".0f"],
           ["time_vs_naive", "time / naive (median)", ".2f"], ["peak_extra_mb", "peak extra (MB)", ".0f"],
           ["mem_vs_naive", "mem / naive", ".3f"], ["workspace_mb", "workspace (MB)", ".0f"]]


def summarize_case(rounds: dict[str, list[dict]], shape: dict, op: str, mode: str) -> list[dict]:
    """One row per impl: time min and median over rounds (each round's time is its own median of repeats), the
    memory of the first round (it is deterministic), ratios to naive's median."""
    rows = []
    naive_ms = statistics.median(r["time_ms"] for r in rounds["naive"])
    naive_mb = rounds["naive"][0]["peak_extra_mb"]
    for impl, reps in rounds.items():
        times = harness.spread([r["time_ms"] for r in reps])
        row = {**reps[0], "shape": shape["name"], "op": op, "mode": mode, "impl": impl, "time_ms": times["median"],
               "time_ms_min": times["min"], "time_ms_rounds": times["values"],
               "time_vs_naive": times["median"] / naive_ms,
               "mem_vs_naive": reps[0]["peak_extra_mb"] / max(naive_mb, 1e-9)}
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes, one timed call per round")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per round (median); default 3, quick 1")
    ap.add_argument("--rounds", type=int, default=3,
                    help="measure every impl of a case K times, interleaved; the table gives min and median")
    ap.add_argument("--threads", type=int, default=2, help="torch / BLAS threads, pinned in every process")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {MODES}")
    ap.add_argument("--out", "--json", dest="out",
                    help="where to write the results (default: bench/results/kernels-<device>.json)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: one isolated CPU case
    args = ap.parse_args()
    if not set(args.modes.split(",")) <= set(MODES):
        ap.error(f"--modes: comma-separated, of {MODES}")
    if args.case:
        harness.apply_threads_in_child()
        c = json.loads(args.case)
        print(json.dumps(run_case(c["op"], c["impl"], c["mode"], c["shape"], c["device"], c["repeats"])))
        return

    load_start, t_start = os.getloadavg(), time.time()
    dev = args.device
    if dev == "cuda":
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    shapes = (QUICK if args.quick else SHAPES)[dev]
    meta = {"device": torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "torch": torch.__version__, "threads": args.threads, "repeats": repeats, "rounds": args.rounds}
    if dev == "cuda":
        meta["bf16_matmul_tflops"] = matmul_tflops()
    absent = {}
    if dev == "cpu":
        absent["liger"] = LIGER_ABSENT_CPU
    elif _liger_loss() is None:
        absent["liger"] = harness.missing_module("liger_kernel", "Liger-Kernel's fused linear CE") or "import failed"
    rows = []
    for shape in shapes:
        for op in ("linear_ce", "logprobs"):
            for mode in args.modes.split(","):
                def run_one(impl, rnd, op=op, mode=mode, shape=shape):
                    if dev == "cpu":
                        return run_case_isolated(op, impl, mode, shape, dev, repeats, args.threads)
                    r = run_case(op, impl, mode, shape, dev, repeats)
                    torch.cuda.empty_cache()
                    return r

                rounds = harness.interleaved(list(impls(op, dev)), args.rounds, run_one, log=lambda m: None)
                for r in summarize_case(rounds, shape, op, mode):
                    if dev == "cuda":
                        flops = FLOPS_PER_NHV[mode] * shape["n"] * shape["h"] * shape["v"]
                        r["tflops"] = flops / (r["time_ms"] / 1e3) / 1e12
                        r["roofline_frac"] = r["tflops"] / meta["bf16_matmul_tflops"]
                    rows.append(r)
                    print_row(r, header=len(rows) == 1)
    columns = COLUMNS + ([["tflops", "TFLOP/s", ".1f"], ["roofline_frac", "of matmul rate", ".2f"]]
                         if dev == "cuda" else [])
    shapes_txt = "; ".join(f"{s['name']}: N {s['n']}, H {s['h']}, V {s['v']}, {s['dtype']}" for s in shapes)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"kernels-{dev}.json"
    doc_path = harness.write_result(
        out, script="bench/kernels.py", settings={**vars(args), "repeats": repeats}, threads=args.threads,
        load_start=load_start, t_start=t_start, meta=meta, shapes=shapes, rows=rows, absent=absent,
        tables=[{"title": None, "columns": columns, "rows": rows}],
        timed=("one call of the op per timed repeat: `fwd` under no_grad, `fwd+bwd` the op and "
               "`torch.autograd.grad` of hidden and weight (frozen W: hidden only); inputs made beforehand "
               f"({shapes_txt})"),
        excluded="making the inputs, a warm-up call at a tiny shape and one at the measured shape, process start",
        repeats_note=(f"Rounds: {args.rounds} per impl, interleaved, "
                      f"{'each in its own process' if dev == 'cpu' else 'in one process (CUDA)'}, "
                      f"{args.threads} thread(s); a round's time is the median of {repeats} call(s)."))
    print("\n" + harness.markdown_tables(json.loads(doc_path.read_text())))
    print(f"\n{json.dumps(meta)}\nwrote {doc_path}")


def print_row(r, header=False):
    cols = ["shape", "op", "mode", "impl", "time_ms", "time_vs_naive", "peak_extra_mb", "mem_vs_naive",
            "workspace_mb"]
    cols += [c for c in ("tflops", "roofline_frac") if c in r]
    if header:
        print(" | ".join(f"{c:>13}" for c in cols))
    print(" | ".join(f"{r[c]:>13.3f}" if isinstance(r[c], float) else f"{r[c]:>13}" for c in cols), flush=True)


if __name__ == "__main__":
    main()
