"""bench/packing.py: packed vs padded through the harness, min and median over repeats."""

import pytest
from helpers import load_bench


def test_packing_rows_give_min_median_and_the_ratio_to_padded():
    packing = load_bench("packing")

    def rep(s, tps, peak=500.0):
        return {"s_per_step": s, "tokens_per_s": tps, "slot_efficiency": 0.5, "real_tokens_per_step": 100.0,
                "peak_mb": peak}

    runs = {"padded": [rep(2.0, 100.0), rep(2.2, 90.0, 600.0), rep(9.0, 20.0)],
            "packed": [rep(1.0, 200.0), rep(1.1, 180.0), rep(1.2, 170.0)]}
    rows = {r["key"]: r for r in packing.summarize(runs)}
    assert rows["padded"]["s_per_step_median"] == 2.2 and rows["padded"]["s_per_step_min"] == 2.0
    assert rows["packed"]["speed_vs_padded"] == pytest.approx(180.0 / 90.0) and rows["padded"]["speed_vs_padded"] == 1
    assert rows["padded"]["peak_mb"] == 600.0 and len(rows["packed"]["s_per_step"]["values"]) == 3
