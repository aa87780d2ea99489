"""One step of a fused linear-softmax op under torch.profiler: where the time goes, kernel by kernel.

    python profiling/profile_kernels.py [--op linear_ce|logprobs] [--impl fused-hybrid|fused-triton|fused-torch|naive]
                                        [--shape llama3-8b|qwen2.5-7b|cpu-32k|N,H,V] [--dtype bfloat16]
                                        [--mode fwd|fwd+bwd] [--device cuda|cpu] [--out DIR] [--nvtx]

The inputs and impls are bench/kernels.py's. One warm-up step (Triton compiles, cuBLAS picks its
algorithms), then one profiled step. Prints the top entries by self device time (self CPU time on a
CPU run) and writes <out>/profile-<op>-<impl>-<shape>-<mode>.{json,txt}: a Chrome trace (open it in
Perfetto or chrome://tracing) and the table. The fused paths name their chunks (`optsys.hybrid_stats+grads
chunk 0`, `optsys.triton_grads`, ...), so a chunk's matmuls and row kernels sit under one range.
Under Nsight Systems or Nsight Compute, --nvtx turns those ranges into NVTX ranges instead of running
torch.profiler, and on CUDA brackets the profiled step (not the warm-up) with cudaProfilerStart/Stop:
    nsys profile -t cuda,nvtx --capture-range=cudaProfilerApi -o lce python profiling/profile_kernels.py --nvtx
    ncu --profile-from-start off ... python profiling/profile_kernels.py --nvtx   (profiling/ncu_profile.sh)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    # bench/kernels.py by path: a module named `kernels` would shadow Hugging Face's `kernels` package.
    spec = importlib.util.spec_from_file_location("optsys_bench_kernels", ROOT / "bench" / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_shape(text: str, dtype: str, bench) -> dict:
    known = {s["name"]: s for shapes in bench.SHAPES.values() for s in shapes}
    if text in known:
        return {**known[text], "dtype": dtype or known[text]["dtype"]}
    try:
        n, h, v = (int(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"--shape: one of {sorted(known)} or N,H,V, got {text!r}") from None
    return {"name": f"{n}x{h}x{v}", "n": n, "h": h, "v": v, "dtype": dtype or "float32"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    ap.add_argument("--op", choices=["linear_ce", "logprobs"], default="linear_ce")
    ap.add_argument("--impl", default=None, help="an impl name of bench/kernels.py (default: fused-hybrid on "
                                                 "CUDA, fused on CPU)")
    ap.add_argument("--shape", default="llama3-8b" if cuda else "cpu-32k")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the shape's)")
    ap.add_argument("--mode", choices=["fwd", "fwd+bwd"], default="fwd+bwd")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--rows", type=int, default=25, help="table rows")
    ap.add_argument("--nvtx", action="store_true", help="emit NVTX ranges for nsys instead of torch.profiler")
    args = ap.parse_args()

    bench = _bench()
    impls = bench.impls(args.op, args.device)
    impl = args.impl or ("fused-hybrid" if args.device == "cuda" else "fused")
    if impl not in impls:
        raise SystemExit(f"--impl: one of {sorted(impls)} on {args.device}, got {impl!r}")
    fn = impls[impl]
    shape = parse_shape(args.shape, args.dtype, bench)
    inputs = bench.make_inputs(shape["n"], shape["h"], shape["v"], shape["dtype"], args.device)
    bench.step(fn, args.mode, *inputs)  # warm-up
    bench._sync(args.device)

    if args.nvtx:
        capture = torch.cuda.profiler.profile() if args.device == "cuda" else contextlib.nullcontext()
        with capture, torch.autograd.profiler.emit_nvtx(record_shapes=False):
            bench.step(fn, args.mode, *inputs)
            bench._sync(args.device)
        print("step done under emit_nvtx (run this under nsys to record it)")
        return

    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        bench.step(fn, args.mode, *inputs)
        bench._sync(args.device)
    sort_by = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=60)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"profile-{args.op}-{impl}-{shape['name']}-{args.mode.replace('+', '_')}"
    prof.export_chrome_trace(str(out / f"{stem}.json"))
    header = json.dumps({"op": args.op, "impl": impl, "shape": shape, "mode": args.mode, "device": args.device,
                         "torch": torch.__version__})
    (out / f"{stem}.txt").write_text(f"{header}\n{table}\n")
    print(header)
    print(table)
    print(f"wrote {out / stem}.json (trace) and .txt (table)")


if __name__ == "__main__":
    main()
