"""Objectives as pure functions of tensors, each registered by name so a recipe picks one with a string.

PREFERENCE_LOSSES: dpo, robust, ipo, simpo, orpo, cpo, kto (preference.py)
POLICY_LOSSES: ppo_clip; KL_ESTIMATORS: k1, k2, k3; ADVANTAGE_ESTIMATORS: grpo, rloo, reinforce_pp, gae (policy.py)
sequence_logprobs: per-sequence log-probs of packed rows from hidden states, no logits (sequence.py)
"""

from .policy import (
    ADVANTAGE_ESTIMATORS,
    AGG_MODES,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    aggregate,
    gae,
    grpo_advantages,
    kl_k1,
    kl_k2,
    kl_k3,
    ppo_clip,
    reinforce_pp_advantages,
    rloo_advantages,
)
from .preference import PREFERENCE_LOSSES, PreferenceLoss, cpo, dpo, ipo, kto, orpo, robust, simpo
from .sequence import sequence_logprobs

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGG_MODES",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "PREFERENCE_LOSSES",
    "PreferenceLoss",
    "aggregate",
    "cpo",
    "dpo",
    "gae",
    "grpo_advantages",
    "ipo",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kto",
    "orpo",
    "ppo_clip",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "robust",
    "sequence_logprobs",
    "simpo",
]
