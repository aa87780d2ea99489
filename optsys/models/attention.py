"""Packed-row attention without flash-attn: sdpa run once per packed sequence.

A packed row of T tokens holding sequences of lengths L_1..L_n needs sum(L_i^2) attention work, but sdpa under a
dense block-diagonal [T, T] mask computes all T^2 scores and masks most of them away: with rows of 2048 tokens
and ~200-token sequences, 8.6x the attention scores the sequences need (bench/e2e.py's SFT set; on the 50.9M
tiny model the dense-mask step took 1.71x as long). flash-attn's varlen kernel avoids that on GPUs from
`position_ids`; this is the same idea for sdpa (CPU, or a GPU without flash-attn): split q, k, v at the sequence
boundaries and run transformers' own `sdpa_attention_forward` causally on each piece, so the math is sdpa's.

The implementation is registered with transformers as `ATTN_IMPLEMENTATION`; `model.attn_implementation:
sdpa_varlen` selects it. It is not `auto`'s choice yet: it changes float summation order (~1e-6), and three
seeded recipe checks whose outcome sits on a learning transition moved with it in CI (grpo_tiny's SFT start
0.678 -> 0.906, leaving GRPO less than its +0.1 headroom; see bench/README.md, "End to end"). It takes the
per-sequence path only when the forward carries `packed_seq_lens` (optsys.models.packed.packed_hidden passes
it); every other call (generation, padded batches, a model with a sliding window) goes to plain sdpa with the
mask it was given, so it is sdpa everywhere else.
"""

from __future__ import annotations

import torch

ATTN_IMPLEMENTATION = "optsys_sdpa_varlen"
_registered = False


def sdpa_varlen_attention(module, query, key, value, attention_mask, packed_seq_lens=None, **kwargs):
    """query [1, heads, T, D], key/value [1, kv_heads, T, D] -> ([1, T, heads, D], None), like sdpa's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    per_sequence = (packed_seq_lens is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
                    == sum(packed_seq_lens) and getattr(module, "sliding_window", None) is None)
    if not per_sequence:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    pieces = zip(query.split(packed_seq_lens, 2), key.split(packed_seq_lens, 2), value.split(packed_seq_lens, 2))
    out = [sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0] for q, k, v in pieces]
    return torch.cat(out, dim=1), None


def register() -> str:
    """Make `ATTN_IMPLEMENTATION` loadable (`attn_implementation=`); its masks are sdpa's. Returns the name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTN_IMPLEMENTATION, sdpa_varlen_attention)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
        _registered = True
    return ATTN_IMPLEMENTATION
