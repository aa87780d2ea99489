"""The Python parts of the first GPU call (profiling/gpu_first_call.sh), one subcommand each.

    python profiling/first_call.py tests|big|head|tiles|sft --out DIR [--tiny]

Each part writes DIR/first-<part>.json and rewrites it after every measurement, so a part killed by its
`timeout` still leaves what it measured. --tiny shrinks every shape (and --device cpu runs the parts on the
chunked torch path, or the Triton interpreter with TRITON_INTERPRET=1): the CPU smoke test.
- tests: the `gpu`-marked kernel tests (pytest), one row per test.
- big:   N x V past 2^31 (N = 17000, V = 128256, H = 512, bf16): hybrid (and the Triton tiles) vs a reference
         computed in row pieces in fp32 and vs the naive op, the rows past the 2^31-th logit checked on their own;
         and whether the `out_dtype=float32` matmuls ran (no fallback warning).
- head:  the Llama-3-8B head (N = 8192, H = 4096, V = 128256, bf16): naive / hybrid / triton (/ liger), both ops,
         fwd and fwd+bwd, 5 interleaved repeats; TFLOP/s beside the cuBLAS lm_head matmul's on the same device,
         peak workspace, and the targets of bench/README.md checked.
- tiles: the all-Triton CE fwd+bwd at each TILE_CANDIDATES entry (kernels/triton_tiles.py).
- sft:   three SFT steps of tiny:gpu-0.5b (494M, random init, built here) in bf16 through `python -m optsys.train`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Recorder:
    """A part's JSON file, rewritten (atomically) after every row."""

    def __init__(self, out: Path, part: str, meta: dict):
        self.path = out / f"first-{part}.json"
        self.doc = {"part": part, "meta": meta, "rows": [], "done": False}
        out.mkdir(parents=True, exist_ok=True)
        self.flush()

    def add(self, row: dict) -> None:
        self.doc["rows"].append(row)
        print(json.dumps(row), flush=True)
        self.flush()

    def finish(self, **extra) -> None:
        self.doc.update(extra, done=True)
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        tmp.replace(self.path)


def _bench():
    """bench/kernels.py as a module (bench/ is scripts, not a package): its impls, inputs, step and FLOP counts."""
    spec = importlib.util.spec_from_file_location("optsys_bench_kernels", ROOT / "bench" / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _meta(device: str) -> dict:
    import torch

    meta = {"torch": torch.__version__, "device": device}
    if device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    return meta


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------- tests


def part_tests(args) -> int:
    import pytest

    rec = Recorder(args.out, "tests", _meta(args.device))

    class Collect:
        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                row = {"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                       "seconds": round(report.duration, 3)}
                if report.failed:
                    row["error"] = str(report.longrepr)[-1500:]
                rec.add(row)

    marker = "gpu" if not args.tiny else "not gpu"  # tiny (CPU smoke): one cheap non-GPU test file instead
    target = ["tests/kernels"] if not args.tiny else ["tests/kernels/test_linear_logprobs.py", "-k", "bad_inputs"]
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "-m", marker, *target], plugins=[Collect()])
    outcomes = [r["outcome"] for r in rec.doc["rows"]]
    rec.finish(exit_code=int(rc), passed=outcomes.count("passed"), failed=outcomes.count("failed"),
               skipped=outcomes.count("skipped"))
    return int(rc)


# ---------------------------------------------------------------------------- big: N x V past 2^31


def _pieces_reference(hidden, weight, target, rows=1024):
    """CE (mean) loss, token log-probs and d(mean CE)/d(hidden, weight) in fp32 from the bf16 operands, in row
    pieces: the logits never exist whole, and no index reaches N x V."""
    import torch

    n = hidden.shape[0]
    w = weight.float()
    logp_t = torch.empty(n, device=hidden.device)
    gh = torch.empty(hidden.shape, device=hidden.device)
    gw = torch.zeros(w.shape, device=hidden.device)
    for i in range(0, n, rows):
        h = hidden[i : i + rows].float()
        t = target[i : i + rows]
        logp = torch.log_softmax(h @ w.T, dim=-1)
        logp_t[i : i + rows] = logp.gather(1, t[:, None]).squeeze(1)
        d = logp.exp_()
        d[torch.arange(t.numel(), device=t.device), t] -= 1
        d /= n
        gh[i : i + rows] = d @ w
        gw.addmm_(d.T, h)
        del logp, d
    return -logp_t.mean(), logp_t, gh, gw


def _rel_err(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def part_big(args) -> int:
    import torch
    from optsys.kernels import (
        chunked,
        fused_linear_cross_entropy,
        linear_cross_entropy_reference,
        linear_token_logprobs,
    )

    dev = args.device
    n, h, v = (300, 8, 1000) if args.tiny else (17000, 512, 128256)
    first_past = math.ceil(2**31 / v)  # the first row whose logits start past the 2^31-th element
    rec = Recorder(args.out, "big", {**_meta(dev), "n": n, "h": h, "v": v, "n_times_v": n * v,
                                     "past_2_31": n * v > 2**31, "first_row_past_2_31": first_past})
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(n, h, device=dev, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(v, h, device=dev, generator=g) / h**0.5).bfloat16().requires_grad_()
    target = torch.randint(0, v, (n,), device=dev, generator=g)
    t0 = time.perf_counter()
    ref_loss, ref_logp, ref_gh, ref_gw = _pieces_reference(hidden.detach(), weight.detach(), target)
    _sync(dev)
    rec.add({"impl": "pieces-reference", "seconds": round(time.perf_counter() - t0, 3), "loss": float(ref_loss)})
    past = slice(min(first_past, n - 1), n)  # tiny: the last row stands in
    backends = ["hybrid", "triton"] if dev == "cuda" else ["torch"]
    chunked._warn_once.cache_clear()
    ok = True
    for backend in backends + ["naive"]:
        for op in ("linear_ce", "logprobs"):
            row = {"impl": backend, "op": op}
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    _sync(dev)
                    t0 = time.perf_counter()
                    if op == "linear_ce":
                        out = (linear_cross_entropy_reference(hidden, weight, target) if backend == "naive" else
                               fused_linear_cross_entropy(hidden, weight, target, backend=backend))
                        gh, gw = torch.autograd.grad(out, (hidden, weight))
                    else:
                        out = (torch.log_softmax((hidden @ weight.T).float(), -1).gather(1, target[:, None])
                               .squeeze(1) if backend == "naive" else
                               linear_token_logprobs(hidden, weight, target, backend=backend))
                        (gh,) = torch.autograd.grad(out, hidden, torch.full_like(out, -1.0 / n))
                        gw = None
                    _sync(dev)
                    row["seconds"] = round(time.perf_counter() - t0, 3)
                row["out_dtype_fallback"] = any("out_dtype" in str(w.message) for w in caught)
                if op == "linear_ce":
                    row["loss_rel_err"] = abs(float(out.detach()) - float(ref_loss)) / abs(float(ref_loss))
                else:
                    row["logp_rel_err"] = _rel_err(out, ref_logp)
                    row["logp_rel_err_rows_past_2_31"] = _rel_err(out[past], ref_logp[past])
                row["grad_hidden_rel_err"] = _rel_err(gh, ref_gh)
                row["grad_hidden_rel_err_rows_past_2_31"] = _rel_err(gh[past], ref_gh[past])
                if gw is not None:
                    row["grad_weight_rel_err"] = _rel_err(gw, ref_gw)
                # bf16 grads and the naive path's bf16 logits: 2e-2; the fused fp32 logits: tighter on the values.
                errs = [x for k, x in row.items() if k.endswith("rel_err") or "rel_err_rows" in k]
                row["ok"] = all(math.isfinite(x) and x < 3e-2 for x in errs) and not row["out_dtype_fallback"]
                del out, gh, gw
            except Exception as e:  # noqa: BLE001 - record it, go on with the next
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:500]}")
            ok &= row["ok"]
            rec.add(row)
            if dev == "cuda":
                torch.cuda.empty_cache()
    rec.finish(ok=ok, warn_once_calls=chunked._warn_once.cache_info().currsize)
    return 0 if ok else 1


# ---------------------------------------------------------------------------- head: the Llama-3-8B lm_head


def lm_head_matmul_tflops(n, h, v, dtype, device, repeats=10) -> float:
    """The cuBLAS rate of the lm_head's own product, [N, H] @ [H, V] in dtype, on this device."""
    import torch

    a = torch.randn(n, h, device=device, dtype=dtype)
    b = torch.randn(v, h, device=device, dtype=dtype)
    a @ b.T
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b.T
    _sync(device)
    return 2 * n * h * v * repeats / (time.perf_counter() - t0) / 1e12


def _impls(bench, op: str, device: str, tiny: bool) -> dict:
    import functools

    naive = bench.impls(op, "cpu")["naive"]
    fused = bench.impls(op, "cpu")["fused"]
    out = {"naive": naive}
    for backend in (("hybrid", "triton") if device == "cuda" else ("torch",)):
        out[backend] = functools.partial(fused, backend=backend)
    liger = bench._liger_loss() if op == "linear_ce" and device == "cuda" else None
    if liger is not None:
        out["liger"] = liger
    return out


def part_head(args) -> int:
    import torch

    bench = _bench()
    dev = args.device
    n, h, v = (256, 64, 2000) if args.tiny else (8192, 4096, 128256)
    dtype = "bfloat16" if dev == "cuda" else "float32"
    repeats = 2 if args.tiny else 5
    meta = {**_meta(dev), "n": n, "h": h, "v": v, "dtype": dtype, "repeats": repeats}
    meta["matmul_tflops"] = lm_head_matmul_tflops(n, h, v, getattr(torch, dtype), dev)
    meta["fp32_grad_weight_mb"] = v * h * 4 / 2**20
    rec = Recorder(args.out, "head", meta)
    inputs = bench.make_inputs(n, h, v, dtype, dev)
    best = {}
    for op in ("linear_ce", "logprobs"):
        impls = _impls(bench, op, dev, args.tiny)
        # An impl whose warm-up step (compile included) took longer than this is timed once more, not 5 times:
        # the slow all-Triton backward must not eat the part's time limit.
        slow_s = 1e9 if args.tiny else 8.0
        for mode in ("fwd+bwd", "fwd"):  # the targets' rows first, should the part run out of time
            times = {k: [] for k in impls}
            peak = {k: 0.0 for k in impls}
            failed, row_note = {}, {}
            for r in range(repeats + 1):  # round 0: warm-up (compiles), not timed
                for name, fn in impls.items():
                    if name in failed:
                        continue
                    try:
                        if dev == "cuda":
                            torch.cuda.empty_cache()
                            base = torch.cuda.memory_allocated()
                            torch.cuda.reset_peak_memory_stats()
                        _sync(dev)
                        t0 = time.perf_counter()
                        out = bench.step(fn, mode, *inputs)
                        _sync(dev)
                        dt = time.perf_counter() - t0
                        if dev == "cuda":
                            out_bytes = sum(t.numel() * t.element_size() for t in (out if isinstance(out, tuple)
                                                                                     else (out,)))
                            peak[name] = max(peak[name], (torch.cuda.max_memory_allocated() - base - out_bytes) / 2**20)
                        del out
                        if r:
                            times[name].append(dt)
                        if r == 1 and dt > slow_s:
                            failed[name] = None  # one timed step is all it gets
                            row_note[name] = f"slow: {dt:.1f} s a step, timed once"
                    except Exception as e:  # noqa: BLE001 - an impl that fails (OOM, compile) is recorded
                        failed[name] = f"{type(e).__name__}: {str(e)[:400]}"
            for name in impls:
                row = {"op": op, "mode": mode, "impl": name}
                if name in row_note:
                    row["note"] = row_note[name]
                if failed.get(name):
                    row["error"] = failed[name]
                elif times[name]:
                    med = statistics.median(times[name])
                    tflops = bench.FLOPS_PER_NHV[mode] * n * h * v / med / 1e12
                    row.update(min_ms=1e3 * min(times[name]), median_ms=1e3 * med, tflops=tflops,
                               vs_matmul=tflops / meta["matmul_tflops"], times_ms=[1e3 * t for t in times[name]])
                    if dev == "cuda":
                        row["workspace_mb"] = peak[name]
                        row["workspace_beyond_fp32_gw_mb"] = peak[name] - (meta["fp32_grad_weight_mb"]
                                                                           if mode == "fwd+bwd" else 0)
                    best[(op, mode, name)] = row
                rec.add(row)
    rec.finish(targets=head_targets(best))
    return 0


def head_targets(best: dict) -> dict:
    """bench/README.md's targets for the hybrid path at the 8B head, from the head rows (None: not measured)."""
    ce, lp = best.get(("linear_ce", "fwd+bwd", "hybrid")), best.get(("logprobs", "fwd+bwd", "hybrid"))
    out = {}
    if ce:
        out["hybrid_ce_fwd_bwd_vs_matmul"] = ce["vs_matmul"]
        out["hybrid_ce_fwd_bwd_vs_matmul_ok"] = ce["vs_matmul"] >= 0.8
        if "workspace_beyond_fp32_gw_mb" in ce:
            out["hybrid_ce_workspace_beyond_fp32_gw_mb"] = ce["workspace_beyond_fp32_gw_mb"]
            out["hybrid_ce_workspace_ok"] = ce["workspace_beyond_fp32_gw_mb"] <= 1024
    if ce and lp:
        out["hybrid_logprobs_vs_ce_time"] = lp["median_ms"] / ce["median_ms"]
        out["hybrid_logprobs_vs_ce_time_ok"] = lp["median_ms"] / ce["median_ms"] <= 1.33
    return out


# ---------------------------------------------------------------------------- tiles: the Triton tile sweep


def part_tiles(args) -> int:
    import torch
    from optsys.kernels import fused_linear_cross_entropy
    from optsys.kernels import triton_tiles as tt

    bench = _bench()
    dev = args.device
    n, h, v = (40, 24, 300) if args.tiny else (4096, 4096, 128256)
    dtype = "bfloat16" if dev == "cuda" else "float32"
    repeats = 1 if args.tiny else 2
    rec = Recorder(args.out, "tiles", {**_meta(dev), "n": n, "h": h, "v": v, "dtype": dtype, "repeats": repeats,
                                       "default": tt.GPU_TILE_CFG["fwd"]})
    inputs = bench.make_inputs(n, h, v, dtype, dev)
    ref = None
    real_cfg = tt._kernel_cfg
    candidates = tt.TILE_CANDIDATES[:2] if args.tiny else tt.TILE_CANDIDATES
    try:
        for cand in candidates:
            cfg = tt.tile_cfg(cand)
            if dev != "cuda":  # the interpreter takes no warps / stages
                cfg = {k: cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")}
            tt._kernel_cfg = lambda hidden, _c=cfg: {**real_cfg(hidden), "fwd": _c, "bwd": _c}
            row = {"config": list(cand)}
            try:
                times = []
                for r in range(repeats + 1):
                    _sync(dev)
                    t0 = time.perf_counter()
                    loss = fused_linear_cross_entropy(*inputs[:2], inputs[2], backend="triton")
                    gh, gw = torch.autograd.grad(loss, inputs[:2])
                    _sync(dev)
                    if r:
                        times.append(time.perf_counter() - t0)
                if ref is None:
                    ref = (float(loss.detach()), gh.float(), gw.float())
                med = statistics.median(times)
                row.update(median_ms=1e3 * med, min_ms=1e3 * min(times), tflops=6 * n * h * v / med / 1e12,
                           loss_diff=abs(float(loss.detach()) - ref[0]), grad_hidden_rel_err=_rel_err(gh, ref[1]),
                           grad_weight_rel_err=_rel_err(gw, ref[2]))
            except Exception as e:  # noqa: BLE001 - a config that fails to compile or launch is a result
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            rec.add(row)
    finally:
        tt._kernel_cfg = real_cfg
    timed = [r for r in rec.doc["rows"] if "median_ms" in r]
    rec.finish(fastest=min(timed, key=lambda r: r["median_ms"])["config"] if timed else None)
    return 0


# ---------------------------------------------------------------------------- sft: a short run of a 0.5B model


def part_sft(args) -> int:
    run_dir = Path(args.run_dir)
    model = "tiny:test" if args.tiny else "tiny:gpu-0.5b"
    overrides = [f"model.name_or_path={model}", "trainer.precision=bf16", "data.num_train=400", "data.num_eval=10",
                 "data.max_tokens=1024", f"trainer.batch_tokens={2048 if args.tiny else 8192}",
                 "trainer.max_steps=3", "trainer.log_every=1", "trainer.progress=false", "trainer.plots=false",
                 "eval.before=false", "eval.after=false", f"output_dir={run_dir}"]
    rec = Recorder(args.out, "sft", {**_meta(args.device), "overrides": overrides})
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "optsys.train", *overrides], capture_output=True, text=True)
    rec.add({"exit_code": res.returncode, "seconds": round(time.perf_counter() - t0, 1),
             "stderr_tail": res.stderr[-2000:]})
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            rec.add({"metrics": json.loads(line)})
    summary = run_dir / "summary.json"
    rec.finish(summary=json.loads(summary.read_text()) if summary.exists() else None)
    return res.returncode


PARTS = {"tests": part_tests, "big": part_big, "head": part_head, "tiles": part_tiles, "sft": part_sft}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=list(PARTS))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench" / "results"))
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: the CPU smoke test")
    ap.add_argument("--run-dir", default="/tmp/optsys-first-sft", help="sft: the run's output folder")
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return PARTS[args.part](args)


if __name__ == "__main__":
    sys.exit(main())
