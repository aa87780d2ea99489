"""The per-row math every linear-softmax op shares: how the logits are scaled, which statistics a pass
returns, and the form every op writes its gradient in.

Per row i, with z = h_i W^T + b and the scaled logits s = cap * tanh(z * inv_temp / cap) (`LogitTransform`):
    lse = logsumexp_j s_j,   p_j = exp(s_j - lse)
A forward pass returns per-row statistics (`LSE`, `S_TARGET`, `SUM_S`, `ENTROPY`), from which each op forms
its outputs. Every op writes its d out / d s as
    alpha_i p_j + beta_i [j == t_i] + gamma_i + delta_i p_j s_j
(`GradCoefs`), so one chunk loop (chunked.py) and one set of Triton kernels (triton_tiles.py) serve
cross-entropy, log-probs and entropy.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LogitTransform(NamedTuple):
    """How the scaled logits s are formed from z = h @ W.T + b: s = cap * tanh(z * inv_temp / cap)."""

    inv_temp: float = 1.0
    softcap: float | None = None


class GradCoefs(NamedTuple):
    """Per-row coefficients of d out / d s_ij = alpha_i p_ij + beta_i [j == t_i] + gamma_i + delta_i p_ij s_ij."""

    alpha: torch.Tensor
    beta: torch.Tensor
    gamma: torch.Tensor | None = None
    delta: torch.Tensor | None = None

    def take(self, rows: torch.Tensor) -> GradCoefs:
        return GradCoefs(*(None if c is None else c.index_select(0, rows) for c in self))


# Per-row statistics every pass returns, stacked as one [4, N] tensor (0 at inactive rows).
# ENTROPY = lse - sum_j p_j s_j, computed as log(sum_j e_j) - sum_j p_j (s_j - m) with m = max_j s_j and
# e_j = exp(s_j - m): both terms are small for a peaked row, where the plain form cancels two ~|s| numbers.
LSE, S_TARGET, SUM_S, ENTROPY = range(4)
