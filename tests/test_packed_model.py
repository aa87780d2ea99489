"""Packed rows must give the same logits as running each sequence alone."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from optsys.models.packed import block_diagonal_causal_mask, lm_head_weight, packed_hidden
from optsys.models.tiny import build_tiny


@pytest.mark.parametrize("preset", ["test", "test-llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
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
