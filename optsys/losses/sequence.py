"""Per-sequence log-probs of packed rows, from hidden states (no [T, V] logits).

A preference trainer runs ONE packed forward over chosen and rejected completions, then needs
log pi(y|x) per sequence: the fused token log-prob kernel on the target positions, segment-summed
per sequence. Positions whose target is -100 (prompt, padding) are dropped before the kernel.
An output layer with a bias or a final softcap (Phi, Gemma 2) goes through the fused cross-entropy
instead, which takes both: log p(t) = -CE(t) exactly when there is no smoothing or z-loss.
"""

from __future__ import annotations

import torch

from optsys.kernels import fused_linear_cross_entropy, linear_token_logprobs

IGNORE_INDEX = -100


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    seq_ids: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    num_seqs: int | None = None,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    average: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum (or, with average=True, mean) of log p(target) per sequence: (logps [S] fp32, num_tokens [S] long).

    hidden [..., H] and targets [...] are flattened to T positions (a packed [1, T] row, or a
    padded [B, L] batch). Give each position's sequence either as seq_ids [...] (ints in [0, S),
    S = num_seqs or max + 1) or as cu_seqlens [S + 1] (0, l0, l0 + l1, ..., T). Targets equal to
    -100 are excluded. average=True divides by the sequence's target count (SimPO / IPO / ORPO
    length normalization); a sequence with no targets then gets 0, visible as num_tokens == 0.
    The logits are softcap(scale * (hidden @ weight.T + bias)) / temperature, softcap(x) = cap tanh(x / cap)
    (the model's output layer, optsys.models.heads.OutputHead).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if t.shape[0] != h.shape[0]:
        raise ValueError(f"targets has {t.shape[0]} positions but hidden has {h.shape[0]} "
                         f"(hidden {tuple(hidden.shape)}, targets {tuple(targets.shape)})")
    sid, num_seqs = _segment_ids(t.shape[0], seq_ids, cu_seqlens, num_seqs, t.device)
    keep = t != IGNORE_INDEX
    # The kernel rejects -100, so select the target rows first: a [N_valid, H] gather, not logits.
    lp = _token_logprobs(h[keep], weight, t[keep], bias, scale, softcap, temperature, backend)
    sid = sid[keep]
    sums = lp.new_zeros(num_seqs).index_add(0, sid, lp)
    counts = torch.zeros(num_seqs, dtype=torch.long, device=t.device).index_add(0, sid, torch.ones_like(sid))
    if average:
        sums = sums / counts.clamp(min=1)
    return sums, counts


def _token_logprobs(h, weight, t, bias, scale, softcap, temperature, backend) -> torch.Tensor:
    """[N] fp32 log p(t) under logits softcap(scale * (h W^T + b)) / temperature."""
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if bias is None and softcap is None:
        # the kernel multiplies the fp32 logits by 1 / temperature: the scale rides along, unrounded
        return linear_token_logprobs(h, weight, t, temperature=temperature / scale, backend=backend)
    if softcap is not None and temperature != 1.0:
        # the kernels scale inside the cap (cap tanh(s z / cap)); sampling divides after it
        raise ValueError(f"temperature={temperature} with a softcapped output layer (softcap={softcap}) is not "
                         "supported: the fused kernels apply a scale before the cap, not after it")
    s = scale / temperature
    if s != 1.0:  # s (h W^T + b) = (s h) W^T + s b: the CE op takes no scale
        h, bias = h * s, None if bias is None else bias * s
    return -fused_linear_cross_entropy(h, weight, t, bias=bias, softcap=softcap, reduction="none", backend=backend)


def _segment_ids(n, seq_ids, cu_seqlens, num_seqs, device) -> tuple[torch.Tensor, int]:
    """Sequence index per position, [n] long, and the number of sequences."""
    if (seq_ids is None) == (cu_seqlens is None):
        raise ValueError("give exactly one of seq_ids or cu_seqlens")
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        lens = cu.diff()
        if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != n or bool((lens < 0).any()):
            raise ValueError(f"cu_seqlens must be [S+1] non-decreasing from 0 to {n}, got {cu.tolist()}")
        if num_seqs is not None and num_seqs != lens.numel():
            raise ValueError(f"num_seqs={num_seqs} but cu_seqlens describes {lens.numel()} sequences")
        return torch.repeat_interleave(torch.arange(lens.numel(), device=device), lens), lens.numel()
    sid = seq_ids.reshape(-1).to(device)
    if sid.shape[0] != n:
        raise ValueError(f"seq_ids has {sid.shape[0]} positions but targets has {n}")
    if sid.dtype.is_floating_point or sid.dtype == torch.bool:
        raise ValueError(f"seq_ids must be an integer tensor, got {sid.dtype}")
    sid = sid.long()
    if num_seqs is None:
        num_seqs = int(sid.max()) + 1 if n else 0
    if n and (int(sid.min()) < 0 or int(sid.max()) >= num_seqs):
        raise ValueError(f"seq_ids must lie in [0, {num_seqs}), got [{int(sid.min())}, {int(sid.max())}]")
    return sid, num_seqs
