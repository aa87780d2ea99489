"""Preference losses (DPO family): pure functions of per-sequence log-probs, registered by name.

Paired signature (every loss but KTO):
    fn(chosen_logps [B], rejected_logps [B], ref_chosen_logps [B] | None, ref_rejected_logps [B] | None,
       *, beta, **hyper) -> (loss [B], metrics)
KTO is unpaired: kto(policy_logps [B], ref_logps [B], kl_policy_logps [M], kl_ref_logps [M], labels [B] bool, ...),
or with the KL estimate z0 given instead of the KL partners' log-probs (kto(..., None, None, labels, z0=...)).

Each loss returns the per-pair (per-example for KTO) loss, not reduced, so the trainer picks the
reduction; metrics are detached [B] tensors: rewards_chosen, rewards_rejected, margin,
reward_accuracy (+ loss-specific terms). `PREFERENCE_LOSSES[name]` also records whether a loss
expects summed or length-averaged log-probs (`average_logps`, feed `sequence_logprobs(average=...)`)
and whether it needs a reference model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def dpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1, label_smoothing=0.0):
    """DPO, Rafailov et al. 2023 eq. 7: -log sigma(beta * h), h = (pi_w - ref_w) - (pi_l - ref_l).

    label_smoothing = eps is conservative DPO (Mitchell 2023, cDPO): the preference label is flipped
    with probability eps, giving (1 - eps) * -log sigma(beta h) + eps * -log sigma(-beta h).
    Summed log-probs. For reference-free DPO pass zeros as the reference log-probs.
    """
    _check_pair("dpo", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, needs_ref=True)
    _check_positive(beta=beta)
    _check_smoothing(label_smoothing)
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    loss = _smoothed_logsigmoid_loss(beta * h, label_smoothing)
    return loss, _reward_metrics(beta * (chosen_logps - ref_chosen_logps), beta * (rejected_logps - ref_rejected_logps))


def robust(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1, label_smoothing=0.0):
    """Robust DPO, Chowdhury et al. 2024 (rDPO): an unbiased loss under label-flip rate eps,

        ((1 - eps) * -log sigma(beta h) - eps * -log sigma(-beta h)) / (1 - 2 eps),

    h as in DPO. Unlike cDPO this is unbiased for the clean-label DPO loss, and not bounded below.
    Equals `dpo` at eps = 0. Summed log-probs.
    """
    _check_pair("robust", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, needs_ref=True)
    _check_positive(beta=beta)
    _check_smoothing(label_smoothing)
    eps = label_smoothing
    z = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))
    loss = ((1 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1 - 2 * eps)
    return loss, _reward_metrics(beta * (chosen_logps - ref_chosen_logps), beta * (rejected_logps - ref_rejected_logps))


def ipo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1):
    """IPO, Azar et al. 2023 eq. 17: (h - 1 / (2 tau))^2 with tau = beta, h as in DPO.

    Like TRL, we apply it to length-averaged log-probs (registry: average_logps=True); the paper's
    h uses summed ones. The function itself takes whichever the caller passes.
    """
    _check_pair("ipo", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, needs_ref=True)
    _check_positive(beta=beta)
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    loss = (h - 1 / (2 * beta)) ** 2
    return loss, _reward_metrics(beta * (chosen_logps - ref_chosen_logps), beta * (rejected_logps - ref_rejected_logps))


def simpo(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
          beta=2.0, gamma=1.0, label_smoothing=0.0):
    """SimPO, Meng et al. 2024 eq. 6: -log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma).

    Takes length-AVERAGED log-probs (log pi(y) / |y|, `sequence_logprobs(average=True)`), so the
    reward is beta * mean log-prob. gamma is the target reward margin in reward units (TRL's
    simpo_gamma). Reference-free. label_smoothing applies the cDPO flip as in `dpo`.
    """
    _check_pair("simpo", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, needs_ref=False)
    _check_positive(beta=beta)
    _check_smoothing(label_smoothing)
    rewards_w, rewards_l = beta * chosen_logps, beta * rejected_logps
    loss = _smoothed_logsigmoid_loss(rewards_w - rewards_l - gamma, label_smoothing)
    return loss, _reward_metrics(rewards_w, rewards_l)


def orpo(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *, lam=0.1):
    """ORPO, Hong et al. 2024 eq. 6-7: L_SFT + lam * -log sigma(log(odds(y_w) / odds(y_l))).

    Takes length-AVERAGED log-probs x = log P(y|x) / |y|; odds(y) = p / (1 - p) with p = exp(x), so
    log odds = x - log(1 - exp(x)). L_SFT is the chosen NLL, -x_w (per-sequence token mean, the
    paper's L_SFT). Reference-free. Rewards in the metrics are lam * x (TRL's convention).
    """
    _check_pair("orpo", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, needs_ref=False)
    _check_positive(lam=lam)
    log_odds = _log_odds(chosen_logps) - _log_odds(rejected_logps)
    nll = -chosen_logps
    loss = nll - lam * F.logsigmoid(log_odds)
    metrics = _reward_metrics(lam * chosen_logps, lam * rejected_logps)
    metrics.update(nll=nll.detach(), log_odds_ratio=log_odds.detach())
    return loss, metrics


def cpo(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
        beta=0.1, alpha=1.0, label_smoothing=0.0, chosen_num_tokens=None):
    """CPO, Xu et al. 2024 (Sec. 3, L_CPO = L_prefer + L_NLL): -log sigma(beta (pi_w - pi_l)) + alpha * NLL.

    pi_w, pi_l: summed log-probs log pi(y|x). NLL = -pi_w, divided by chosen_num_tokens [B] when
    given (a per-token NLL, the scale TRL uses). alpha weights the NLL (TRL's cpo_alpha; the paper
    has alpha = 1). Reference-free. label_smoothing applies the cDPO flip to the preference term.
    """
    _check_pair("cpo", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, needs_ref=False)
    _check_positive(beta=beta)
    _check_smoothing(label_smoothing)
    nll = -chosen_logps
    if chosen_num_tokens is not None:
        if chosen_num_tokens.shape != chosen_logps.shape:
            raise ValueError(f"chosen_num_tokens must have shape {tuple(chosen_logps.shape)}, "
                             f"got {tuple(chosen_num_tokens.shape)}")
        nll = nll / chosen_num_tokens.clamp(min=1)
    rewards_w, rewards_l = beta * chosen_logps, beta * rejected_logps
    loss = _smoothed_logsigmoid_loss(rewards_w - rewards_l, label_smoothing) + alpha * nll
    metrics = _reward_metrics(rewards_w, rewards_l)
    metrics["nll"] = nll.detach()
    return loss, metrics


def kto(policy_logps, ref_logps, kl_policy_logps, kl_ref_logps, labels, *,
        beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, z0=None):
    """KTO, Ethayarajh et al. 2024 eq. 8: lambda_y - v(x, y), per example (unpaired).

        r = log pi(y|x) - log ref(y|x),  z0 = max(0, mean(kl_policy_logps - kl_ref_logps)), detached
        v = lambda_D sigma(beta (r - z0))  if labels (desirable),  lambda_U sigma(beta (z0 - r))  otherwise

    policy_logps, ref_logps [B]: summed log-probs of each example's completion; labels [B] bool,
    True = desirable. kl_policy_logps, kl_ref_logps [M]: log-probs of MISMATCHED completions (prompt
    i with the completion of an example of another prompt), whose mean ratio estimates KL(pi || ref)
    (the paper's and TRL's estimate) over this batch. Or pass the estimate itself as `z0` (a float or
    0-d tensor, the mean log-ratio before the clamp) with kl_policy_logps = kl_ref_logps = None: the
    trainer estimates it over a whole optimizer step and all ranks (optsys.trainers.preference.kto_z0).
    Metrics: rewards [B] = beta r, rewards_chosen / rewards_rejected (the desirable / undesirable
    subsets), kl = z0.
    """
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.bool:
        raise ValueError(f"labels must be a bool tensor (True = desirable), got "
                         f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    _check_same_1d(policy_logps=policy_logps, ref_logps=ref_logps, labels=labels)
    _check_positive(beta=beta)
    _check_nonnegative(desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    if z0 is None:
        _check_same_1d(kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps)
        z0 = (kl_policy_logps - kl_ref_logps).mean()
    elif kl_policy_logps is not None or kl_ref_logps is not None:
        raise ValueError("kto takes either kl_policy_logps and kl_ref_logps or z0, not both")
    # z0 is a baseline, not a target: no gradient flows through it (paper Sec. 4.1, TRL).
    z0 = torch.as_tensor(z0, dtype=policy_logps.dtype, device=policy_logps.device).clamp(min=0).detach()
    r = policy_logps - ref_logps
    # lambda_y - lambda_y sigma(x) = lambda_y sigma(-x)
    loss = torch.where(labels, desirable_weight * torch.sigmoid(-beta * (r - z0)),
                       undesirable_weight * torch.sigmoid(-beta * (z0 - r)))
    rewards = (beta * r).detach()
    return loss, {"rewards": rewards, "rewards_chosen": rewards[labels], "rewards_rejected": rewards[~labels],
                  "kl": z0}


def chosen_nll(chosen_logp_sums: Tensor, num_tokens) -> Tensor:
    """The NLL term RPO adds to DPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"; TRL's
    rpo_alpha, in TRL 1.16 loss_type [..., "sft"]): the mean cross-entropy per chosen token of the batch,

        -sum_i log pi(y_w_i | x_i) / num_tokens,

    chosen_logp_sums [B]: each pair's SUMMED chosen log-prob; num_tokens: the chosen tokens of the whole batch
    (a token mean over the batch, as TRL computes it, not a mean of per-sequence means). A micro-batch passes
    its own pairs and the whole optimizer step's token count, so the micro-batches' terms add up to the step's
    mean. The caller weights it: loss = preference loss + rpo_alpha * chosen_nll.
    """
    _check_same_1d(chosen_logp_sums=chosen_logp_sums)
    if not num_tokens > 0:
        raise ValueError(f"num_tokens must be > 0 (the batch's chosen tokens), got {num_tokens!r}")
    return -chosen_logp_sums.sum() / num_tokens


@dataclass(frozen=True)
class PreferenceLoss:
    """A registered loss and what it needs from the trainer."""

    fn: Callable
    average_logps: bool  # expects per-sequence MEAN token log-probs (sequence_logprobs(average=True)), else sums
    needs_reference: bool
    paired: bool = True  # False: KTO's unpaired signature

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "dpo": PreferenceLoss(dpo, average_logps=False, needs_reference=True),
    "robust": PreferenceLoss(robust, average_logps=False, needs_reference=True),
    "ipo": PreferenceLoss(ipo, average_logps=True, needs_reference=True),
    "simpo": PreferenceLoss(simpo, average_logps=True, needs_reference=False),
    "orpo": PreferenceLoss(orpo, average_logps=True, needs_reference=False),
    "cpo": PreferenceLoss(cpo, average_logps=False, needs_reference=False),
    "kto": PreferenceLoss(kto, average_logps=False, needs_reference=True, paired=False),
}


def _smoothed_logsigmoid_loss(z: Tensor, eps: float) -> Tensor:
    """(1 - eps) * -log sigma(z) + eps * -log sigma(-z): -log sigma(z) with labels flipped at rate eps."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _log_odds(x: Tensor) -> Tensor:
    """log(p / (1 - p)) for p = exp(x), x <= 0.

    x is clamped to <= -eps(dtype): at x = 0 (p = 1) the odds are infinite; this bounds them
    (|log odds| <= ~16 in fp32) so loss and gradient stay finite.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return x - _log1mexp(x)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate for all x (Maechler 2012).

    Near 0, 1 - exp(x) cancels: use log(-expm1(x)). Far below, exp(x) is tiny: use log1p(-exp(x)).
    Each branch is evaluated on a safe input where not selected, so torch.where's backward never
    multiplies a zero by an infinite local derivative (0 * inf = nan).
    """
    near = x > -math.log(2)
    safe = torch.full_like(x, -1.0)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, safe))),
                       torch.log1p(-torch.exp(torch.where(near, safe, x))))


def _reward_metrics(rewards_chosen: Tensor, rewards_rejected: Tensor) -> dict[str, Tensor]:
    rc, rr = rewards_chosen.detach(), rewards_rejected.detach()
    return {"rewards_chosen": rc, "rewards_rejected": rr, "margin": rc - rr, "reward_accuracy": (rc > rr).float()}


def _check_pair(name, chosen, rejected, ref_chosen, ref_rejected, *, needs_ref: bool) -> None:
    _check_same_1d(chosen_logps=chosen, rejected_logps=rejected)
    if needs_ref:
        for arg, t in (("ref_chosen_logps", ref_chosen), ("ref_rejected_logps", ref_rejected)):
            if t is None:
                raise ValueError(f"{name} needs {arg} (for a reference-free {name}, pass zeros)")
        _check_same_1d(chosen_logps=chosen, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
    elif ref_chosen is not None or ref_rejected is not None:
        raise ValueError(f"{name} is reference-free: ref_chosen_logps and ref_rejected_logps must be None")


def _check_same_1d(**tensors: Tensor) -> None:
    """All tensors 1-D with the first one's shape; floating point (bool for `labels`)."""
    (first, ref), *rest = tensors.items()
    for arg, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{arg} must be a tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{arg} must be 1-D [B], got shape {tuple(t.shape)}")
        if not (t.is_floating_point() or (arg == "labels" and t.dtype == torch.bool)):
            raise ValueError(f"{arg} must be floating point, got {t.dtype}")
    for arg, t in rest:
        if t.shape != ref.shape:
            raise ValueError(f"{arg} has shape {tuple(t.shape)} but {first} has {tuple(ref.shape)}")


def _check_positive(**values: float) -> None:
    for arg, v in values.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{arg} must be a finite number > 0, got {v!r}")


def _check_nonnegative(**values: float) -> None:
    for arg, v in values.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{arg} must be a finite number >= 0, got {v!r}")


def _check_smoothing(eps: float) -> None:
    if not (isinstance(eps, (int, float)) and 0 <= eps < 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {eps!r}")
