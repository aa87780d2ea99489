"""Fused linear + token log-probs (and entropy): log_softmax(hidden @ weight.T / T) at target.

The op: its options, autograd.Function and `linear_token_logprobs`. The machinery is the one
`fused_linear_cross_entropy` uses (row_math.py, chunked.py, triton_tiles.py, backends.py; the reference
is in reference.py); this file adds the per-row gradient coefficients. Per row, with s = z / T and
p = softmax(s):
    logprob = s_t - lse,   entropy = lse - sum_j p_j s_j
    d logprob / d s_j = [j == t] - p_j,   d entropy / d s_j = -p_j (s_j - lse + entropy)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._utils import autocast_inputs, check_inputs, compute_dtype, resolve_backend
from .backends import cast_grads, compute_grads, compute_stats
from .chunked import row_math_for, torch_pass
from .row_math import ENTROPY, LSE, S_TARGET, GradCoefs, LogitTransform


@dataclass(frozen=True)
class LogprobOptions:
    temperature: float = 1.0
    return_entropy: bool = False
    backend: str = "torch"
    needs: tuple[bool, bool, bool] = (False, False, False)  # grads for hidden, weight, (no bias)


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, o: LogprobOptions):
        # An output nothing differentiates gets None, not a zero tensor: RL losses use the log-probs and
        # only log the entropy, and a materialized zero entropy grad would put a delta term into the
        # backward (the general three-tile chunk body in torch, HAS_DELTA in the Triton kernels).
        ctx.set_materialize_grads(False)
        xf = LogitTransform(inv_temp=1.0 / o.temperature)
        # A frozen lm_head (LoRA, or a policy's frozen head) and no entropy: the only gradient is
        # d logprob_i / d h_i = (W[t_i] - p_i @ W) / T times a per-row scale, so the chunked paths form
        # that [N, H] vector in the forward pass (one matmul more there) and backward only scales it,
        # instead of recomputing the logits (two matmuls). With weight grads no such fold exists:
        # grad_W = sum_i g_i (e_t - p_i)^T h_i needs each row's g_i inside the sum.
        ctx.eager = o.backend in ("torch", "hybrid") and not o.return_entropy and o.needs == (True, False, False)
        if ctx.eager:
            ones = torch.ones(target.shape[0], dtype=compute_dtype(hidden.dtype), device=hidden.device)
            stats, (u, _, _) = torch_pass(hidden, weight, None, target, xf, needs=o.needs,
                                          coef_fn=lambda rows, _: GradCoefs(-ones[rows], ones[rows]),
                                          row_math=row_math_for(o.backend))
            ctx.dlogprob_dhidden = u
        else:
            stats = compute_stats(o.backend, hidden, weight, None, target, xf, entropy=o.return_entropy)
        lse = stats[LSE]
        logprobs = stats[S_TARGET] - lse
        entropy = stats[ENTROPY]  # 0 (unused) unless return_entropy
        ctx.save_for_backward(hidden, weight, target, lse, entropy)
        ctx.o = o
        return (logprobs, entropy) if o.return_entropy else logprobs

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        o = ctx.o
        if g_lp is None and g_ent is None:
            return None, None, None, None
        if ctx.eager:  # out of place: a second backward through a retained graph reuses it
            u = ctx.dlogprob_dhidden
            return (u * g_lp.to(u.dtype)[:, None]), None, None, None
        hidden, weight, target, lse, entropy = ctx.saved_tensors
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.to(lse.dtype)
        # d/ds = g_lp ([j == t] - p) - g_ent p (s - lse + entropy): alpha p + beta [j == t] + delta p s.
        # g_ent is None when nothing downstream differentiates the entropy (it was only logged): then no
        # delta term, and the chunked torch path takes its one-tile fast body (fp32) in backward.
        alpha, delta = -g_lp, None
        if g_ent is not None:
            g_ent = g_ent.to(lse.dtype)
            alpha = alpha + g_ent * (lse - entropy)
            delta = -g_ent
        c = GradCoefs(alpha, g_lp, None, delta)
        grads = compute_grads(o.backend, hidden, weight, None, target, lse, c,
                              LogitTransform(inv_temp=1.0 / o.temperature), o.needs)
        gh, gw, _ = cast_grads(grads, hidden, weight, None)
        return gh, gw, None, None


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
):
    """log_softmax(hidden @ weight.T / temperature) at target, [N] fp32, without the [N, V] logits.

    With return_entropy, also the entropy of each row's distribution, [N] fp32. Both outputs are
    differentiable with respect to hidden and weight; a backward that reaches only the log-probs (the
    entropy logged, not trained on) costs what it costs without return_entropy, while one through the
    entropy (an entropy bonus) takes the slower general path (a delta p s term in d_logits). Every target must
    be in [0, V).
    backend: "auto" (hybrid on CUDA, torch on CPU), "torch", "hybrid" or "triton" (see
    `linear_cross_entropy.py`).
    Under autocast, hidden and weight are cast to the autocast dtype first (as F.linear is).
    """
    hidden, weight = autocast_inputs(hidden, weight)
    check_inputs(hidden, weight, target)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    backend = resolve_backend(backend, hidden)
    grad = torch.is_grad_enabled()
    o = LogprobOptions(float(temperature), bool(return_entropy), backend,
                       (grad and hidden.requires_grad, grad and weight.requires_grad, False))
    return _LinearTokenLogprobs.apply(hidden, weight, target.long(), o)
