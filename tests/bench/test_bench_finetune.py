"""bench/finetune.py: full vs LoRA through the harness; LoRA's step-0 loss checked against full fine-tuning's."""

import pytest
from helpers import load_bench


def rep(s_per_step, loss, peak=1000.0):
    return {"s_per_step": s_per_step, "tokens_per_s": 100 / s_per_step, "trainable_params": 10, "params": 100,
            "peak_mb": peak, "loss_step0": loss}


def test_finetune_rows_and_the_step0_loss_check():
    finetune = load_bench("finetune")
    runs = {"full": [rep(2.0, 5.0), rep(3.0, 5.0), rep(2.5, 5.0)],
            "lora": [rep(1.0, 5.0, 600.0), rep(9.0, 5.0, 700.0), rep(1.25, 5.0, 650.0)]}
    rows = {r["key"]: r for r in finetune.summarize(runs)}
    assert rows["lora"]["s_per_step_median"] == 1.25 and rows["lora"]["s_per_step_min"] == 1.0
    assert rows["lora"]["speed_vs_full"] == pytest.approx(2.5 / 1.25) and rows["full"]["speed_vs_full"] == 1.0
    assert rows["lora"]["mem_vs_full"] == pytest.approx(0.7)  # the largest peak over repeats
    assert finetune.check_losses(runs) == []
    runs["lora"][1]["loss_step0"] = 5.01  # a LoRA that does not start at the base model's function
    (problem,) = finetune.check_losses(runs)
    assert "lora (repeat 2) step-0 loss" in problem
    runs["qlora"] = [rep(4.0, 5.3)]  # nf4 rounding moves QLoRA's loss: reported, not checked
    assert len(finetune.check_losses(runs)) == 1


def test_qlora_without_bitsandbytes_is_an_absent_row(monkeypatch):
    finetune = load_bench("finetune")
    monkeypatch.setattr(finetune.harness, "missing_module", lambda module, what: f"{what}: `{module}` is not installed")
    assert finetune.plan(False) == (["full", "lora"], {})
    names, absent = finetune.plan(True)
    assert names == ["full", "lora"] and absent == {finetune.LABELS["qlora"]: "QLoRA: `bitsandbytes` is not installed"}
    monkeypatch.setattr(finetune.harness, "missing_module", lambda module, what: None)
    assert finetune.plan(True) == (["full", "lora", "qlora"], {})
