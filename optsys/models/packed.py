"""Packing-aware forward: final hidden states of packed rows, attention kept inside each sequence.

Restarting position_ids alone does not separate packed sequences under sdpa or eager attention
(logits drift by ~1.0; verified on transformers 5.19). So on those paths we pass an explicit 4D
block-diagonal causal mask. It is O(T^2) memory: fine for CPU rows of a few thousand tokens.
With flash_attention_2, transformers derives varlen cu_seqlens from the restarting position_ids,
so no mask is built at all; with optsys's `optsys_sdpa_varlen` (`model.attn_implementation: sdpa_varlen`,
optsys.models.attention) sdpa runs once per sequence and the mask is only a fallback.
"""

from __future__ import annotations

import types

import torch

from optsys.kernels import fused_linear_cross_entropy, linear_token_logprobs
from optsys.losses.sequence import IGNORE_INDEX, _token_logprobs, sequence_logprobs
from optsys.models.attention import ATTN_IMPLEMENTATION
from optsys.models.heads import output_head
from optsys.telemetry.nvtx import phase


def block_diagonal_causal_mask(seq_lens: list[int], device, *, additive_dtype=None) -> torch.Tensor:
    """[1, 1, T, T] mask: query i sees key j iff same sequence and j <= i.

    Boolean (True = attend) for sdpa; with `additive_dtype`, 0 / -inf-like floats for eager, which
    silently misreads a boolean mask.
    """
    lens = torch.as_tensor(seq_lens, device=device)
    seg = torch.repeat_interleave(torch.arange(len(seq_lens), device=device), lens)
    total = sum(int(n) for n in seq_lens)  # from the host's lengths: lens.sum() on a GPU would wait for it
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril_()
    mask = (seg[:, None] == seg[None, :]) & causal
    if additive_dtype is not None:
        mask = torch.zeros(mask.shape, dtype=additive_dtype, device=device).masked_fill_(
            ~mask, torch.finfo(additive_dtype).min
        )
    return mask[None, None]


def backbone(model):
    """The decoder stack without the lm_head (returns final, normed hidden states)."""
    return model.get_decoder()


def lm_head_weight(model) -> torch.Tensor:
    """The lm_head matrix alone; losses use `output_head(model)`, which also carries bias, scale and softcap."""
    return model.get_output_embeddings().weight


def packed_hidden(model, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """Hidden states [T, H] of a packed row input_ids [1, T]; no logits are computed."""
    impl = model.config._attn_implementation
    extra = {}
    if impl == "flash_attention_2":
        mask = None
    elif impl == "eager":
        mask = block_diagonal_causal_mask(seq_lens, input_ids.device, additive_dtype=model.dtype)
    else:
        mask = block_diagonal_causal_mask(seq_lens, input_ids.device)
        if impl == ATTN_IMPLEMENTATION:
            # sdpa per sequence; the mask stays, so a model whose layers do not pass the keyword on is still right
            extra["packed_seq_lens"] = tuple(int(n) for n in seq_lens)
    with phase("forward"):
        out = backbone(model)(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False,
                              **extra)
    return out.last_hidden_state[0]


def padded_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden states [B*L, H] of a right-padded batch (the baseline packing is measured against)."""
    with phase("forward"):
        out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])


def token_loss_sum(model, targets: torch.Tensor, *, input_ids: torch.Tensor, backend: str = "auto",
                   position_ids: torch.Tensor | None = None, seq_lens: list[int] | None = None,
                   attention_mask: torch.Tensor | None = None, reduction: str = "sum") -> torch.Tensor:
    """Sum of token cross-entropies from hidden states through the fused kernel (no [T, V] logits).

    Packed when `seq_lens` is given ([1, T] row), else padded ([B, L] with attention_mask).
    reduction="none" gives the per-position losses [T] instead (0 where the target is -100).
    The logits are the model's own: its output layer's bias, scale and softcap included (output_head).
    Call it through `model.token_loss_sum(...)` after `attach_forward_methods(model)`: under FSDP2 that
    method is registered as a forward, so the root's parameters (embeddings, final norm, lm_head) are
    all-gathered around it exactly as they are around `forward`.
    """
    if seq_lens is not None:
        hidden = packed_hidden(model, input_ids, position_ids, seq_lens)
    else:
        hidden = padded_hidden(model, input_ids, attention_mask)
    head = output_head(model)
    hidden, bias = head.scaled(hidden)  # the CE op takes no scale
    with phase("loss.ce"):  # lm_head + cross-entropy, one fused kernel
        return fused_linear_cross_entropy(hidden, head.weight, targets.reshape(-1), bias=bias, softcap=head.softcap,
                                          reduction=reduction, backend=backend)


def packed_sequence_logps(model, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_lens: list[int],
                          targets: torch.Tensor, cu_seqlens: torch.Tensor, *, average: bool,
                          backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sequence log-probs [S], target counts [S]) of a packed row, through the fused log-prob kernel.

    Summed over each sequence's targets, or their mean with `average`. Call it as
    `model.packed_sequence_logps(...)` after `attach_forward_methods(model)` (FSDP2, see token_loss_sum).
    """
    hidden = packed_hidden(model, input_ids, position_ids, seq_lens)
    head = output_head(model)
    with phase("logprobs"):  # lm_head + log-softmax at the targets, one fused kernel
        return sequence_logprobs(hidden, head.weight, targets, cu_seqlens=cu_seqlens, bias=head.bias,
                                 scale=head.scale, softcap=head.softcap, average=average, backend=backend)


def packed_token_logps(model, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_lens: list[int],
                       targets: torch.Tensor, *, temperature: float = 1.0, return_entropy: bool = False,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-target log-probs [N] (and entropies [N]) of a packed row at `temperature`, N = targets != -100.

    The RL losses' forward: log softmax(logits / T) at every completion token, through the fused log-prob
    kernel (no [T, V] logits). Entropy is of the same tempered distribution. An output layer with a bias or a
    softcap goes through the cross-entropy path, which has no entropy (asked for, it is an error there).
    Call it as `model.packed_token_logps(...)` after `attach_forward_methods(model)` (FSDP2, see token_loss_sum).
    """
    hidden = packed_hidden(model, input_ids, position_ids, seq_lens)
    head = output_head(model)
    keep = targets.reshape(-1) != IGNORE_INDEX
    h, t = hidden[keep], targets.reshape(-1)[keep]
    if head.bias is None and head.softcap is None:
        with phase("logprobs"):  # lm_head + log-softmax (+ entropy), one fused kernel
            out = linear_token_logprobs(h, head.weight, t, temperature=temperature / head.scale,
                                        return_entropy=return_entropy, backend=backend)
        return out if return_entropy else (out, None)
    if return_entropy:
        raise ValueError("entropy with an output bias or softcap is not supported by the fused kernels")
    with phase("logprobs"):
        return _token_logprobs(h, head.weight, t, head.bias, head.scale, head.softcap, temperature, backend), None


# Methods that run (part of) the model without calling `forward`. FSDP2 unshards the root module's
# parameters only around forward; optsys.parallel.dist.shard_model registers each of these that a model
# carries, so they get the same all-gather / reduce-scatter treatment.
FORWARD_METHODS = {"token_loss_sum": token_loss_sum, "packed_sequence_logps": packed_sequence_logps,
                   "packed_token_logps": packed_token_logps}


def attach_forward_methods(model, methods: dict | None = None):
    """Bind `methods` (name -> fn(model, ...); default FORWARD_METHODS) as methods of this model; returns it.

    With the default (the LM losses), an output layer they cannot represent is refused here, before training."""
    if methods is None:
        output_head(model)
    methods = FORWARD_METHODS if methods is None else methods
    for name, fn in methods.items():
        setattr(model, name, types.MethodType(fn, model))
    model.optsys_forward_methods = tuple(methods)  # read by shard_model
    return model
