"""The readable torch references of the fused ops: they materialize the [N, V] logits.

Each has the semantics of its fused op (`fused_linear_cross_entropy`, `linear_token_logprobs`) and is the
baseline the kernel tests and bench/kernels.py compare every fused path with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._utils import compute_dtype


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Naive linear cross-entropy with the same semantics as `fused_linear_cross_entropy`."""
    # The lm_head matmul runs in the input dtype (as a model's lm_head does), then fp32.
    logits = F.linear(hidden, weight, bias).to(compute_dtype(hidden.dtype))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    valid = target != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(logits, dim=-1).square() * valid
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)  # all-ignored batch: 0, not NaN


def linear_token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """Naive token log-probs (and entropy): materializes the [N, V] logits."""
    logits = (hidden @ weight.T).to(compute_dtype(hidden.dtype)) / temperature
    logp = torch.log_softmax(logits, dim=-1)
    logprobs = logp.gather(-1, target[:, None]).squeeze(-1)
    if not return_entropy:
        return logprobs
    return logprobs, -(logp.exp() * logp).sum(-1)
