"""Fused linear + cross-entropy: loss(hidden @ weight.T + bias, target) without the [N, V] logits.

The op: its options, autograd.Function and `fused_linear_cross_entropy`, which picks one of three fused
paths by `backend`.
- backend="torch" (CPU default): chunks of rows, each a [rows, V] fp32 logits tile, all math in torch.
  (Every path keeps the logits in fp32, for bf16 inputs too; only the reference rounds them to bf16.)
- backend="hybrid" (CUDA default): the same chunks, fp32 tiles written by the matmul; the three matmuls
  are the library's (cuBLAS), the memory-bound softmax math two Triton row kernels.
- backend="triton": all-Triton tiles (logits only ever in registers; fp32 atomics for the grads), and
  the only path with Cut Cross-Entropy's gradient filter.
Triton kernels run on CUDA, or in the CPU interpreter in tests. The machinery is shared with
`linear_logprobs.py` and lives beside it: reference.py (the readable torch reference), row_math.py (the
per-row math), chunked.py (the chunk loop of the torch and hybrid paths), triton_tiles.py (the Triton
kernels and their launchers), backends.py (the switch between them). This file adds the CE math.

Per row i with scaled logits s = cap * tanh(z / cap) (or just z), z = h_i W^T + b:
    lse   = logsumexp_j s_j,   p_j = exp(s_j - lse)
    loss  = lse - (1 - eps) s_t - (eps / V) sum_j s_j + zl * lse^2      (label smoothing eps, z-loss zl)
    dloss/ds_j = (1 + 2 zl lse) p_j - (1 - eps) [j == t] - eps / V
which is the shared form alpha_i p_j + beta_i [j == t_i] + gamma_i of row_math.py (`GradCoefs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._utils import autocast_inputs, check_inputs, resolve_backend
from .backends import cast_grads, compute_grads, compute_stats
from .chunked import row_math_for, torch_pass
from .row_math import LSE, S_TARGET, SUM_S, GradCoefs, LogitTransform

_REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class CEOptions:
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    grad_filter_eps: float | None = None
    backend: str = "torch"
    needs: tuple[bool, bool, bool] = (False, False, False)  # grads for hidden, weight, bias


def _ce_coefs(r: torch.Tensor, lse: torch.Tensor, o: CEOptions, v: int) -> GradCoefs:
    """dloss/ds = r (1 + 2 zl lse) p - r (1 - eps) [j == t] - r eps / V, r the row's grad scale."""
    alpha = r * (1 + 2 * o.z_loss * lse) if o.z_loss else r
    gamma = -(o.label_smoothing / v) * r if o.label_smoothing else None
    return GradCoefs(alpha, -(1 - o.label_smoothing) * r, gamma)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, o: CEOptions):
        v = weight.shape[0]
        tgt = target.masked_fill(target == o.ignore_index, -1)  # -1 marks an ignored row for the passes
        active = tgt >= 0
        n_valid = active.sum()
        xf = LogitTransform(softcap=o.softcap)
        # The chunked paths (torch, hybrid) fold each chunk's gradient in right away when the loss is a
        # scalar: backward then only scales by grad_output, so logits are computed once. reduction="none"
        # (per-row grad scales unknown until backward) and the Triton tiles recompute them in backward.
        ctx.eager = o.backend in ("torch", "hybrid") and o.reduction != "none" and any(o.needs)
        if ctx.eager:
            r = 1.0 / max(int(n_valid), 1) if o.reduction == "mean" else 1.0
            stats, grads = torch_pass(
                hidden, weight, bias, tgt, xf, sum_s=bool(o.label_smoothing), needs=o.needs,
                coef_fn=lambda rows, lse_c: _ce_coefs(torch.full_like(lse_c, r), lse_c, o, v),
                row_math=row_math_for(o.backend))
            ctx.grads = cast_grads(grads, hidden, weight, bias)
        else:
            stats = compute_stats(o.backend, hidden, weight, bias, tgt, xf, sum_s=bool(o.label_smoothing))
        ctx.save_for_backward(hidden, weight, bias, tgt, stats[LSE])
        lse = stats[LSE]
        loss = lse - (1 - o.label_smoothing) * stats[S_TARGET]
        if o.label_smoothing:
            loss -= (o.label_smoothing / v) * stats[SUM_S]
        if o.z_loss:
            loss += o.z_loss * lse.square()
        loss = loss.masked_fill(~active, 0)
        ctx.o = o
        ctx.n_valid = n_valid
        if o.reduction == "none":
            return loss
        if o.reduction == "sum":
            return loss.sum()
        return loss.sum() / n_valid.clamp(min=1)

    @staticmethod
    def backward(ctx, grad_out):
        o = ctx.o
        if ctx.eager and ctx.grads is not None:
            # Hand the forward's grads over, scaled in place (no second [V, H] buffer). A later
            # backward through a retained graph finds them gone and recomputes below.
            grads, ctx.grads = ctx.grads, None
            gh, gw, gb = (None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads)
            return gh, gw, gb, None, None
        hidden, weight, bias, tgt, lse = ctx.saved_tensors
        active = tgt >= 0
        r = grad_out.to(lse.dtype)
        if o.reduction == "mean":
            r = r / ctx.n_valid.clamp(min=1)
        r = torch.where(active, r, 0.0)  # [N]: a scalar grad_out broadcasts
        c = _ce_coefs(r, lse, o, weight.shape[0])
        grads = compute_grads(o.backend, hidden, weight, bias, tgt, lse, c, LogitTransform(softcap=o.softcap),
                              o.needs, o.grad_filter_eps)
        gh, gw, gb = cast_grads(grads, hidden, weight, bias)
        return gh, gw, gb, None, None


def fused_linear_cross_entropy(
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
    backend: str = "auto",
    grad_filter_eps: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T + bias` against `target`, without materializing the logits.

    hidden [N, H], weight [V, H] (the lm_head), target [N] integer; bias [V] optional. Rows whose target
    is `ignore_index` contribute 0 and are skipped. reduction "mean" divides by the number of
    non-ignored rows (an all-ignored batch gives 0 and zero grads), "sum" adds, "none" returns [N].
    z_loss adds z_loss * logsumexp^2 per row (PaLM); softcap applies cap * tanh(logits / cap) first
    (Gemma 2); label_smoothing as in F.cross_entropy. Accumulates in fp32; the loss is fp32 (fp64 for
    fp64 inputs). Gradients flow to hidden, weight and bias.

    backend: "auto" (hybrid on CUDA, torch on CPU), "torch", "hybrid" or "triton" (module docstring).
    Every fused path keeps the logits in fp32 (the reference, like a bf16 lm_head, rounds them to bf16
    first) and hands the grad matmuls d_logits in the input dtype.

    grad_filter_eps (None = exact): Cut Cross-Entropy's trick, Triton backend only (the chunked paths
    ignore it and stay exact). The backward skips every [BLOCK_N, BLOCK_V] tile in which all softmax
    values are below eps and no row's target falls. A dropped entry has |dloss_i/dz_ij| <= eps * |a_i|,
    a_i the row's grad scale (grad_output / n_valid for "mean", times 1 + 2 z_loss lse), so the error is
    bounded by |d grad_hidden[i, :]| <= eps |a_i| sum_j |weight[j, :]| and
    |d grad_weight[j, :]| <= eps sum_i |a_i| |hidden[i, :]| (elementwise), and is 0 for the loss itself.
    In bf16 training, eps around 2**-12 drops only terms far below the grads' own rounding when the
    softmax is peaked. Refused with label_smoothing (its eps/V term makes every gradient entry dense).
    Under autocast, hidden / weight / bias are cast to the autocast dtype first (as F.linear is).
    """
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    check_inputs(hidden, weight, target, bias, ignore_index)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    backend = resolve_backend(backend, hidden)
    if grad_filter_eps is not None:
        if not 0 < grad_filter_eps < 1:
            raise ValueError(f"grad_filter_eps must be in (0, 1) or None, got {grad_filter_eps}")
        if label_smoothing:
            raise ValueError("grad_filter_eps cannot be combined with label_smoothing (dense gradient)")
    grad = torch.is_grad_enabled()
    needs = (grad and hidden.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad)
    o = CEOptions(ignore_index, reduction, float(label_smoothing), float(z_loss),
                  None if softcap is None else float(softcap), grad_filter_eps, backend, needs)
    return _LinearCrossEntropy.apply(hidden, weight, bias, target.long(), o)
