"""Compile every GPU specialization of the optsys Triton kernels for a GPU target, on any machine.

    python profiling/compile_check.py [--arch 90] [--json out.json]

Triton's wheel carries its NVIDIA backend and ptxas, so the kernels compile to a cubin for an H100
(sm_90) here, without a GPU: what the interpreter cannot show (lowering errors, shared memory over the
per-block limit, register spills, whether `tl.dot` became Hopper's wgmma tensor-core instructions) shows
here, before a GPU session spends its time. Each kernel is compiled with the block sizes and warps the
launchers use on CUDA (`_kernel_cfg`, `_row_block` in kernels/triton_tiles.py), for bf16 and fp32, plain
and with every option on.
With --all-configs the tile kernels are compiled at every entry of TILE_CANDIDATES (the first GPU session's
sweep). Prints one line per specialization; exits 1 if any fails to compile or needs more shared memory than a
block may have (spills are reported, not failed: read spill_bytes). Run it with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SMEM_LIMIT = {90: 232448, 80: 166912, 89: 101376}  # max dynamic shared memory per block (bytes)


def _specs(cfg_tile: dict, cfg_row: dict, group_n: int) -> list[dict]:
    """(kernel, signature types, constexprs, options) for each launch the CUDA paths make."""
    out = []
    for dt in ("bf16", "fp32"):
        ieee = dt == "fp32"
        for full in (False, True):
            flags = {"HAS_BIAS": full, "SOFTCAP": full}
            tile = {k: cfg_tile[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")}
            opts = {k: cfg_tile[k] for k in ("num_warps", "num_stages")}
            out.append({
                "kernel": "_stats_kernel", "dtype": dt, "full": full, "options": opts,
                "types": {"H": f"*{dt}", "W": f"*{dt}", "B": f"*{dt}", "T": "*i64", "M_out": "*fp32",
                          "L_out": "*fp32", "SS_out": "*fp32", "A_out": "*fp32", "ST_out": "*fp32",
                          "N": "i32", "V": "i32", "D": "i32", "cols_per_split": "i32", "n_splits": "i32",
                          "inv_temp": "fp32", "softcap": "fp32"},
                "constexprs": {**flags, "SUM_S": full, "ENTROPY": full, "UPCAST": False, "IEEE": ieee,
                               "GROUP_N": group_n, **tile}})
            out.append({
                "kernel": "_grad_kernel", "dtype": dt, "full": full, "options": opts,
                "types": {"H": f"*{dt}", "W": f"*{dt}", "B": f"*{dt}", "T": "*i64", "LSE": "*fp32", "A": "*fp32",
                          "BETA": "*fp32", "G": "*fp32", "DELTA": "*fp32", "GH": "*fp32", "GW": "*fp32",
                          "GB": "*fp32", "N": "i32", "V": "i32", "D": "i32", "inv_temp": "fp32", "softcap": "fp32",
                          "filter_eps": "fp32"},
                "constexprs": {**flags, "HAS_GAMMA": full, "HAS_DELTA": full, "NEED_GH": True, "NEED_GW": True,
                               "NEED_GB": full, "FILTER": full, "UPCAST": False, "IEEE": ieee, **tile}})
            row_opts = {"num_warps": cfg_row["num_warps"]}
            # The hybrid body's logits tile is fp32 whatever the inputs; its d_logits tile is in their dtype.
            out.append({
                "kernel": "_row_stats_kernel", "dtype": dt, "full": full, "options": row_opts,
                "types": {"S": "*fp32", "B": f"*{dt}", "T": "*i64", "OUT": "*fp32", "R": "i32", "V": "i32",
                          "stride": "i32", "inv_temp": "fp32", "softcap": "fp32"},
                "constexprs": {**flags, "SUM_S": full, "ENTROPY": full, "BLOCK_V": cfg_row["BLOCK_V"]}})
            out.append({
                "kernel": "_row_grad_kernel", "dtype": dt, "full": full, "options": row_opts,
                "types": {"S": "*fp32", "DZ": f"*{dt}", "B": f"*{dt}", "T": "*i64", "LSE": "*fp32", "A": "*fp32",
                          "BETA": "*fp32", "G": "*fp32", "DELTA": "*fp32", "V": "i32", "stride": "i32",
                          "dz_stride": "i32", "inv_temp": "fp32", "softcap": "fp32"},
                "constexprs": {**flags, "HAS_GAMMA": full, "HAS_DELTA": full, "BLOCK_V": cfg_row["BLOCK_V"]}})
    return out


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes, from ptxas -v on the kernel's PTX (the same ptxas Triton uses)."""
    from triton.backends.nvidia import compiler as nv

    ptxas = nv.get_ptxas(arch).path if hasattr(nv, "get_ptxas") else None
    if ptxas is None:
        return {}
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", str(src),
                              "-o", str(Path(d) / "k.cubin")], capture_output=True, text=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_bytes": int(spill.group(1)) + int(spill.group(2)) if spill else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10: 90 (H100/H200), 80 (A100)")
    ap.add_argument("--kernels", help="comma-separated kernel names (default: all)")
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp32")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--all-configs", action="store_true",
                    help="the tile kernels at every TILE_CANDIDATES entry (triton_tiles.py), not only GPU_TILE_CFG")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    import triton
    from optsys.kernels import triton_tiles as tt
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tt._triton()
    assert tt.GPU_TILE_CFG["fwd"] == tt.GPU_TILE_CFG["bwd"], "compile both configs if they differ"
    tile_cfgs = [tt.tile_cfg(c) for c in tt.TILE_CANDIDATES] if args.all_configs else [{**tt.GPU_TILE_CFG["bwd"]}]
    target = GPUTarget("cuda", args.arch, 32)
    results, failed = [], False
    specs = []
    for i, tile_cfg in enumerate(tile_cfgs):  # the row kernels do not depend on the tile config: once
        all_specs = _specs(tile_cfg, tt._row_block(128256, True), tt.STATS_GROUP["gpu"]["GROUP_N"])
        specs += [s for s in all_specs if s["dtype"] in args.dtypes.split(",")
                  and (args.kernels is None or s["kernel"] in args.kernels.split(","))
                  and (i == 0 or not s["kernel"].startswith("_row"))]
    for spec in specs:
        fn = getattr(tt, spec["kernel"])
        types = dict(spec["types"])
        types.update({k: "constexpr" for k in spec["constexprs"]})
        signature = {name: types[name] for name in fn.arg_names}
        # As the launcher specializes at the Llama-3-8B shape: pointers (torch allocations) and the integer
        # sizes N = 8192, D = 4096, V = 128256 (and the strides and split widths made of them) are multiples of
        # 16; the split count is not.
        # Without these hints a bf16 row's alignment is unknown and Triton cannot pipeline the loads.
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if types[name][0] == "*" or (types[name] == "i32" and name != "n_splits")}
        row = {k: spec[k] for k in ("kernel", "dtype", "full")}
        if not spec["kernel"].startswith("_row"):
            row["config"] = [spec["constexprs"][k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")] + [
                spec["options"]["num_warps"], spec["options"]["num_stages"]]
        try:
            src = ASTSource(fn=fn, signature=signature, constexprs=spec["constexprs"], attrs=attrs)
            k = triton.compile(src, target=target, options=spec["options"])
            ptx = k.asm["ptx"]
            row.update(ok=True, shared_bytes=k.metadata.shared, wgmma="wgmma" in ptx,
                       pipelined=("async_copy" in k.asm["ttgir"] or "async_tma" in k.asm["ttgir"]),
                       mma=bool(re.search(r"\bmma\.sync|wgmma", ptx)), **_ptxas_usage(ptx, args.arch))
            row["smem_ok"] = row["shared_bytes"] <= SMEM_LIMIT.get(args.arch, 101376)
            failed |= not row["smem_ok"]
        except Exception as e:  # noqa: BLE001 - report every specialization, then fail
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
            failed = True
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "triton": triton.__version__, "rows": results},
                                              indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
