"""profiling/first_call.py's tile sweep under the Triton interpreter: every candidate runs and agrees with the first."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tile_sweep_runs_each_candidate_under_the_interpreter(tmp_path, triton_cpu):
    from optsys.kernels import triton_tiles as tt

    spec = importlib.util.spec_from_file_location("first_call", ROOT / "profiling" / "first_call.py")
    fc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fc)
    real = tt._kernel_cfg
    assert fc.main(["tiles", "--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert tt._kernel_cfg is real  # the sweep's override is undone
    doc = json.loads((tmp_path / "first-tiles.json").read_text())
    assert doc["done"] and [r["config"] for r in doc["rows"]] == [list(c) for c in tt.TILE_CANDIDATES[:2]]
    for r in doc["rows"]:
        assert "error" not in r, r
        assert r["loss_diff"] < 1e-5 and r["grad_hidden_rel_err"] < 1e-5 and r["grad_weight_rel_err"] < 1e-5
    assert doc["fastest"] in [r["config"] for r in doc["rows"]]
