"""LoRA / QLoRA: only adapters train, merged export equals base + adapter, clear errors."""

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from optsys.config import ConfigError, LoraConfig, ModelConfig
from optsys.models import lora as lora_mod
from optsys.models.load import load_model_and_tokenizer
from optsys.models.packed import lm_head_weight, packed_hidden
from optsys.validation import load_config

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes missing")


def train_a_few_steps(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (1, 24), generator=gen)
    pos = torch.arange(24)[None]
    for _ in range(steps):
        hidden = packed_hidden(model, ids, pos, [24])
        loss = torch.nn.functional.cross_entropy(hidden[:-1] @ lm_head_weight(model).T, ids[0, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("quantize", ["none", pytest.param("nf4", marks=needs_bnb)])
def test_only_adapter_weights_change_and_merge_matches(tiny_path, quantize):
    cfg = ModelConfig(name_or_path=str(tiny_path), lora=LoraConfig(r=8, alpha=16, quantize=quantize))
    model, _ = load_model_and_tokenizer(cfg, torch.device("cpu"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = snapshot(model)
    train_a_few_steps(model)
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:5]

    ids = torch.randint(0, 500, (2, 11))
    model.eval()
    merged = lora_mod.merged_model(model).eval()
    assert not lora_mod.is_peft(merged)
    with torch.no_grad():
        want = model(ids).logits
        got = merged(ids).logits
    if quantize == "none":
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    else:
        # The merge folds the adapter into the dequantized fp base, while the 4-bit model computes
        # with nf4 weights: they may differ by the quantization error, measured here on the base alone.
        base = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
        with torch.no_grad(), model.disable_adapter():
            quant_base = model(ids).logits
        with torch.no_grad():
            fp_base = base(ids).logits
        quant_err = (quant_base - fp_base).abs().max()
        assert (got - want).abs().max() <= 2 * quant_err + 1e-3
        assert (got - fp_base).abs().max() > 1e-3  # and the adapter is really in the merged weights


def test_merged_equals_base_plus_delta(tiny_path):
    """Merged weights are W + (alpha / r) * B @ A for every adapted layer."""
    cfg = ModelConfig(name_or_path=str(tiny_path), lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    model, _ = load_model_and_tokenizer(cfg, torch.device("cpu"))
    train_a_few_steps(model)
    sd = model.state_dict()
    merged = lora_mod.merged_model(model).state_dict()
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    expect = sd[f"{key}.base_layer.weight"] + (8 / 4) * sd[f"{key}.lora_B.default.weight"] @ sd[
        f"{key}.lora_A.default.weight"]
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expect)


def test_unknown_target_module_names_what_exists(tiny_path):
    cfg = ModelConfig(name_or_path=str(tiny_path), lora=LoraConfig(r=4, target_modules=["q_proj", "qkv"]))
    with pytest.raises(ValueError, match=r"\['qkv'\].*linear layers are: .*q_proj"):
        load_model_and_tokenizer(cfg, torch.device("cpu"))


def test_qlora_without_bitsandbytes_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(lora_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        lora_mod.quantization_config(LoraConfig(r=4, quantize="nf4"), torch.float32)


def test_lora_config_validation():
    with pytest.raises(ConfigError, match="model.lora.r must be > 0"):
        load_config(overrides=["model.lora.quantize=nf4"])
    cfg = load_config(overrides=["model.lora.r=8", "model.lora.target_modules=q_proj,v_proj"])
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]


def test_save_final_writes_adapter_and_merged(tmp_path, tiny_path):
    cfg = ModelConfig(name_or_path=str(tiny_path), lora=LoraConfig(r=4, save_merged=True))
    model, tok = load_model_and_tokenizer(cfg, torch.device("cpu"))
    train_a_few_steps(model, steps=1)
    lora_mod.save_final(model, tok, tmp_path, cfg.lora)
    adapter = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and (tmp_path / "final" / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final-merged")
    ids = torch.randint(0, 500, (1, 9))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
