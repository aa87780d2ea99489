"""The profiling entry scripts run on CPU: a fused step under torch.profiler names its chunks."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_profile_kernels_writes_trace_and_table(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "profiling" / "profile_kernels.py"), "--device", "cpu",
                          "--shape", "300,32,2000", "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    stem = tmp_path / "profile-linear_ce-fused-300x32x2000-fwd_bwd"
    table = Path(f"{stem}.txt").read_text()
    assert "aten::mm" in table and "optsys.torch_stats+grads chunk 0" in table
    trace = json.loads(Path(f"{stem}.json").read_text())
    assert any(e.get("name", "").startswith("optsys.torch_stats+grads chunk") for e in trace["traceEvents"])


def test_profile_kernels_rejects_unknown_impl(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "profiling" / "profile_kernels.py"), "--device", "cpu",
                          "--impl", "fused-hybrid", "--shape", "30,8,100", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "--impl: one of ['fused', 'naive'] on cpu" in res.stderr
