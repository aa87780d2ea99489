"""The Triton kernels compile for an H100 (sm_90) on this CPU machine: profiling/compile_check.py.

The interpreter tests check the math; this checks what only a GPU compile shows (lowering, shared memory
per block, tensor-core instructions), with Triton's own NVIDIA backend and ptxas and no GPU.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HAS_NVIDIA_BACKEND = importlib.util.find_spec("triton.backends.nvidia") is not None


def compile_check(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile afresh, leave no cache behind
    out = tmp_path / "compile.json"
    res = subprocess.run([sys.executable, str(ROOT / "profiling" / "compile_check.py"), "--json", str(out), *args],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(out.read_text())["rows"]


def check_rows(rows, expect):
    assert sorted({(r["kernel"], r["dtype"]) for r in rows}) == sorted(expect)
    for r in rows:
        assert r["ok"] and r["smem_ok"], r
        if r["kernel"] in ("_stats_kernel", "_grad_kernel") and r["dtype"] == "bf16":
            assert r["wgmma"], f"{r['kernel']}: tl.dot did not lower to Hopper wgmma tensor-core instructions"
            assert r["pipelined"], f"{r['kernel']}: the loads feeding tl.dot are not software-pipelined"


@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="this triton build has no NVIDIA backend")
def test_default_cuda_path_compiles_for_sm90(tmp_path):
    # The hybrid row kernels (the CUDA default) in both dtypes, and the bf16 tiles.
    rows = compile_check(tmp_path, "--kernels", "_row_stats_kernel,_row_grad_kernel")
    check_rows(rows, [(k, d) for k in ("_row_stats_kernel", "_row_grad_kernel") for d in ("bf16", "fp32")])
    rows = compile_check(tmp_path, "--kernels", "_stats_kernel,_grad_kernel", "--dtypes", "bf16")
    check_rows(rows, [("_stats_kernel", "bf16"), ("_grad_kernel", "bf16")])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="this triton build has no NVIDIA backend")
def test_every_specialization_compiles_for_sm90(tmp_path):
    rows = compile_check(tmp_path)
    check_rows(rows, [(k, d) for k in ("_stats_kernel", "_grad_kernel", "_row_stats_kernel", "_row_grad_kernel")
                      for d in ("bf16", "fp32")])
