"""Policy losses, KL estimators and advantage estimators vs hand computations and the papers' equations."""

import math

import pytest
import torch

from optsys.losses import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    aggregate,
    gae,
    grpo_advantages,
    ppo_clip,
    reinforce_pp_advantages,
    rloo_advantages,
)

B, L = 3, 9  # odd


def _tokens(seed):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    old = -3 * torch.rand(B, L, **f64)
    logp = old + 0.6 * torch.randn(B, L, **f64)  # ratios well inside and outside the clip
    ref = old + 0.3 * torch.randn(B, L, **f64)
    adv = torch.randn(B, 1, **f64).expand(B, L).clone()
    adv[1] = torch.randn(L, **f64)  # one row with per-token advantages (GAE-like)
    # ratios 4.1, 3.3, 3.7, 1.1 on bad tokens: past the dual-clip caps c = 2 and 3
    logp[1, :4] = old[1, :4] + torch.tensor([1.4, 1.2, 1.3, 0.1], dtype=torch.float64)
    adv[1, :4] = torch.tensor([-1.0, -0.5, -0.7, -2.0], dtype=torch.float64)
    logp.requires_grad_()
    lens = [L, 4, 7]
    mask = torch.arange(L)[None] < torch.tensor(lens)[:, None]
    return logp, old, ref, adv, mask, lens


def _ref_ppo_tokens(logp, old, adv, eps_lo, eps_hi, c=None):
    """Schulman 2017 eq. 7 (and Ye et al. 2020's dual clip) as objectives, negated into a loss."""
    r = torch.exp(logp - old)
    obj = torch.minimum(r * adv, torch.clamp(r, 1 - eps_lo, 1 + eps_hi) * adv)
    if c is not None:
        obj = torch.where(adv < 0, torch.maximum(obj, c * adv), obj)
    return -obj


def _ref_agg(x, mask, agg, max_len=None):
    """Loops over rows: the three modes written out."""
    rows = [x[i][mask[i]] for i in range(x.shape[0])]
    if agg == "token_mean":
        return torch.cat(rows).sum() / sum(len(r) for r in rows)
    if agg == "seq_mean_token_mean":
        means = [r.mean() for r in rows if len(r)]
        return sum(means) / len(means)
    return sum(r.sum() / max_len for r in rows) / len(rows)


def _ref_kl(logp, ref, kind):
    pi, pr = torch.exp(logp), torch.exp(ref)
    return {"k1": torch.log(pi / pr), "k2": 0.5 * torch.log(pi / pr) ** 2, "k3": pr / pi - torch.log(pr / pi) - 1}[kind]


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_sum_norm"])
@pytest.mark.parametrize("dual_clip_c,kl", [(None, None), (3.0, "k3"), (None, "k1"), (2.0, "k2")])
def test_ppo_clip_matches_equation(agg, dual_clip_c, kl):
    logp, old, ref, adv, mask, _ = _tokens(0)
    kl_coef = 0.05 if kl else 0.0
    loss, m = ppo_clip(logp, old, adv, mask, ref_logp=ref if kl else None, agg=agg, max_len=16,
                       clip_eps=0.2, clip_eps_high=0.28, dual_clip_c=dual_clip_c, kl_coef=kl_coef,
                       kl_estimator=kl or "k3")
    pg = _ref_agg(_ref_ppo_tokens(logp, old, adv, 0.2, 0.28, dual_clip_c), mask, agg, 16)
    expected = pg + (kl_coef * _ref_agg(_ref_kl(logp, ref, kl), mask, agg, 16) if kl else 0)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(loss, logp)
    (g_ref,) = torch.autograd.grad(expected, logp)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
    assert (g[~mask] == 0).all()
    torch.testing.assert_close(m["pg_loss"], pg.detach())
    if dual_clip_c:
        assert float(m["dual_clip_fraction"]) > 0
    if kl:
        torch.testing.assert_close(m["kl"], _ref_agg(_ref_kl(logp, ref, kl), mask, agg, 16).detach())


def test_packed_layout_equals_padded():
    logp, old, ref, adv, mask, lens = _tokens(1)
    keep = mask.reshape(-1)
    seq_ids = torch.arange(B).repeat_interleave(L)[keep]
    flat = [t.reshape(-1)[keep] for t in (logp, old, adv, ref)]
    for agg in ("token_mean", "seq_mean_token_mean", "seq_sum_norm"):
        padded, _ = ppo_clip(logp, old, adv, mask, ref_logp=ref, kl_coef=0.1, agg=agg, max_len=16)
        packed, _ = ppo_clip(flat[0], flat[1], flat[2], torch.ones_like(flat[0], dtype=torch.bool),
                             ref_logp=flat[3], kl_coef=0.1, agg=agg, max_len=16, seq_ids=seq_ids)
        torch.testing.assert_close(packed, padded, rtol=1e-12, atol=1e-12)


def test_clip_fraction_and_dual_clip_on_crafted_tokens():
    # ratio, advantage -> which term is active (eps = 0.2, c = 3):
    #   0.5, +1: unclipped -0.5 > -0.8                      -> none
    #   0.9, +1: inside the range                           -> none
    #   1.5, +1: clipped -1.2 > -1.5                        -> clip
    #   0.5, -1: clipped 0.8 > 0.5                          -> clip
    #   1.5, -1: unclipped 1.5 < cap 3                      -> none
    #   5.0, -1: unclipped 5 > cap 3                        -> dual clip (loss 3)
    #   9.0, +1: masked out (would be clip)
    ratio = torch.tensor([0.5, 0.9, 1.5, 0.5, 1.5, 5.0, 9.0], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    old = torch.zeros(7, dtype=torch.float64)
    logp = torch.log(ratio).requires_grad_()
    loss, m = ppo_clip(logp[None], old[None], adv[None], mask[None], dual_clip_c=3.0)
    assert float(m["clip_fraction"]) == pytest.approx(2 / 6)
    assert float(m["dual_clip_fraction"]) == pytest.approx(1 / 6)
    per_token = torch.tensor([-0.5, -0.9, -1.2, 0.8, 1.5, 3.0])
    assert float(loss.detach()) == pytest.approx(float(per_token.mean()))
    (g,) = torch.autograd.grad(loss, logp)
    # d/dlogp of -A r = -A r; clipped, capped and masked tokens have zero gradient
    expected = torch.tensor([-0.5, -0.9, 0.0, 0.0, 1.5, 0.0, 0.0], dtype=torch.float64) / 6
    torch.testing.assert_close(g, expected)
    _, m = ppo_clip(logp[None], old[None], adv[None], mask[None])
    assert "dual_clip_fraction" not in m and float(m["clip_fraction"]) == pytest.approx(2 / 6)


def test_aggregation_modes_hand_example():
    # seq 0: tokens 1, 2, 3 (+ a padded 100); seq 1: token 4 (+ padding)
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert float(aggregate(x, mask, "token_mean")) == pytest.approx(10 / 4)  # 2.5
    assert float(aggregate(x, mask, "seq_mean_token_mean")) == pytest.approx((2 + 4) / 2)  # 3.0
    assert float(aggregate(x, mask, "seq_sum_norm", max_len=4)) == pytest.approx((6 / 4 + 4 / 4) / 2)  # 1.25
    packed, ids = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 0, 0, 1])
    ones = torch.ones(4, dtype=torch.bool)
    assert float(aggregate(packed, ones, "seq_mean_token_mean", seq_ids=ids)) == pytest.approx(3.0)
    assert float(aggregate(packed, ones, "seq_sum_norm", seq_ids=ids, max_len=4)) == pytest.approx(1.25)
    # a sequence with no tokens is left out of the per-sequence mean
    assert float(aggregate(x, torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]]), "seq_mean_token_mean")) == pytest.approx(2.0)


def test_kl_estimators_hand_values():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])  # log r = log 2
    ln2 = math.log(2)
    assert float(KL_ESTIMATORS["k1"](logp, ref)) == pytest.approx(ln2)
    assert float(KL_ESTIMATORS["k2"](logp, ref)) == pytest.approx(0.5 * ln2**2)
    assert float(KL_ESTIMATORS["k3"](logp, ref)) == pytest.approx(0.5 - 1 + ln2)
    assert float(KL_ESTIMATORS["k3"](ref, ref)) == 0.0


def test_grpo_advantages_hand_group():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    a = grpo_advantages(r)
    s = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    torch.testing.assert_close(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-6))
    assert a[0, 0] == pytest.approx(0.8660239, abs=1e-6)
    assert (a[1] == 0).all()  # equal rewards: no signal, no division by zero
    torch.testing.assert_close(grpo_advantages(r, scale_std=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_rloo_advantages_hand_group():
    a = rloo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(a[0], torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))  # 1 - 1/3, 0 - 2/3
    torch.testing.assert_close(a[1], torch.tensor([3.0, -1.0, -1.0, -1.0]))


def test_reinforce_pp_advantages_hand_batch():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    # group-centered: [.5, -.5, -.5, .5], [.25, .25, .25, -.75]; batch mean 0, unbiased var 1.75 / 7 = .25
    a = reinforce_pp_advantages(r, eps=0.0)
    torch.testing.assert_close(a, torch.tensor([[1.0, -1.0, -1.0, 1.0], [0.5, 0.5, 0.5, -1.5]]))
    # without the group baseline: plain batch normalization of the rewards (mean 5/8)
    b = reinforce_pp_advantages(r, group_baseline=False, eps=0.0)
    torch.testing.assert_close(b, (r - 0.625) / r.std())


def test_gae_hand_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 9.0]])  # the 9 sits on a padded position
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)  # Monte Carlo return - V
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]))
    # gamma = lam = 0.5, row 0: delta = [-.25, -.25, .5]; A2 = .5, A1 = -.25 + .25 * .5, A0 = -.25 + .25 * A1
    adv, _ = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv[0], torch.tensor([-0.28125, -0.125, 0.5]))


def test_gae_matches_eq16_double_sum():
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(B, L, generator=g, dtype=torch.float64)
    values = torch.randn(B, L, generator=g, dtype=torch.float64)
    lens = [L, 1, 6]
    mask = torch.arange(L)[None] < torch.tensor(lens)[:, None]
    gamma, lam = 0.9, 0.8
    adv, _ = gae(rewards, values, mask, gamma=gamma, lam=lam)
    for i, n in enumerate(lens):
        v = torch.cat([values[i, :n], torch.zeros(1, dtype=torch.float64)])  # V = 0 after the end
        delta = [rewards[i, t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            want = sum((gamma * lam) ** k * delta[t + k] for k in range(n - t))
            assert float(adv[i, t]) == pytest.approx(float(want), rel=1e-12, abs=1e-12)
        assert (adv[i, n:] == 0).all()


def test_registries_give_the_documented_values_by_name():
    """Each registered name gives its estimator's value on a case computed by hand (a registry whose names
    point at the wrong functions fails here)."""
    assert set(POLICY_LOSSES) == {"ppo_clip"}
    # pi = 1/2, ref = 1/4: log r = log 2; k2 = (log 2)^2 / 2; k3 = ref/pi - log(ref/pi) - 1 = 1/2 + log 2 - 1.
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    expect_kl = {"k1": math.log(2), "k2": math.log(2) ** 2 / 2, "k3": 0.5 + math.log(2) - 1}
    assert set(KL_ESTIMATORS) == set(expect_kl)
    for name, value in expect_kl.items():
        assert KL_ESTIMATORS[name](logp, ref).item() == pytest.approx(value, rel=1e-6), name

    # One group of 4 rewards [1, 0, 0, 1]: mean 1/2, unbiased std sqrt(1/3).
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    z = 0.5 / math.sqrt(1 / 3)
    expect_adv = {"grpo": [z, -z, -z, z], "rloo": [2 / 3, -2 / 3, -2 / 3, 2 / 3], "reinforce_pp": [z, -z, -z, z]}
    for name, value in expect_adv.items():
        assert ADVANTAGE_ESTIMATORS[name](rewards).squeeze(0).tolist() == pytest.approx(value, rel=1e-5), name
    # GAE with zero values, gamma 1, lam 0.95 and one reward at the end: A_t = 0.95^(2 - t).
    adv, returns = ADVANTAGE_ESTIMATORS["gae"](torch.tensor([[0.0, 0.0, 1.0]]), torch.zeros(1, 3), torch.ones(1, 3),
                                               gamma=1.0, lam=0.95)
    assert adv.squeeze(0).tolist() == pytest.approx([0.95**2, 0.95, 1.0]) and torch.equal(adv, returns)
    assert set(ADVANTAGE_ESTIMATORS) == {*expect_adv, "gae"}

    # ppo_clip with ratio 1 and advantage 1 everywhere: the token-mean surrogate is -1, nothing clipped.
    ones = torch.ones(2, 3, dtype=torch.float64)
    loss, metrics = POLICY_LOSSES["ppo_clip"](-ones, -ones, ones, ones)
    assert loss.item() == pytest.approx(-1.0) and metrics["clip_fraction"].item() == 0.0


def test_bad_input():
    logp, old, ref, adv, mask, _ = _tokens(4)
    logp = logp.detach()
    with pytest.raises(ValueError, match="old_logp"):
        ppo_clip(logp, old[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="mask"):
        ppo_clip(logp, old, adv, mask[:2])
    with pytest.raises(ValueError, match="ref_logp"):
        ppo_clip(logp, old, adv, mask, ref_logp=ref[:1])
    with pytest.raises(ValueError, match="ref_logp"):
        ppo_clip(logp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="max_len"):
        ppo_clip(logp, old, adv, mask, agg="seq_sum_norm")
    with pytest.raises(ValueError, match="agg"):
        ppo_clip(logp, old, adv, mask, agg="sum")
    with pytest.raises(ValueError, match="dual_clip_c"):
        ppo_clip(logp, old, adv, mask, dual_clip_c=0.5)
    with pytest.raises(ValueError, match="clip_eps"):
        ppo_clip(logp, old, adv, mask, clip_eps=-0.2)
    with pytest.raises(ValueError, match="kl_estimator"):
        ppo_clip(logp, old, adv, mask, ref_logp=ref, kl_estimator="k4")
    with pytest.raises(ValueError, match="seq_ids"):
        ppo_clip(logp.reshape(-1), old.reshape(-1), adv.reshape(-1), mask.reshape(-1), agg="seq_mean_token_mean")
    with pytest.raises(ValueError, match="rewards"):
        grpo_advantages(torch.ones(4, 1))
    with pytest.raises(ValueError, match="rewards"):
        rloo_advantages(torch.ones(4))
    with pytest.raises(ValueError, match="mask"):
        gae(torch.ones(1, 3), torch.ones(1, 3), torch.tensor([[1, 0, 1]]))
