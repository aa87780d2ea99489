"""The one registry of training methods: which trainer runs each, and which config section it reads.

Everything else derives from it: the valid `method` values (config validation, with a did-you-mean), the
dispatch in `python -m optsys.train`, the loss hyper-parameters a preference trainer passes on, the checks
that refuse a setting a method would ignore, and the sections a run's config.yaml carries (its own family's
only). Adding a method is one entry here plus its loss (optsys.losses) or trainer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    trainer: str  # module with `train(cfg) -> summary`
    section: str | None = None  # TrainConfig section of the method family's settings (None: no own section)
    hyper: tuple[str, ...] = ()  # keys of `section` that the method's loss takes, by name
    reference: bool = False  # scores against a reference model (pref.reference, pref.reference_model)
    rpo: bool = False  # takes pref.rpo_alpha: the trainer adds an NLL term on the chosen responses (RPO)


PREF = "optsys.trainers.preference"
RL = "optsys.trainers.rl"

METHODS: dict[str, Method] = {
    "sft": Method("optsys.trainers.sft"),
    "dpo": Method(PREF, "pref", ("beta", "label_smoothing"), reference=True, rpo=True),
    "robust": Method(PREF, "pref", ("beta", "label_smoothing"), reference=True, rpo=True),
    "ipo": Method(PREF, "pref", ("beta",), reference=True, rpo=True),
    "simpo": Method(PREF, "pref", ("beta", "gamma", "label_smoothing"), rpo=True),  # + NLL: CPO-SimPO
    "orpo": Method(PREF, "pref", ("lam",)),
    "cpo": Method(PREF, "pref", ("beta", "alpha", "label_smoothing")),
    "kto": Method(PREF, "pref", ("beta", "desirable_weight", "undesirable_weight"), reference=True),
    "rm": Method("optsys.trainers.reward", "rm", ("margin", "center_coef")),
    # RL: the advantage estimator, policy loss and aggregation of each are in RL_ALGORITHMS below.
    "grpo": Method(RL, "rl", ("clip_eps", "clip_eps_high")),
    "dr_grpo": Method(RL, "rl", ("clip_eps", "clip_eps_high")),
    "dapo": Method(RL, "rl", ("clip_eps", "clip_eps_high")),
    "gspo": Method(RL, "rl", ("clip_eps", "clip_eps_high")),
    "cispo": Method(RL, "rl", ("clip_eps_high",)),
    "rloo": Method(RL, "rl", ("clip_eps", "clip_eps_high")),
    "reinforce_pp": Method(RL, "rl", ("clip_eps", "clip_eps_high")),
    "distill": Method(RL, "rl", ("clip_eps", "clip_eps_high", "teacher")),
    "ppo": Method(RL, "rl", ("clip_eps", "clip_eps_high", "critic_lr", "value_clip", "gamma", "gae_lambda")),
}


@dataclass(frozen=True)
class RLAlgorithm:
    """What an RL method computes: names in optsys.losses.policy's registries, and its paper's defaults."""

    advantage: str  # ADVANTAGE_ESTIMATORS key, or "teacher_kl" (distillation)
    loss: str  # POLICY_LOSSES key
    agg: str  # AGG_MODES: how per-token terms reduce over a (mini-)batch
    scale_std: bool = True  # GRPO: divide by the group's reward std
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # None: = clip_eps
    dynamic_sampling: bool = False
    # where rl.kl_coef's KL to the reference goes: False, a k2 / k3 term of the loss (GRPO eq. 3); True, -kl_coef
    # x k1 in every token's reward (PPO as in RLHF, REINFORCE++ as its paper), never both
    kl_in_reward: bool = False


RL_ALGORITHMS: dict[str, RLAlgorithm] = {
    "grpo": RLAlgorithm("grpo", "ppo_clip", "seq_mean_token_mean"),  # Shao et al. 2024
    "dr_grpo": RLAlgorithm("grpo", "ppo_clip", "seq_sum_norm", scale_std=False),  # Liu et al. 2025
    "dapo": RLAlgorithm("grpo", "ppo_clip", "token_mean", clip_eps_high=0.28, dynamic_sampling=True),  # Yu et al.
    "gspo": RLAlgorithm("grpo", "gspo", "seq_mean_token_mean", clip_eps=3e-4, clip_eps_high=4e-4),  # Zheng et al.
    "cispo": RLAlgorithm("grpo", "cispo", "token_mean", clip_eps_high=0.28),  # MiniMax-M1
    "rloo": RLAlgorithm("rloo", "ppo_clip", "token_mean"),  # Ahmadian et al. 2024
    "reinforce_pp": RLAlgorithm("reinforce_pp_token", "ppo_clip", "token_mean", kl_in_reward=True),  # Hu et al. 2025
    # on-policy distillation (Agarwal et al. 2024; Lu & Thinking Machines 2025): per-token advantage
    # -(log pi(y_t) - log teacher(y_t)) on the student's own samples: minimizes the reverse KL to the teacher
    "distill": RLAlgorithm("teacher_kl", "ppo_clip", "token_mean"),
    # PPO with a learned critic and GAE (Schulman et al. 2017; Ouyang et al. 2022 for the KL in the reward)
    "ppo": RLAlgorithm("gae", "ppo_clip", "token_mean", kl_in_reward=True),
}

# Every family section of TrainConfig; a run's config.yaml keeps only its method's.
FAMILY_SECTIONS = sorted({m.section for m in METHODS.values() if m.section})


def methods_of(trainer: str) -> list[str]:
    """The method names a trainer module runs."""
    return [name for name, m in METHODS.items() if m.trainer == trainer]


def takes(key: str) -> list[str]:
    """The methods whose loss takes hyper-parameter `key` (e.g. "label_smoothing")."""
    return [name for name, m in METHODS.items() if key in m.hyper]
