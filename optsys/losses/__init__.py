"""Objectives as pure functions of tensors, each registered by name so a recipe picks one with a string.

PREFERENCE_LOSSES: dpo, robust, ipo, simpo, orpo, cpo, kto; chosen_nll, RPO's NLL term (preference.py)
POLICY_LOSSES: ppo_clip, gspo, cispo; KL_ESTIMATORS: k1, k2, k3; ADVANTAGE_ESTIMATORS: grpo, rloo, reinforce_pp,
    reinforce_pp_token, gae; SAMPLER_CORRECTIONS: none, tis, mis_token, mis_seq; aggregation_weights,
    overlong_penalty, informative_groups (policy.py)
sequence_logprobs: per-sequence log-probs of packed rows from hidden states, no logits (sequence.py)
value_loss: PPO's clipped value loss (value.py)
"""

from .policy import (
    ADVANTAGE_ESTIMATORS,
    AGG_MODES,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    SAMPLER_CORRECTIONS,
    aggregate,
    aggregation_weights,
    cispo,
    gae,
    grpo_advantages,
    gspo,
    informative_groups,
    kl_k1,
    kl_k2,
    kl_k3,
    overlong_penalty,
    ppo_clip,
    reinforce_pp_advantages,
    reinforce_pp_token_advantages,
    rloo_advantages,
    sampler_correction,
)
from .preference import PREFERENCE_LOSSES, PreferenceLoss, chosen_nll, cpo, dpo, ipo, kto, orpo, robust, simpo
from .sequence import sequence_logprobs
from .value import value_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGG_MODES",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "PREFERENCE_LOSSES",
    "PreferenceLoss",
    "SAMPLER_CORRECTIONS",
    "aggregate",
    "aggregation_weights",
    "chosen_nll",
    "cispo",
    "cpo",
    "dpo",
    "gae",
    "grpo_advantages",
    "gspo",
    "informative_groups",
    "ipo",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kto",
    "orpo",
    "overlong_penalty",
    "ppo_clip",
    "reinforce_pp_advantages",
    "reinforce_pp_token_advantages",
    "rloo_advantages",
    "robust",
    "sampler_correction",
    "sequence_logprobs",
    "simpo",
    "value_loss",
]
