"""Best-fit-decreasing packing: the Python reference vs the C++ op (csrc/packing.cpp), same lengths, same run.

    python bench/packing_csrc.py [--sizes 1000000 10000000] [--max-tokens 4096 8192] [--out PATH]

Lengths are long-tailed like SFT data: lognormal(mu=5, sigma=1.2) clipped to [1, max_tokens] (median ~150,
mean ~300, ~0.3% at the cap for 4096), passed as a Python list (what the trainers pass). Each (backend, size,
max_tokens) runs in its own process, so its peak memory is its own: "peak MB" is how far the peak RSS rose over
the RSS after the lengths were made, i.e. everything the packer allocated including its output. Columns:
  python s   pack_best_fit_decreasing(..., backend="python") (it takes tens of seconds at 10M)
  cpp s      backend="cpp", list of lists out (what callers get)
  core s     the C++ op returning flat int32 indices + int64 offsets (bytearrays): the sort + packing alone
  py conv s  turning those into lists in Python (torch.frombuffer(...).tolist() + slicing): the alternative
             to building the lists in C++ (cpp s - core s)
  same       both backends returned identical bins (a digest of every bin, in order)
Both backends run --repeats times, each call in its own process, interleaved (python cpp python cpp ...;
bench/harness.py), with --threads threads pinned; the table gives the median and the min of each. The op is built
first if needed (the build time is printed). Writes bench/results/packing_csrc.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (bench/harness.py)


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_lengths(n: int, max_tokens: int, seed: int = 0) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(5.0, 1.2, n).astype(np.int64), 1, max_tokens).tolist()


def digest(bins: list[list[int]]) -> str:
    from array import array

    h = hashlib.sha256()
    for b in bins:
        h.update(array("q", [len(b), *b]).tobytes())
    return h.hexdigest()[:16]


def child(backend: str, n: int, max_tokens: int, repeats: int) -> dict:
    """One backend on one input, in this process: times, peak RSS growth, digest of the bins."""
    import torch

    from optsys import csrc
    from optsys.data.packing import pack_best_fit_decreasing

    lengths = make_lengths(n, max_tokens)
    out: dict = {}
    if backend == "cpp":
        ext = csrc.load("packing", required=True)
        base = rss_mb("VmRSS")
        # Peak memory of the call callers make, measured first (before anything else raises the high-water mark).
        t = time.perf_counter()
        bins = pack_best_fit_decreasing(lengths, max_tokens, backend="cpp")
        times = [time.perf_counter() - t]
        out["peak_mb"] = rss_mb("VmHWM") - base
        out["s"] = times[0]
        core, conv = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            (flat_b, off_b), bad = ext.pack_bfd(lengths, max_tokens, "auto", False)
            t1 = time.perf_counter()
            flat = torch.frombuffer(flat_b, dtype=torch.int32).tolist()
            offsets = torch.frombuffer(off_b, dtype=torch.int64).tolist()
            lists = [flat[a:b] for a, b in zip(offsets, offsets[1:])]
            t2 = time.perf_counter()
            assert bad == -1 and lists == bins
            core.append(t1 - t)
            conv.append(t2 - t1)
            del flat, lists
        out["core_s"], out["py_conv_s"] = min(core), min(conv)
    else:
        base = rss_mb("VmRSS")
        t = time.perf_counter()
        bins = pack_best_fit_decreasing(lengths, max_tokens, backend="python")
        out["s"] = time.perf_counter() - t
        out["peak_mb"] = rss_mb("VmHWM") - base
    out.update(bins=len(bins), digest=digest(bins), efficiency=sum(lengths) / (len(bins) * max_tokens))
    return out


COLUMNS = [["lengths", "lengths", ",d"], ["max_tokens", "max_tokens", "d"], ["bins", "bins", ",d"],
           ["python_s_min", "python s, min", ".2f"], ["python_s_median", "python s, median", ".2f"],
           ["python_peak_mb", "python peak MB", ".0f"], ["cpp_s_min", "cpp s, min", ".3f"],
           ["cpp_s_median", "cpp s, median", ".3f"], ["core_s_median", "core s (median)", ".3f"],
           ["py_conv_s_median", "py conv s (median)", ".3f"], ["cpp_peak_mb", "cpp peak MB", ".0f"],
           ["speedup_median", "speedup (medians)", ".1f"], ["speedup_min", "speedup (mins)", ".1f"],
           ["same", "same", ""]]


def table_row(row: dict) -> dict:
    """The flat cells of one case's row (the JSON keeps the spreads beside them)."""
    return {**{k: row[k] for k in ("lengths", "max_tokens", "bins", "python_peak_mb", "cpp_peak_mb",
                                   "speedup_median", "speedup_min")},
            "python_s_min": row["python_s"]["min"], "python_s_median": row["python_s"]["median"],
            "cpp_s_min": row["cpp_s"]["min"], "cpp_s_median": row["cpp_s"]["median"],
            "core_s_median": row["core_s"]["median"], "py_conv_s_median": row["py_conv_s"]["median"],
            "same": "yes" if row["same_bins"] else "NO"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--max-tokens", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--repeats", type=int, default=3,
                   help="processes per backend and case, interleaved (python cpp python cpp ...): min and median")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/packing_csrc.json")
    p.add_argument("--child", nargs=4, metavar=("BACKEND", "N", "MAX_TOKENS", "REPEATS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        backend, n, cap, reps = args.child
        print(json.dumps(child(backend, int(n), int(cap), int(reps))))
        return

    from optsys import csrc

    load_start, t_start = os.getloadavg(), time.time()
    t = time.perf_counter()
    csrc.load("packing", required=True)
    build_s = time.perf_counter() - t
    print(f"C++ op built or loaded in {build_s:.2f}s (build dir {csrc.build_dir('packing')})")
    env = harness.pinned_env(args.threads)
    rows = []
    print(f"{'lengths':>10} {'max_tok':>7} {'bins':>8} {'python s':>9} {'(min)':>7} {'py MB':>7} {'cpp s':>7} "
          f"{'(min)':>7} {'core s':>7} {'py conv s':>9} {'cpp MB':>7} {'speedup':>8} {'(min)':>7} {'same':>5}")
    for n in args.sizes:
        for cap in args.max_tokens:
            def run_one(backend, rep, n=n, cap=cap):
                cmd = [sys.executable, __file__, "--child", backend, str(n), str(cap), "1"]
                return harness.run_child(cmd, f"{backend} {n} {cap}", env)

            res = harness.interleaved(["python", "cpp"], args.repeats, run_one, log=lambda m: None)
            py, cc = res["python"], res["cpp"]
            py_s, cc_s = harness.spread([r["s"] for r in py]), harness.spread([r["s"] for r in cc])
            digests = {r["digest"] for r in py + cc}
            row = {"lengths": n, "max_tokens": cap, "bins": cc[0]["bins"], "efficiency": cc[0]["efficiency"],
                   "python_s": py_s, "cpp_s": cc_s,
                   "core_s": harness.spread([r["core_s"] for r in cc]),
                   "py_conv_s": harness.spread([r["py_conv_s"] for r in cc]),
                   "python_peak_mb": max(r["peak_mb"] for r in py), "cpp_peak_mb": max(r["peak_mb"] for r in cc),
                   "speedup_median": py_s["median"] / cc_s["median"], "speedup_min": py_s["min"] / cc_s["min"],
                   "same_bins": len(digests) == 1 and len({r["bins"] for r in py + cc}) == 1, "runs": res}
            rows.append(row)
            print(f"{n:>10} {cap:>7} {row['bins']:>8} {py_s['median']:>9.2f} {py_s['min']:>7.2f} "
                  f"{row['python_peak_mb']:>7.0f} {cc_s['median']:>7.3f} {cc_s['min']:>7.3f} "
                  f"{row['core_s']['median']:>7.3f} {row['py_conv_s']['median']:>9.3f} {row['cpp_peak_mb']:>7.0f} "
                  f"{row['speedup_median']:>7.1f}x {row['speedup_min']:>6.1f}x {str(row['same_bins']):>5}",
                  flush=True)
    print(f"(seconds: median over {args.repeats} processes per backend, interleaved; (min): the fastest; speedup "
          "= python / cpp. Timed: one pack_best_fit_decreasing call on a Python list; excluded: making the lengths, "
          "process start, the op's build)")
    out = harness.write_result(
        args.out, script="bench/packing_csrc.py", settings=vars(args), threads=args.threads, load_start=load_start,
        t_start=t_start, build_or_load_s=build_s, rows=rows, absent={},
        tables=[{"title": None, "columns": COLUMNS, "rows": [table_row(r) for r in rows]}],
        timed="one `pack_best_fit_decreasing` call on a Python list of lengths, in its own process",
        excluded="making the lengths, process start, the C++ op's build or load",
        repeats_note=(f"Repeats: {args.repeats} processes per backend and case, interleaved (python cpp python cpp "
                      f"...), {args.threads} thread(s); speedup = python / cpp, of the medians and of the mins. "
                      "`core s`: the C++ op returning flat arrays; `py conv s`: turning those into lists in Python. "
                      "`same`: identical bins, in order, from every process of both backends."))
    print(f"wrote {out}")
    if not all(r["same_bins"] for r in rows):
        raise SystemExit("the backends returned different bins")


if __name__ == "__main__":
    main()
