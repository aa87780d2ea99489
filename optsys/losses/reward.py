"""Reward-model objective: Bradley-Terry on pairs of scalar rewards, a pure function of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor, *, margin: torch.Tensor | float = 0.0,
                  center_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair -log sigma(r_c - r_r - margin) + center_coef * (r_c + r_r)^2 (Ouyang et al. 2022 eq. 1).

    margin [B] or scalar: Llama 2's preference-strength margin (Touvron et al. 2023 eq. 2). The
    centering term (Eisenstein et al. 2023) pins the reward's free offset near 0. Returns (loss [B], metrics).
    """
    diff = rewards_chosen - rewards_rejected
    loss = -F.logsigmoid(diff - margin)
    if center_coef:
        loss = loss + center_coef * (rewards_chosen + rewards_rejected) ** 2
    rc, rr = rewards_chosen.detach(), rewards_rejected.detach()
    return loss, {"rewards_chosen": rc, "rewards_rejected": rr, "margin": rc - rr, "accuracy": (rc > rr).float()}
