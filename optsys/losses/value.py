"""PPO's value loss, a pure function of per-token tensors.

    value_loss(values, returns, old_values, token_weights, *, clip) -> (loss, metrics)
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def value_loss(values: Tensor, returns: Tensor, old_values: Tensor, token_weights: Tensor, *,
               clip: float) -> tuple[Tensor, dict]:
    """Clipped value loss (PPO2 / OpenAI baselines): 0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2),
    weighted per token like the policy loss: sum_t w_t loss_t.

    All [N] over the trained tokens (packed: several sequences): the critic's values V, the value targets R (GAE
    returns), the values before the update V_old, and each token's aggregation weight w. Metrics: value_loss (the
    unweighted mean over tokens with w > 0) and value_clip_fraction (of those, |V - V_old| > clip)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    live = token_weights > 0
    count = live.sum().clamp(min=1)
    metrics = {"value_loss": (per_token.detach() * live).sum() / count,
               "value_clip_fraction": (((values - old_values).abs() > clip) & live).float().sum() / count}
    return (per_token * token_weights).sum(), metrics
