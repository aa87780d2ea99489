"""Policy-gradient losses, KL penalties, advantage estimators and RL helpers (PPO / GRPO family), registered by name.

Token tensors are either padded [B, L] (a row per sequence) or packed [T] with `seq_ids` [T]
giving each token's sequence. `mask` marks the tokens that count (bool or 0/1).

    POLICY_LOSSES["ppo_clip" | "gspo" | "cispo"](logp, old_logp, advantages, mask, *, ref_logp, seq_ids, agg,
        token_weights, is_weights, ...) -> (loss, metrics)
    aggregation_weights(lengths [S], agg, *, max_len) -> per-token weight of each sequence [S], so that
        micro-batch losses with token_weights=w[seq_ids] sum to the whole step's `agg` aggregate
    KL_ESTIMATORS[name](logp, ref_logp) -> per-token KL estimate
    SAMPLER_CORRECTIONS / sampler_correction(old_logp, sampler_logp, mask, *, mode, cap) -> (is_weights, metrics)
        (trainer-vs-inference-engine mismatch: "none" | "tis" | "mis_token" | "mis_seq")
    ADVANTAGE_ESTIMATORS["grpo" | "rloo" | "reinforce_pp"](rewards [G, K], ...) -> advantages [G, K]
        (outcome rewards, a row per prompt group of K samples; spread to tokens by the caller)
    ADVANTAGE_ESTIMATORS["reinforce_pp_token"](rewards [S], mask [T], seq_ids [T], *, kl, kl_coef, gamma) -> [T]
        (reinforce_pp_token_returns: the same before whitening, for a trainer that whitens over ranks)
    ADVANTAGE_ESTIMATORS["gae"](rewards [B, L], values [B, L], mask [B, L], ...) -> (advantages, returns)
    overlong_penalty(lengths [N], *, max_len, buffer) -> [N]; informative_groups(rewards [G, K]) -> bool [G] (DAPO)
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


def aggregation_weights(lengths: Tensor, agg: str, *, max_len: int | None = None) -> Tensor:
    """Per-token weight w_i of sequence i such that sum_i w_i sum_t x_it == aggregate(x, mask, agg).

    lengths [S]: masked-token count of every sequence of the whole optimizer step. A trainer that
    splits the step into micro-batches of whole sequences passes token_weights = w[seq_ids] to the
    losses; their sum over micro-batches is then the step's aggregate (DAPO's token_mean over the
    step, not a mean of per-micro-batch means). token_mean: 1 / total tokens; seq_mean_token_mean:
    1 / (len_i * sequences with tokens), 0 for empty ones; seq_sum_norm: 1 / (S * max_len).
    Returned in float64 (exact for any realistic count); the losses cast it to logp's dtype.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1:
        raise ValueError(f"lengths must be a 1-D tensor of per-sequence token counts, got "
                         f"{tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__}")
    n = lengths.to(torch.float64)
    if lengths.is_floating_point() and not bool((n == n.round()).all()):
        raise ValueError("lengths must be whole token counts")
    if bool((n < 0).any()):
        raise ValueError(f"lengths must be >= 0, got min {float(n.min())}")
    if agg == "token_mean":
        return torch.full_like(n, 1.0) / n.sum().clamp(min=1)
    if agg == "seq_sum_norm":
        if max_len is None or max_len <= 0:
            raise ValueError(f"agg='seq_sum_norm' needs max_len > 0 (a constant, e.g. the max generation length), "
                             f"got {max_len!r}")
        return torch.full_like(n, 1.0 / (max(n.numel(), 1) * max_len))
    has_tokens = n > 0
    return has_tokens / (n.clamp(min=1) * has_tokens.sum().clamp(min=1))


def _sequence_index(values, seq_ids, num_seqs) -> tuple[Tensor, int]:
    """Flat sequence index per token and the number of sequences."""
    if values.dim() == 2 and seq_ids is None:
        b, l = values.shape
        return torch.arange(b, device=values.device).repeat_interleave(l), b
    if seq_ids is None:
        raise ValueError(f"packed [T] tensors (got shape {tuple(values.shape)}) need seq_ids (each token's "
                         f"sequence) for per-sequence agg or sequence-level ratios")
    if seq_ids.shape != values.shape:
        raise ValueError(f"seq_ids has shape {tuple(seq_ids.shape)} but values have {tuple(values.shape)}")
    sid = seq_ids.reshape(-1).long()
    s = num_seqs if num_seqs is not None else (int(sid.max()) + 1 if sid.numel() else 0)
    if sid.numel() and (int(sid.min()) < 0 or int(sid.max()) >= s):
        raise ValueError(f"seq_ids must be in [0, num_seqs={s}), got [{int(sid.min())}, {int(sid.max())}]")
    return sid, s


# ---- KL penalties to the reference (Schulman 2020, "Approximating KL divergence") ----------------


# As a LOSS term on samples x ~ pi, what matters is the expected gradient E_pi[grad k(x)] (the sample held fixed);
# on a 7-token vocabulary it equals exactly (tests/losses/test_policy.py::test_kl_estimator_gradients):
#   k1: E_pi[grad log pi] = 0: no regularisation at all, so the losses refuse k1 with kl_coef > 0;
#   k2: E_pi[log r grad log pi] = grad KL(pi || ref), the reverse KL;
#   k3: E_pi[(1 - ref/pi) grad log pi] = -sum ref grad log pi = grad KL(ref || pi), the forward KL (GRPO's).
# As a REWARD (PPO, REINFORCE++: -kl_coef k per token, detached), the gradient is E_pi[k grad log pi], which is
# grad KL(pi || ref) for k1 only.


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log r, r = pi / pi_ref: unbiased for KL(pi || ref) under samples of pi, high variance. A reward-side
    estimator: as a loss term its expected gradient is 0."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = (log r)^2 / 2: biased, low variance; as a loss term its expected gradient is that of KL(pi || ref)."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(-log r) - 1 + log r = ref/pi - log(ref/pi) - 1 >= 0: GRPO's estimator (Shao et al. 2024 eq. 4),
    unbiased for KL(pi || ref); as a loss term its expected gradient is that of KL(ref || pi)."""
    log_r = (logp - ref_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.exp(-log_r) - 1 + log_r


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
# The estimators whose expected gradient as a loss term is not zero.
LOSS_KL_ESTIMATORS = ("k2", "k3")


# ---- policy losses ---------------------------------------------------------------------------------
#
# Every loss takes, besides its own knobs: ref_logp + kl_coef + kl_estimator (a KL penalty to the
# reference, aggregated like the policy term), token_weights (per-token weights that replace `agg`:
# each aggregated term becomes sum over the mask of x * token_weights, see aggregation_weights) and
# is_weights (detached per-token factors on the policy term only, e.g. from sampler_correction).


def ppo_clip(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
             ref_logp: Tensor | None = None, seq_ids: Tensor | None = None, num_seqs: int | None = None,
             agg: str = "token_mean", max_len: int | None = None, clip_eps: float = 0.2,
             clip_eps_high: float | None = None, dual_clip_c: float | None = None,
             kl_coef: float = 0.0, kl_estimator: str = "k3", token_weights: Tensor | None = None,
             is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate, Schulman et al. 2017 eq. 7, as a loss: max(-A r, -A clip(r, 1 - eps, 1 + eps_high)).

    r = exp(logp - old_logp) per token; advantages are per token (spread a per-sequence advantage
    with adv[seq_ids] or adv[:, None]). clip_eps_high (DAPO's clip-higher) defaults to clip_eps.
    dual_clip_c (Ye et al. 2020, e.g. 3): for A < 0 the loss is also capped at -c A, so a huge
    ratio on a bad token cannot blow up the step. With ref_logp and kl_coef > 0, adds
    kl_coef * KL estimate (k1 / k2 / k3) per token, aggregated the same way (GRPO eq. 3).

    Metrics (detached scalars): pg_loss, clip_fraction (masked tokens where the clipped term is
    the active one, i.e. with zero gradient), dual_clip_fraction, kl (when ref_logp is given).
    """
    _check_token_tensors(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp,
                         token_weights=token_weights, is_weights=is_weights)
    eps_high = _check_clip(clip_eps, clip_eps_high)
    if dual_clip_c is not None and not dual_clip_c > 1:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c!r}")
    _check_common(agg, kl_coef, kl_estimator, ref_logp)

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
    return _policy_loss(pg, m, metrics, logp=logp, ref_logp=ref_logp, agg=agg, seq_ids=seq_ids, num_seqs=num_seqs,
                        max_len=max_len, kl_coef=kl_coef, kl_estimator=kl_estimator, token_weights=token_weights,
                        is_weights=is_weights)


def gspo(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
         ref_logp: Tensor | None = None, seq_ids: Tensor | None = None, num_seqs: int | None = None,
         agg: str = "seq_mean_token_mean", max_len: int | None = None, clip_eps: float = 3e-4,
         clip_eps_high: float | None = 4e-4, kl_coef: float = 0.0, kl_estimator: str = "k3",
         token_weights: Tensor | None = None, is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071 eq. 5-7): max(-A_i s_i, -A_i clip(s_i, 1 - eps, 1 + eps_high)).

    s_i = exp(mean over sequence i's masked tokens of (logp - old_logp)), the length-normalized
    sequence ratio. Computed as GSPO-token (eq. 13-14): token ratio sg(s_i) exp(logp - sg(logp)),
    whose value is s_i and whose gradient is s_i d logp, so with per-sequence advantages and the
    default agg (the paper's mean over sequences of token means) value and gradient equal GSPO's.
    clip_eps / clip_eps_high default to the paper's 3e-4 / 4e-4 (tiny: s_i is a geometric mean).

    Metrics: pg_loss, clip_fraction (sequences with tokens where the clipped term is active on
    some token; with per-sequence advantages, the clipped sequences), kl (when ref_logp is given).
    """
    _check_token_tensors(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp,
                         token_weights=token_weights, is_weights=is_weights)
    eps_high = _check_clip(clip_eps, clip_eps_high)
    _check_common(agg, kl_coef, kl_estimator, ref_logp)

    m = mask.bool()
    sid, s = _sequence_index(logp, seq_ids, num_seqs)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    lp = torch.where(m, logp, zero)  # masked-out positions may hold -inf / garbage
    log_r = torch.where(m, logp - old_logp, zero).detach().reshape(-1)
    seq_len = torch.zeros(s, dtype=torch.long, device=logp.device).index_add(0, sid, m.reshape(-1).long())
    log_s = log_r.new_zeros(s).index_add(0, sid, log_r) / seq_len.clamp(min=1)
    s_seq = torch.exp(log_s.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    # exp(lp - sg(lp)) == 1 in value, d/dlp == 1: carries the gradient of logp at the value sg(s_i).
    ratio = s_seq[sid].reshape(logp.shape) * torch.exp(lp - lp.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + eps_high)
    pg = torch.maximum(unclipped, clipped)
    seq_clipped = torch.zeros(s, dtype=torch.long, device=logp.device).index_add(
        0, sid, ((clipped > unclipped) & m).reshape(-1).long()) > 0
    has_tokens = seq_len > 0
    metrics = {"clip_fraction": ((seq_clipped & has_tokens).sum() / has_tokens.sum().clamp(min=1)).detach().float()}
    return _policy_loss(pg, m, metrics, logp=logp, ref_logp=ref_logp, agg=agg, seq_ids=seq_ids, num_seqs=num_seqs,
                        max_len=max_len, kl_coef=kl_coef, kl_estimator=kl_estimator, token_weights=token_weights,
                        is_weights=is_weights)


def cispo(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
          ref_logp: Tensor | None = None, seq_ids: Tensor | None = None, num_seqs: int | None = None,
          agg: str = "token_mean", max_len: int | None = None, clip_eps_low: float | None = None,
          clip_eps_high: float = 0.28, kl_coef: float = 0.0, kl_estimator: str = "k3",
          token_weights: Tensor | None = None, is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1, arXiv 2506.13585 eq. 4-5): -sg(clip(r, 1 - eps_low, 1 + eps_high)) A logp per token.

    r = exp(logp - old_logp). The IS weight is clipped and detached instead of the update, so every
    token keeps the gradient -w A d logp (PPO zeroes clipped tokens). The paper's token-level mean
    is the default agg. clip_eps_low=None: no lower bound, as the paper. The paper does not publish
    its eps_high; 0.28 is DAPO's clip-higher value (Yu et al. 2025), also Trinity-RFT's CISPO default.
    The loss value is a surrogate (-w A logp): only its gradient is meaningful.

    Metrics: pg_loss, clip_fraction (masked tokens whose weight was clipped), kl (when ref_logp is given).
    """
    _check_token_tensors(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp,
                         token_weights=token_weights, is_weights=is_weights)
    if not (math.isfinite(clip_eps_high) and clip_eps_high > 0):
        raise ValueError(f"clip_eps_high must be a finite number > 0, got {clip_eps_high!r}")
    if clip_eps_low is not None and not (math.isfinite(clip_eps_low) and clip_eps_low > 0):
        raise ValueError(f"clip_eps_low must be None (no lower bound) or a finite number > 0, got {clip_eps_low!r}")
    _check_common(agg, kl_coef, kl_estimator, ref_logp)

    m = mask.bool()
    ratio = torch.exp((logp - old_logp).detach().clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    weight = ratio.clamp(max=1 + clip_eps_high)
    flags = ratio > 1 + clip_eps_high
    if clip_eps_low is not None:
        weight = weight.clamp(min=1 - clip_eps_low)
        flags = flags | (ratio < 1 - clip_eps_low)
    lp = torch.where(m, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    pg = -weight * advantages * lp
    metrics = {"clip_fraction": _token_fraction(flags, m)}
    return _policy_loss(pg, m, metrics, logp=logp, ref_logp=ref_logp, agg=agg, seq_ids=seq_ids, num_seqs=num_seqs,
                        max_len=max_len, kl_coef=kl_coef, kl_estimator=kl_estimator, token_weights=token_weights,
                        is_weights=is_weights)


POLICY_LOSSES = {"ppo_clip": ppo_clip, "gspo": gspo, "cispo": cispo}


def _policy_loss(pg, m, metrics, *, logp, ref_logp, agg, seq_ids, num_seqs, max_len, kl_coef, kl_estimator,
                 token_weights, is_weights) -> tuple[Tensor, dict[str, Tensor]]:
    """The shared tail: IS-weight the policy term, aggregate it (and the KL term), add the KL penalty."""
    if is_weights is not None:
        pg = pg * is_weights.detach().to(pg.dtype)
    reduce_kw = dict(agg=agg, seq_ids=seq_ids, num_seqs=num_seqs, max_len=max_len, token_weights=token_weights)
    pg_loss = _reduce(pg, m, **reduce_kw)
    loss = pg_loss
    metrics["pg_loss"] = pg_loss.detach()
    if ref_logp is not None:
        kl = _reduce(KL_ESTIMATORS[kl_estimator](logp, ref_logp), m, **reduce_kw)
        metrics["kl"] = kl.detach()
        if kl_coef > 0:
            loss = loss + kl_coef * kl
    return loss, metrics


def _reduce(x, m, *, agg, seq_ids, num_seqs, max_len, token_weights) -> Tensor:
    if token_weights is None:
        return aggregate(x, m, agg, seq_ids=seq_ids, num_seqs=num_seqs, max_len=max_len)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    # both sides zeroed off the mask: garbage (inf) there would give nan through 0 * inf
    return (torch.where(m, x, zero) * torch.where(m, token_weights.to(x.dtype), zero)).sum()


def _check_clip(clip_eps, clip_eps_high) -> float:
    if not (0 < clip_eps < 1):
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps!r}")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if not eps_high > 0:
        raise ValueError(f"clip_eps_high must be > 0, got {clip_eps_high!r}")
    return eps_high


def _check_common(agg, kl_coef, kl_estimator, ref_logp) -> None:
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {tuple(KL_ESTIMATORS)}, got {kl_estimator!r}")
    if not (math.isfinite(kl_coef) and kl_coef >= 0):
        raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef!r}")
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp")
    if kl_coef > 0 and kl_estimator not in LOSS_KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={kl_estimator!r} as a loss term has zero expected gradient (E_pi[grad log pi] "
                         f"= 0), so kl_coef={kl_coef} would regularise nothing; use one of {LOSS_KL_ESTIMATORS} "
                         "(k3: grad KL(ref || pi); k2: grad KL(pi || ref)), or put k1 in the reward")


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


# ---- sampler-mismatch correction ---------------------------------------------------------------------
#
# The inference engine's log-probs of the sampled tokens (sampler_logp) differ from the trainer's
# (old_logp) through kernels, precision and batching, so the rollouts are slightly off-policy.
# ratio = exp(old_logp - sampler_logp) per token reweights (or drops) the policy-gradient term.


def _correct_none(log_ratio, m, **_):
    return torch.ones_like(log_ratio), {}


def _correct_tis(log_ratio, m, *, cap, **_):
    ratio = torch.exp(log_ratio)
    return ratio.clamp(max=cap), {"is_truncated_fraction": _token_fraction(ratio > cap, m)}


def _correct_mis_token(log_ratio, m, *, cap, **_):
    ratio = torch.exp(log_ratio)
    # both sides, as mis_seq: a token the trainer finds far less likely than the sampler did is as off-policy
    dropped = log_ratio.abs() > math.log(cap)
    return torch.where(dropped, torch.zeros_like(ratio), ratio), {"is_masked_fraction": _token_fraction(dropped, m)}


def _correct_mis_seq(log_ratio, m, *, cap, seq_ids, num_seqs, **_):
    sid, s = _sequence_index(log_ratio, seq_ids, num_seqs)
    seq_len = torch.zeros(s, dtype=torch.long, device=log_ratio.device).index_add(0, sid, m.reshape(-1).long())
    log_seq = log_ratio.new_zeros(s).index_add(0, sid, log_ratio.reshape(-1)) / seq_len.clamp(min=1)
    # |log geo-mean| > log cap  <=>  the geo-mean ratio is outside [1 / cap, cap]
    dropped_seq = log_seq.abs() > math.log(cap)
    w_seq = torch.where(dropped_seq, torch.zeros_like(log_seq), torch.exp(log_seq))
    dropped = dropped_seq[sid].reshape(log_ratio.shape)
    return w_seq[sid].reshape(log_ratio.shape), {"is_masked_fraction": _token_fraction(dropped, m)}


SAMPLER_CORRECTIONS = {"none": _correct_none, "tis": _correct_tis, "mis_token": _correct_mis_token,
                       "mis_seq": _correct_mis_seq}


def sampler_correction(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *, mode: str, cap: float,
                       seq_ids: Tensor | None = None, num_seqs: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Detached per-token IS weights for the trainer / sampler mismatch, ratio = exp(old_logp - sampler_logp).

    sampler_logp: the inference engine's log-probs of the sampled tokens under its true sampling
    distribution (temperature, top-p / top-k renormalized). mode:
      none: 1.
      tis: min(ratio, cap), truncated IS (Yao et al. 2025, "Your efficient RL framework secretly
        brings you off-policy RL training").
      mis_token: ratio, or 0 where it is outside [1 / cap, cap] (masked IS: those tokens are dropped).
      mis_seq: per sequence, the geometric-mean ratio exp(mean_t log ratio) on every token of the
        sequence, or 0 on all of them when it is outside [1 / cap, cap] (needs seq_ids when packed).
    Positions outside the mask get 1 (neutral; the losses ignore them). Pass as is_weights.

    Metrics: logp_gap_mean / logp_gap_max (of |sampler_logp - old_logp| over masked tokens), and
    is_truncated_fraction (tis) or is_masked_fraction (mis_*): masked tokens affected.
    """
    _check_token_tensors(old_logp=old_logp, sampler_logp=sampler_logp, mask=mask)
    if mode not in SAMPLER_CORRECTIONS:
        raise ValueError(f"mode must be one of {tuple(SAMPLER_CORRECTIONS)}, got {mode!r}")
    if mode != "none" and not (isinstance(cap, (int, float)) and math.isfinite(cap) and cap >= 1):
        raise ValueError(f"cap must be a finite number >= 1 for mode={mode!r}, got {cap!r}")
    m = mask.bool()
    with torch.no_grad():
        zero = torch.zeros((), dtype=old_logp.dtype, device=old_logp.device)
        gap = torch.where(m, old_logp - sampler_logp, zero)
        weights, metrics = SAMPLER_CORRECTIONS[mode](gap.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO), m, cap=cap,
                                                     seq_ids=seq_ids, num_seqs=num_seqs)
        weights = torch.where(m, weights, torch.ones_like(weights))
        abs_gap = gap.abs()
        metrics["logp_gap_mean"] = (abs_gap.sum() / m.sum().clamp(min=1)).float()
        metrics["logp_gap_max"] = (abs_gap.max() if abs_gap.numel() else abs_gap.sum()).float()
    return weights, metrics


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


def reinforce_pp_token_returns(rewards: Tensor, mask: Tensor, seq_ids: Tensor, *, kl: Tensor | None = None,
                               kl_coef: float = 0.0, gamma: float = 1.0) -> Tensor:
    """REINFORCE++'s per-token returns (Hu et al. 2025, arXiv 2501.03262 Sec. 3), before whitening.

    Per-token reward r_t = -kl_coef kl_t, plus the outcome reward rewards[i] on sequence i's last
    masked token; G_t = sum_{s >= t} gamma^(s - t) r_s over the sequence's masked tokens in order
    (masked-out tokens are not actions: no reward, no discount step); 0 off the mask. rewards [S];
    mask, seq_ids, kl [T] (packed; kl e.g. k1 = old_logp - ref_logp, as the paper). Detached.
    A trainer over several ranks whitens these over all ranks' tokens (the paper's batch normalization).
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating [S] tensor (one outcome reward per sequence), got "
                         f"{tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__}")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 1:
        raise ValueError(f"mask must be a packed [T] tensor, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    _check_token_tensors(mask=mask, kl=kl)
    if not isinstance(seq_ids, torch.Tensor) or seq_ids.shape != mask.shape or seq_ids.is_floating_point():
        raise ValueError(f"seq_ids must be an integer tensor shaped like mask {tuple(mask.shape)}, got "
                         f"{tuple(seq_ids.shape) if isinstance(seq_ids, torch.Tensor) else type(seq_ids).__name__}")
    if not (math.isfinite(kl_coef) and kl_coef >= 0):
        raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef!r}")
    if kl_coef > 0 and kl is None:
        raise ValueError("kl_coef > 0 needs kl")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
    s = rewards.numel()
    m = mask.bool()
    idx = m.nonzero().squeeze(1)
    sid = seq_ids[idx].long()
    if sid.numel() and (int(sid.min()) < 0 or int(sid.max()) >= s):
        raise ValueError(f"seq_ids of masked tokens must be in [0, len(rewards)={s}), "
                         f"got [{int(sid.min())}, {int(sid.max())}]")
    ret_tok = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    if not idx.numel():
        return ret_tok
    with torch.no_grad():
        # step k of every masked token within its sequence: rank in tensor order among the sequence's masked tokens
        order = torch.argsort(sid, stable=True)
        counts = torch.bincount(sid, minlength=s)
        starts = torch.cumsum(counts, 0) - counts
        k = torch.empty_like(sid)
        k[order] = torch.arange(sid.numel(), device=sid.device) - starts[sid[order]]
        r_tok = torch.zeros(idx.numel(), dtype=rewards.dtype, device=rewards.device)
        if kl is not None and kl_coef > 0:
            r_tok = r_tok - kl_coef * kl.detach()[idx].to(rewards.dtype)
        last = k == counts[sid] - 1
        r_tok = r_tok + torch.where(last, rewards.detach()[sid], torch.zeros_like(r_tok))
        # a [S, max steps] grid, then the return-to-go backwards over the steps (as gae)
        grid = torch.zeros(s, int(counts.max()), dtype=rewards.dtype, device=rewards.device)
        grid[sid, k] = r_tok
        if gamma == 1:
            ret = grid.flip(1).cumsum(1).flip(1)
        else:
            ret = torch.zeros_like(grid)
            running = torch.zeros_like(grid[:, 0])
            for t in reversed(range(grid.shape[1])):
                running = grid[:, t] + gamma * running
                ret[:, t] = running
        ret_tok[idx] = ret[sid, k]
    return ret_tok


def reinforce_pp_token_advantages(rewards: Tensor, mask: Tensor, seq_ids: Tensor, *, kl: Tensor | None = None,
                                  kl_coef: float = 0.0, gamma: float = 1.0, eps: float = 1e-6) -> Tensor:
    """REINFORCE++ token advantages (Hu et al. 2025, arXiv 2501.03262 Sec. 3): whitened discounted returns.

    reinforce_pp_token_returns, then A = (G - mean) / (std + eps) over all masked tokens of this call
    (unbiased std), 0 off the mask. Detached. One process's batch: over ranks, whiten the returns with
    statistics reduced over all ranks instead (optsys.trainers.rl_batch does).
    """
    ret = reinforce_pp_token_returns(rewards, mask, seq_ids, kl=kl, kl_coef=kl_coef, gamma=gamma)
    m = mask.bool()
    if int(m.sum()) < 2:
        raise ValueError(f"reinforce_pp_token needs at least 2 masked tokens for a batch std, got {int(m.sum())}")
    g = ret[m]
    adv = torch.zeros_like(ret)
    adv[m] = (g - g.mean()) / (g.std() + eps)
    return adv


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
    "reinforce_pp_token": reinforce_pp_token_advantages,
    "gae": gae,
}


def _check_groups(rewards: Tensor, *, min_k: int) -> None:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating [G, K] tensor (a row per prompt group), got "
                         f"{tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__}")
    if rewards.shape[1] < min_k:
        raise ValueError(f"rewards needs at least {min_k} samples per group, got shape {tuple(rewards.shape)}")


# ---- DAPO helpers (Yu et al. 2025, arXiv 2503.14476) -------------------------------------------------


def overlong_penalty(lengths: Tensor, *, max_len: int, buffer: int) -> Tensor:
    """DAPO's soft overlong punishment (eq. 13), added to the outcome reward.

    0 if len <= max_len - buffer; (max_len - buffer - len) / buffer inside the buffer (0 to -1);
    -1 beyond max_len. lengths [N]: response lengths in tokens.
    """
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1:
        raise ValueError(f"lengths must be a 1-D tensor of response lengths, got "
                         f"{tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__}")
    if not (isinstance(max_len, int) and isinstance(buffer, int) and 0 < buffer <= max_len):
        raise ValueError(f"need integers 0 < buffer <= max_len, got max_len={max_len!r}, buffer={buffer!r}")
    if bool((lengths < 0).any()):
        raise ValueError(f"lengths must be >= 0, got min {lengths.min().item()}")
    n = lengths if lengths.is_floating_point() else lengths.to(torch.get_default_dtype())
    soft = ((max_len - buffer - n) / buffer).clamp(max=0)
    return torch.where(n > max_len, torch.full_like(n, -1.0), soft)


def informative_groups(rewards: Tensor, *, atol: float = 1e-6) -> Tensor:
    """DAPO's dynamic sampling filter (eq. 11): True where a group's rewards are not all equal.

    rewards [G, K]. A group whose rewards all lie within atol of each other (max - min <= atol) has
    zero group-relative advantage, so no gradient; atol absorbs float noise from averaged or
    scaled rewards (1e-6 is far below any real reward gap and above fp32 rounding of O(1) values).
    """
    _check_groups(rewards, min_k=1)
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite (nan / inf would make a group's spread undefined)")
    if not atol >= 0:
        raise ValueError(f"atol must be >= 0, got {atol!r}")
    return (rewards.amax(dim=1) - rewards.amin(dim=1)) > atol
