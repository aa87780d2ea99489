"""bench/preference.py: fused vs naive DPO steps through the harness; every repeat checked against naive's."""

import pytest
from helpers import load_bench


def rep(s, loss=0.7, chosen=(-5.0, -6.0), grad=2.0, peak=900.0):
    return {"s_per_step": s, "tokens_per_s": 100 / s, "slot_efficiency": 1.0, "real_tokens_per_step": 100,
            "lm_head_rows_per_step": 50, "forwards_per_step": 1, "base_mb": 400.0, "peak_mb": peak,
            "check": {"loss": loss, "chosen_logps": list(chosen), "rejected_logps": [-7.0, -8.0], "grad_norm": grad}}


def test_preference_check_covers_every_repeat_and_rows_give_min_median():
    preference = load_bench("preference")
    runs = {"naive": [rep(4.0), rep(5.0), rep(4.5)],
            "fused": [rep(2.0, peak=600.0), rep(1.0, peak=550.0), rep(3.0, peak=500.0)]}
    assert preference.compare(runs, rtol=1e-4, atol=1e-6) == []
    rows = {r["key"]: r for r in preference.summarize(runs)}
    assert rows["fused"]["s_per_step_median"] == 2.0 and rows["fused"]["s_per_step_min"] == 1.0
    assert rows["fused"]["speed_vs_naive"] == pytest.approx(50.0 / (100 / 4.5))
    assert rows["fused"]["mem_vs_naive"] == pytest.approx(600.0 / 900.0)
    runs["fused"][2] = rep(3.0, chosen=(-5.0, -6.1), peak=500.0)  # a later repeat computing something else is caught
    (problem,) = preference.compare(runs, rtol=1e-4, atol=1e-6)
    assert problem.startswith("chosen_logps: fused (repeat 3)")
