"""bench/kernels.py: every impl of a case measured in interleaved rounds, min and median over rounds."""

import pytest
from helpers import load_bench


def test_kernel_case_rows_give_min_and_median_over_rounds():
    kernels = load_bench("kernels")
    shape = {"name": "s", "n": 1, "h": 1, "v": 1, "dtype": "float32"}
    rounds = {"naive": [{"time_ms": t, "peak_extra_mb": 100.0} for t in (10.0, 30.0, 12.0)],
              "fused": [{"time_ms": t, "peak_extra_mb": 10.0} for t in (9.0, 6.0, 50.0)]}
    rows = {r["impl"]: r for r in kernels.summarize_case(rounds, shape, "linear_ce", "fwd")}
    assert rows["naive"]["time_ms"] == 12.0 and rows["naive"]["time_ms_min"] == 10.0
    assert rows["fused"]["time_ms"] == 9.0 and rows["fused"]["time_ms_min"] == 6.0  # a slow round does not move it
    assert rows["fused"]["time_vs_naive"] == pytest.approx(9.0 / 12.0) and rows["naive"]["time_vs_naive"] == 1.0
    assert rows["fused"]["mem_vs_naive"] == pytest.approx(0.1)
    assert rows["fused"]["time_ms_rounds"] == [9.0, 6.0, 50.0]
