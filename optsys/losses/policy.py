"""Policy-gradient losses, KL penalties and advantage estimators (PPO / GRPO family), registered by name.

Token tensors are either padded [B, L] (a row per sequence) or packed [T] with `seq_ids` [T]
giving each token's sequence. `mask` marks the tokens that count (bool or 0/1).

    POLICY_LOSSES[name](logp, old_logp, advantages, mask, *, ref_logp, seq_ids, agg, ...) -> (loss, metrics)
    KL_ESTIMATORS[name](logp, ref_logp) -> per-token KL estimate
    ADVANTAGE_ESTIMATORS["grpo" | "rloo" | "reinforce_pp"](rewards [G, K], ...) -> advantages [G, K]
        (outcome rewards, a row per prompt group of K samples; spread to tokens by the caller)
    ADVANTAGE_ESTIMATORS["gae"](rewards [B, L], values [B, L], mask [B, L], ...) -> (advantages, returns)
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_sum_norm")
# exp() of a log-ratio past this overflows fp32's useful range; tokens that far off are clipped anyway.
MAX_LOG_RATIO = 20.0


# ---- aggregation -------------------------------------------------------------------------------


def aggregate(values: Tensor, mask: Tensor, agg: str, *, seq_ids: Tensor | None = None,
              num_seqs: int | None = None, max_len: int | None = None) -> Tensor:
    """Reduce per-token values to a scalar over the masked tokens.

    token_mean (DAPO, Yu et al. 2025): sum over all tokens / number of tokens.
    seq_mean_token_mean (GRPO, Shao et al. 2024 eq. 3): mean per sequence, then mean over the
        sequences that have tokens.
    seq_sum_norm (Dr. GRPO, Liu et al. 2025): sum per sequence / max_len (a constant, e.g. the
        generation budget), then mean over all sequences: (1 / S) sum_i sum_t x_it / max_len.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    if mask.shape != values.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but values have {tuple(values.shape)}")
    m = mask.bool()
    x = torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if agg == "token_mean":
        return x.sum() / m.sum().clamp(min=1)
    sid, s = _sequence_index(values, seq_ids, num_seqs)
    seq_sum = x.new_zeros(s).index_add(0, sid, x.reshape(-1))
    if agg == "seq_sum_norm":
        if max_len is None or max_len <= 0:
            raise ValueError(f"agg='seq_sum_norm' needs max_len > 0 (a constant, e.g. the max generation length), "
                             f"got {max_len!r}")
        return seq_sum.sum() / (max(s, 1) * max_len)
    seq_len = torch.zeros(s, dtype=torch.long, device=values.device).index_add(0, sid, m.reshape(-1).long())
    has_tokens = seq_len > 0
    seq_mean = seq_sum / seq_len.clamp(min=1)
    return (seq_mean * has_tokens).sum() / has_tokens.sum().clamp(min=1)


def _sequence_index(values, seq_ids, num_seqs) -> tuple[Tensor, int]:
    """Flat sequence index per token and the number of sequences."""
    if values.dim() == 2 and seq_ids is None:
        b, l = values.shape
        return torch.arange(b, device=values.device).repeat_interleave(l), b
    if seq_ids is None:
        raise ValueError(f"packed [T] tensors (got shape {tuple(values.shape)}) need seq_ids for per-sequence agg")
    if seq_ids.shape != values.shape:
        raise ValueError(f"seq_ids has shape {tuple(seq_ids.shape)} but values have {tuple(values.shape)}")
    sid = seq_ids.reshape(-1).long()
    s = num_seqs if num_seqs is not None else (int(sid.max()) + 1 if sid.numel() else 0)
    return sid, s


# ---- KL penalties to the reference (Schulman 2020, "Approximating KL divergence") ----------------


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log r, r = pi / pi_ref: unbiased for KL(pi || ref) under samples of pi, high variance."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = (log r)^2 / 2: biased, low variance; its gradient is that of the reverse KL."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(-log r) - 1 + log r = ref/pi - log(ref/pi) - 1 >= 0: GRPO's estimator (Shao et al. 2024 eq. 4)."""
    log_r = (logp - ref_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.exp(-log_r) - 1 + log_r


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


# ---- policy losses ---------------------------------------------------------------------------------


def ppo_clip(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
             ref_logp: Tensor | None = None, seq_ids: Tensor | None = None, num_seqs: int | None = None,
             agg: str = "token_mean", max_len: int | None = None, clip_eps: float = 0.2,
             clip_eps_high: float | None = None, dual_clip_c: float | None = None,
             kl_coef: float = 0.0, kl_estimator: str = "k3") -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate, Schulman et al. 2017 eq. 7, as a loss: max(-A r, -A clip(r, 1 - eps, 1 + eps_high)).

    r = exp(logp - old_logp) per token; advantages are per token (spread a per-sequence advantage
    with adv[seq_ids] or adv[:, None]). clip_eps_high (DAPO's clip-higher) defaults to clip_eps.
    dual_clip_c (Ye et al. 2020, e.g. 3): for A < 0 the loss is also capped at -c A, so a huge
    ratio on a bad token cannot blow up the step. With ref_logp and kl_coef > 0, adds
    kl_coef * KL estimate (k1 / k2 / k3) per token, aggregated the same way (GRPO eq. 3).

    Metrics (detached scalars): pg_loss, clip_fraction (masked tokens where the clipped term is
    the active one, i.e. with zero gradient), dual_clip_fraction, kl (when ref_logp is given).
    """
    _check_token_tensors(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp)
    if not (0 < clip_eps < 1):
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps!r}")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if not eps_high > 0:
        raise ValueError(f"clip_eps_high must be > 0, got {clip_eps_high!r}")
    if dual_clip_c is not None and not dual_clip_c > 1:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {tuple(KL_ESTIMATORS)}, got {kl_estimator!r}")
    if not (math.isfinite(kl_coef) and kl_coef >= 0):
        raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef!r}")
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp")

    ratio = torch.exp((logp - old_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + eps_high)
    pg = torch.maximum(unclipped, clipped)
    m = mask.bool()
    metrics = {"clip_fraction": _token_fraction(clipped > unclipped, m)}
    if dual_clip_c is not None:
        cap = -advantages * dual_clip_c
        negative = advantages < 0
        metrics["dual_clip_fraction"] = _token_fraction(negative & (pg > cap), m)
        pg = torch.where(negative, torch.minimum(pg, cap), pg)

    agg_kw = dict(seq_ids=seq_ids, num_seqs=num_seqs, max_len=max_len)
    pg_loss = aggregate(pg, m, agg, **agg_kw)
    loss = pg_loss
    metrics["pg_loss"] = pg_loss.detach()
    if ref_logp is not None:
        kl = aggregate(KL_ESTIMATORS[kl_estimator](logp, ref_logp), m, agg, **agg_kw)
        metrics["kl"] = kl.detach()
        if kl_coef > 0:
            loss = loss + kl_coef * kl
    return loss, metrics


POLICY_LOSSES = {"ppo_clip": ppo_clip}


def _token_fraction(flags: Tensor, mask: Tensor) -> Tensor:
    return ((flags & mask).sum() / mask.sum().clamp(min=1)).detach().float()


def _check_token_tensors(**tensors: Tensor | None) -> None:
    (first, ref), *_ = tensors.items()
    for arg, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{arg} must be a tensor, got {type(t).__name__}")
        if t.shape != ref.shape:
            raise ValueError(f"{arg} has shape {tuple(t.shape)} but {first} has {tuple(ref.shape)}")
        if arg != "mask" and not t.is_floating_point():
            raise ValueError(f"{arg} must be floating point, got {t.dtype}")


# ---- advantage estimators ----------------------------------------------------------------------------


def grpo_advantages(rewards: Tensor, *, scale_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO outcome advantages (Shao et al. 2024, Sec. 4.1.2): (r - mean_group) / (std_group + eps).

    rewards [G, K]: a row per prompt, K samples each; std is the unbiased sample std (as TRL and
    verl). scale_std=False drops the division (Dr. GRPO, Liu et al. 2025).
    """
    _check_groups(rewards, min_k=2)
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    return centered / (rewards.std(dim=1, keepdim=True) + eps) if scale_std else centered


def rloo_advantages(rewards: Tensor) -> Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024 Sec. 3): r_i - mean_{j != i} r_j.

    rewards [G, K], K >= 2. Equals K / (K - 1) * (r_i - mean_group).
    """
    _check_groups(rewards, min_k=2)
    k = rewards.shape[1]
    return rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)


def reinforce_pp_advantages(rewards: Tensor, *, group_baseline: bool = True, eps: float = 1e-6) -> Tensor:
    """REINFORCE++ (Hu et al. 2025, arXiv 2501.03262): global batch normalization of the advantages.

    group_baseline=True is "REINFORCE++ w/ Baseline" (k > 1 samples per prompt): subtract the group
    mean, then normalize over the whole batch, A = (a - mean_batch(a)) / (std_batch(a) + eps) with
    a = r - mean_group(r). group_baseline=False is plain REINFORCE++ (any K): A = (r - mean_batch) /
    (std_batch + eps). rewards [G, K]. The paper folds a per-token KL penalty into the reward first;
    here either the caller shapes `rewards` so, or the KL goes in the loss (ppo_clip's kl_coef).
    """
    _check_groups(rewards, min_k=2 if group_baseline else 1)
    a = rewards - rewards.mean(dim=1, keepdim=True) if group_baseline else rewards
    if a.numel() < 2:
        raise ValueError(f"rewards needs at least 2 values for a batch std, got shape {tuple(rewards.shape)}")
    return (a - a.mean()) / (a.std() + eps)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation, Schulman et al. 2016 eq. 16: A_t = sum_l (gamma lam)^l delta_{t+l}.

    delta_t = r_t + gamma V_{t+1} - V_t, with V = 0 past a sequence's last token. rewards, values,
    mask [B, L], right-padded (each row's mask is ones then zeros). Returns (advantages,
    returns = advantages + values), both zero on masked positions.
    """
    _check_token_tensors(rewards=rewards, values=values, mask=mask)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, L], got shape {tuple(rewards.shape)}")
    m = mask.to(rewards.dtype)
    if bool((m[:, 1:] > m[:, :-1]).any()):
        raise ValueError("mask must be right-padded: each row ones then zeros")
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        # m_next = 0 at a row's last real token: no bootstrap, and the running sum restarts.
        m_next = m[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        v_next = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * m_next * v_next - values[:, t]
        last = delta + gamma * lam * m_next * last
        adv[:, t] = last
    adv = adv * m
    return adv, (adv + values) * m


ADVANTAGE_ESTIMATORS = {
    "grpo": grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
    "gae": gae,
}


def _check_groups(rewards: Tensor, *, min_k: int) -> None:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating [G, K] tensor (a row per prompt group), got "
                         f"{tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__}")
    if rewards.shape[1] < min_k:
        raise ValueError(f"rewards needs at least {min_k} samples per group, got shape {tuple(rewards.shape)}")
