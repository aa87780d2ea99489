"""Packed rows must give the same logits as running each sequence alone."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from optsys.models import attention
from optsys.models.load import pick_attn_implementation
from optsys.models.packed import block_diagonal_causal_mask, lm_head_weight, packed_hidden
from optsys.models.tiny import build_tiny

VARLEN = attention.register()


@pytest.mark.parametrize("preset", ["test", "test-llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", VARLEN])
def test_packed_logits_equal_per_sequence_logits(tiny_cache, preset, attn):
    model = AutoModelForCausalLM.from_pretrained(build_tiny(preset, cache_dir=tiny_cache),
                                                 attn_implementation=attn).eval()
    gen = torch.Generator().manual_seed(1)
    lens = [7, 13, 1, 5]
    seqs = [torch.randint(0, 500, (n,), generator=gen) for n in lens]
    input_ids = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(n) for n in lens])[None]
    with torch.no_grad():
        packed = packed_hidden(model, input_ids, position_ids, lens) @ lm_head_weight(model).T
        alone = torch.cat([model(s[None]).logits[0] for s in seqs])
        # and the check can fail: without the mask, sequences leak into each other
        leaky = model(input_ids, position_ids=position_ids).logits[0]
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)
    assert (leaky - alone).abs().max() > 1e-2


def test_block_diagonal_mask_layout():
    m = block_diagonal_causal_mask([2, 3], "cpu")[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(m, expected)
    add = block_diagonal_causal_mask([2, 3], "cpu", additive_dtype=torch.float32)[0, 0]
    assert torch.equal(add == 0, expected)


def test_attention_choices_without_flash_attn():
    assert pick_attn_implementation("sdpa_varlen", torch.device("cpu")) == VARLEN
    assert pick_attn_implementation("auto", torch.device("cpu")) == "sdpa"  # the masked path, for now
    assert pick_attn_implementation("sdpa", torch.device("cpu")) == "sdpa"


@pytest.mark.parametrize("preset", ["test", "test-llama"])
def test_varlen_attention_runs_sdpa_once_per_sequence_and_matches_the_mask_path(tiny_cache, preset, monkeypatch):
    """Forward and gradients equal the block-mask sdpa path on odd lengths, and sdpa really is called once per
    sequence and layer, causal and unmasked (not the dense [T, T] fallback)."""
    import transformers.integrations.sdpa_attention as sdpa_module

    path = build_tiny(preset, cache_dir=tiny_cache)
    lens = [9, 1, 17, 4]
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 500, (1, sum(lens)), generator=gen)
    position_ids = torch.cat([torch.arange(n) for n in lens])[None]
    results = {}
    original = sdpa_module.sdpa_attention_forward
    for attn in ("sdpa", VARLEN):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32)
        calls = []

        def counting(module, query, key, value, attention_mask, *args, calls=calls, **kwargs):
            calls.append((query.shape[2], attention_mask is None, kwargs.get("is_causal")))
            return original(module, query, key, value, attention_mask, *args, **kwargs)

        monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", counting)
        hidden = packed_hidden(model, input_ids, position_ids, lens)
        (hidden.float().pow(2).mean()).backward()
        monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", original)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[attn] = (hidden.detach(), grads, calls)
    layers = model.config.num_hidden_layers
    assert results[VARLEN][2] == [(n, True, True) for _ in range(layers) for n in lens]
    torch.testing.assert_close(results[VARLEN][0], results["sdpa"][0], atol=1e-5, rtol=1e-5)
    assert results["sdpa"][1].keys() == results[VARLEN][1].keys() and len(results["sdpa"][1]) > 5
    for name, grad in results["sdpa"][1].items():
        torch.testing.assert_close(results[VARLEN][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
