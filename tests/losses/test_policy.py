"""Policy losses, KL estimators and advantage estimators vs hand computations and the papers' equations."""

import math

import pytest
import torch

from optsys.losses import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    aggregate,
    aggregation_weights,
    cispo,
    gae,
    grpo_advantages,
    gspo,
    informative_groups,
    overlong_penalty,
    ppo_clip,
    reinforce_pp_advantages,
    reinforce_pp_token_advantages,
    rloo_advantages,
    sampler_correction,
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
    kl_coef = 0.05 if kl in ("k2", "k3") else 0.0  # k1: logged only (refused as a loss term)
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


def exact_kl_gradients(seed: int = 0, vocab: int = 7):
    """On a `vocab`-token distribution pi = softmax(theta) against a fixed ref: the exact expected gradient over
    theta of every estimator used as a loss term, E_{x ~ pi}[grad k(x)] = sum_x pi(x) grad k(x) (pi(x) held fixed:
    the sample is drawn, then the loss differentiated), of k1 used as a reward, E_pi[k1(x) grad log pi(x)] (the
    REINFORCE gradient of -E[reward]), and the exact gradients of KL(pi || ref) and KL(ref || pi). Float64."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(vocab, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64), 0)
    logp = torch.log_softmax(theta, 0)
    pi = logp.exp().detach()

    def grad(y):
        return torch.autograd.grad(y, theta, retain_graph=True)[0]

    exact = {"KL(pi||ref)": grad((logp.exp() * (logp - ref)).sum()),
             "KL(ref||pi)": grad((ref.exp() * (ref - logp)).sum())}
    table = {f"{k} in the loss": grad((pi * KL_ESTIMATORS[k](logp, ref)).sum()) for k in KL_ESTIMATORS}
    # through the loss the trainer calls: advantages 0, kl_coef 1, each token weighted by its probability
    for k in ("k2", "k3"):
        loss, _ = ppo_clip(logp, logp.detach(), torch.zeros(vocab, dtype=torch.float64),
                           torch.ones(vocab, dtype=torch.bool), ref_logp=ref, kl_coef=1.0, kl_estimator=k,
                           token_weights=pi)
        torch.testing.assert_close(grad(loss), table[f"{k} in the loss"], rtol=1e-12, atol=1e-14)
    table["k1 in the reward"] = grad((pi * KL_ESTIMATORS["k1"](logp, ref).detach() * logp).sum())
    return table, exact


@pytest.mark.parametrize("seed", [0, 1])
def test_kl_estimator_gradients(seed):
    """k1 as a loss term regularises nothing (expected gradient 0, exactly); k2 gives grad KL(pi||ref), k3 grad
    KL(ref||pi), k1 in the reward grad KL(pi||ref). So the losses refuse k1 with kl_coef > 0."""
    table, exact = exact_kl_gradients(seed)
    assert float(table["k1 in the loss"].abs().max()) < 1e-15
    torch.testing.assert_close(table["k2 in the loss"], exact["KL(pi||ref)"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(table["k3 in the loss"], exact["KL(ref||pi)"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(table["k1 in the reward"], exact["KL(pi||ref)"], rtol=1e-12, atol=1e-14)
    assert float((exact["KL(pi||ref)"] - exact["KL(ref||pi)"]).abs().max()) > 1e-2  # the two targets differ
    logp, old, ref, adv, mask, _ = _tokens(0)
    for loss in (ppo_clip, gspo, cispo):
        with pytest.raises(ValueError, match="zero expected gradient"):
            loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.1, kl_estimator="k1")
    loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.0, kl_estimator="k1")  # logged only: allowed


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
    assert set(POLICY_LOSSES) == {"ppo_clip", "gspo", "cispo"}
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
    # REINFORCE++ tokens: rewards [1, 0] on two 1-token sequences -> returns [1, 0], whitened to +-1/sqrt(2)
    tok = ADVANTAGE_ESTIMATORS["reinforce_pp_token"](torch.tensor([1.0, 0.0]), torch.ones(2), torch.tensor([0, 1]),
                                                     eps=0.0)
    assert tok.tolist() == pytest.approx([2**-0.5, -(2**-0.5)])
    assert set(ADVANTAGE_ESTIMATORS) == {*expect_adv, "gae", "reinforce_pp_token"}

    # ppo_clip with ratio 1 and advantage 1 everywhere: the token-mean surrogate is -1, nothing clipped.
    ones = torch.ones(2, 3, dtype=torch.float64)
    loss, metrics = POLICY_LOSSES["ppo_clip"](-ones, -ones, ones, ones)
    assert loss.item() == pytest.approx(-1.0) and metrics["clip_fraction"].item() == 0.0
    # gspo: the same per sequence (s_i = 1); cispo: -w A logp = -1 * 1 * (-1) = 1, nothing clipped
    loss, metrics = POLICY_LOSSES["gspo"](-ones, -ones, ones, ones)
    assert loss.item() == pytest.approx(-1.0) and metrics["clip_fraction"].item() == 0.0
    loss, metrics = POLICY_LOSSES["cispo"](-ones, -ones, ones, ones)
    assert loss.item() == pytest.approx(1.0) and metrics["clip_fraction"].item() == 0.0


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


# ---- packed batches: step-level weights, GSPO, CISPO, sampler correction, REINFORCE++ tokens, DAPO ----------

S = 7  # sequences in a packed batch; sequence 3 has no masked token


def _packed(seed, noise=0.6):
    """A packed [T] batch: each sequence a prompt (masked out) then a response with holes in its mask.
    Masked-out positions are poisoned (ratio e^25, huge advantages) so any leak shows."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    ids, mask = [], []
    for i in range(S):
        p, r = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(2, 9, (1,), generator=g))
        resp = torch.rand(r, generator=g) < 0.75
        resp[0] = i != 3
        if i == 3:
            resp[:] = False
        ids.append(torch.full((p + r,), i))
        mask.append(torch.cat([torch.zeros(p, dtype=torch.bool), resp]))
    seq_ids, mask = torch.cat(ids), torch.cat(mask)
    t = len(seq_ids)
    old = -3 * torch.rand(t, **f64)
    logp = old + noise * torch.randn(t, **f64)
    ref = old + 0.3 * torch.randn(t, **f64)
    adv = torch.randn(S, **f64)[seq_ids]
    old = torch.where(mask, old, logp - 25)
    adv = torch.where(mask, adv, torch.full_like(adv, 1e6))
    return logp.requires_grad_(), old, ref, adv, mask, seq_ids


def _seq_tokens(mask, seq_ids, i):
    """Positions of sequence i's masked tokens, in order."""
    return [t for t in range(len(mask)) if int(seq_ids[t]) == i and bool(mask[t])]


def _ref_agg_packed(x, mask, seq_ids, agg, max_len=None):
    """The three modes as loops over the sequences of a packed batch."""
    rows = [[x[t] for t in _seq_tokens(mask, seq_ids, i)] for i in range(S)]
    if agg == "token_mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if agg == "seq_mean_token_mean":
        means = [sum(r) / len(r) for r in rows if r]
        return sum(means) / len(means)
    return sum(sum(r) / max_len for r in rows if r) / S


def _ref_kl_packed(logp, ref, mask, seq_ids, agg, max_len=None):
    return _ref_agg_packed(_ref_kl(logp, ref, "k3"), mask, seq_ids, agg, max_len)


AGGS = ["token_mean", "seq_mean_token_mean", "seq_sum_norm"]


@pytest.mark.parametrize("agg", AGGS)
def test_aggregation_weights_reproduce_aggregate(agg):
    _, _, ref, _, mask, seq_ids = _packed(10)
    lengths = torch.tensor([len(_seq_tokens(mask, seq_ids, i)) for i in range(S)])
    assert lengths[3] == 0 and (lengths > 0).sum() == S - 1
    w = aggregation_weights(lengths, agg, max_len=16)
    weighted = sum(float(w[i]) * sum(float(ref[t]) for t in _seq_tokens(mask, seq_ids, i)) for i in range(S))
    assert weighted == pytest.approx(float(_ref_agg_packed(ref, mask, seq_ids, agg, 16)), rel=1e-12)
    # and the library's own aggregate agrees on the packed layout
    assert weighted == pytest.approx(float(aggregate(ref, mask, agg, seq_ids=seq_ids, max_len=16)), rel=1e-12)


def test_aggregation_weights_hand_values():
    lengths = torch.tensor([3, 0, 1])
    assert aggregation_weights(lengths, "token_mean").tolist() == pytest.approx([1 / 4] * 3)
    assert aggregation_weights(lengths, "seq_mean_token_mean").tolist() == pytest.approx([1 / 6, 0.0, 1 / 2])
    assert aggregation_weights(lengths, "seq_sum_norm", max_len=5).tolist() == pytest.approx([1 / 15] * 3)
    assert aggregation_weights(torch.zeros(2, dtype=torch.long), "seq_mean_token_mean").tolist() == [0.0, 0.0]


def _loss_kwargs(name):
    # clip ranges that the _packed noise crosses both ways (GSPO's paper values would clip every sequence here)
    return {"ppo_clip": dict(clip_eps=0.2, clip_eps_high=0.28), "gspo": dict(clip_eps=0.2, clip_eps_high=0.28),
            "cispo": dict(clip_eps_low=0.3, clip_eps_high=0.28)}[name]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("name", ["ppo_clip", "gspo", "cispo"])
def test_micro_batches_with_token_weights_sum_to_the_step_loss(name, agg):
    logp, old, ref, adv, mask, seq_ids = _packed(11)
    fn, kw = POLICY_LOSSES[name], dict(_loss_kwargs(name), kl_coef=0.1, max_len=16)
    full, _ = fn(logp, old, adv, mask, ref_logp=ref, seq_ids=seq_ids, num_seqs=S, agg=agg, **kw)
    lengths = torch.tensor([len(_seq_tokens(mask, seq_ids, i)) for i in range(S)])
    w = aggregation_weights(lengths, agg, max_len=16)
    total, plain = 0, []
    for first, last in [(0, 2), (3, 4), (5, 6)]:  # whole sequences; the middle one holds the empty sequence 3
        sel = (seq_ids >= first) & (seq_ids <= last)
        part = dict(ref_logp=ref[sel], seq_ids=seq_ids[sel] - first, num_seqs=last - first + 1, **kw)
        loss, _ = fn(logp[sel], old[sel], adv[sel], mask[sel], token_weights=w[seq_ids[sel]], agg=agg, **part)
        total = total + loss
        plain.append(fn(logp[sel], old[sel], adv[sel], mask[sel], agg=agg, **part)[0].detach())
    torch.testing.assert_close(total, full, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(total, logp)
    (g_full,) = torch.autograd.grad(full, logp)
    torch.testing.assert_close(g, g_full, rtol=1e-10, atol=1e-12)
    assert (g[~mask] == 0).all()
    if agg == "token_mean":  # the mean of per-micro-batch means is not the step's token mean
        assert abs(float(sum(plain) / 3 - full.detach())) > 1e-3


def _ref_gspo(logp, old, adv, mask, seq_ids, eps_lo, eps_hi):
    """GSPO eq. 5-7 at the sequence level: s_i = (prod_t r_t)^(1/|y_i|) with its gradient, mean over sequences.
    Returns (loss, fraction of sequences clipped)."""
    losses, clipped = [], 0
    for i in range(S):
        toks = _seq_tokens(mask, seq_ids, i)
        if not toks:
            continue
        s_i = torch.exp(sum(logp[t] - old[t] for t in toks) / len(toks))
        a = adv[toks[0]]
        unclipped, clip = -a * s_i, -a * torch.clamp(s_i, 1 - eps_lo, 1 + eps_hi)
        clipped += bool(clip > unclipped)
        losses.append(torch.maximum(unclipped, clip))
    return sum(losses) / len(losses), clipped / len(losses)


@pytest.mark.parametrize("kl", [False, True])
def test_gspo_matches_the_sequence_level_equation(kl):
    logp, old, ref, adv, mask, seq_ids = _packed(12, noise=0.3)
    loss, m = gspo(logp, old, adv, mask, seq_ids=seq_ids, clip_eps=0.05, clip_eps_high=0.08,
                   ref_logp=ref if kl else None, kl_coef=0.05 if kl else 0.0)
    pg, frac = _ref_gspo(logp, old, adv, mask, seq_ids, 0.05, 0.08)
    assert 0 < frac < 1  # both branches are exercised
    expected = pg + (0.05 * _ref_kl_packed(logp, ref, mask, seq_ids, "seq_mean_token_mean") if kl else 0)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(loss, logp)
    (g_ref,) = torch.autograd.grad(expected, logp)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
    assert float(m["clip_fraction"]) == pytest.approx(frac)
    torch.testing.assert_close(m["pg_loss"], pg.detach())
    # the paper's defaults (3e-4 / 4e-4): every sequence whose ratio moved against its advantage's side is clipped
    loss, m = gspo(logp, old, adv, mask, seq_ids=seq_ids)
    pg, frac_paper = _ref_gspo(logp, old, adv, mask, seq_ids, 3e-4, 4e-4)
    torch.testing.assert_close(loss, pg, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(pg, logp)[0])
    assert frac_paper > frac and float(m["clip_fraction"]) == pytest.approx(frac_paper)


def test_gspo_token_form_with_per_token_advantages():
    """GSPO-token (eq. 13-14) with advantages varying inside a sequence, token_mean agg: each token's value is
    max(-A_t s_i, -A_t clip(s_i)) and its gradient -A_t s_i / N d logp_t where the unclipped term is active."""
    logp, old, ref, _, mask, seq_ids = _packed(13, noise=0.3)
    adv = torch.randn(len(mask), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss, m = gspo(logp, old, adv, mask, seq_ids=seq_ids, agg="token_mean", clip_eps=0.1, clip_eps_high=0.15)
    n = int(mask.sum())
    value, grad = 0.0, torch.zeros(len(mask), dtype=torch.float64)
    for i in range(S):
        toks = _seq_tokens(mask, seq_ids, i)
        if not toks:
            continue
        s_i = math.exp(sum(float(logp[t].detach() - old[t]) for t in toks) / len(toks))
        for t in toks:
            a = float(adv[t])
            unclipped, clip = -a * s_i, -a * min(max(s_i, 0.9), 1.15)
            value += max(unclipped, clip) / n
            grad[t] = -a * s_i / n if unclipped >= clip else 0.0
    assert float(loss.detach()) == pytest.approx(value, rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, logp)[0], grad, rtol=1e-10, atol=1e-13)
    assert 0 < float(m["clip_fraction"]) <= 1


def _ref_cispo(logp, old, adv, mask, seq_ids, agg, eps_lo, eps_hi, max_len=16):
    """MiniMax-M1 eq. 4-5 token by token: the clipped weight as a plain float (stop-gradient)."""
    terms, clipped = [], 0
    for t in range(len(mask)):
        r = math.exp(float(logp[t].detach() - old[t]))
        w = min(r, 1 + eps_hi) if eps_lo is None else min(max(r, 1 - eps_lo), 1 + eps_hi)
        clipped += bool(mask[t]) and w != r
        terms.append(-w * adv[t] * logp[t])
    return _ref_agg_packed(terms, mask, seq_ids, agg, max_len), clipped / int(mask.sum())


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("eps_lo", [None, 0.2])
def test_cispo_matches_equation(agg, eps_lo):
    logp, old, ref, adv, mask, seq_ids = _packed(14)
    loss, m = cispo(logp, old, adv, mask, seq_ids=seq_ids, agg=agg, max_len=16, clip_eps_low=eps_lo,
                    ref_logp=ref, kl_coef=0.05)
    pg, frac = _ref_cispo(logp, old, adv, mask, seq_ids, agg, eps_lo, 0.28)
    expected = pg + 0.05 * _ref_kl_packed(logp, ref, mask, seq_ids, agg, 16)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(loss, logp)
    (g_ref,) = torch.autograd.grad(expected, logp)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
    assert 0 < frac < 1 and float(m["clip_fraction"]) == pytest.approx(frac)
    assert (g[~mask] == 0).all() and (g[mask] != 0).all()  # every token keeps a gradient, clipped or not


def test_cispo_hand_example():
    # ratios 0.5, 1, 2 with A = 1: weights 0.5, 1, 1.28 (no lower bound) or 0.8, 1, 1.28 (eps_low 0.2)
    old = torch.log(torch.tensor([0.2, 0.5, 0.25], dtype=torch.float64))
    logp = (old + torch.log(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))).requires_grad_()
    ones = torch.ones(3, dtype=torch.float64)
    for eps_lo, w, frac in [(None, [0.5, 1.0, 1.28], 1 / 3), (0.2, [0.8, 1.0, 1.28], 2 / 3)]:
        loss, m = cispo(logp[None], old[None], ones[None], ones[None], clip_eps_low=eps_lo)
        w = torch.tensor(w, dtype=torch.float64)
        assert float(loss.detach()) == pytest.approx(float(-(w * logp.detach()).mean()))
        torch.testing.assert_close(torch.autograd.grad(loss, logp)[0], -w / 3)
        assert float(m["clip_fraction"]) == pytest.approx(frac)


def _ref_is_loss(name, logp, old, adv, mask, seq_ids, w, agg):
    """The per-token policy term of each loss times the IS weight, by loops (KL left out: it is not weighted)."""
    terms = []
    seq_ratio = {}
    for i in range(S):
        toks = _seq_tokens(mask, seq_ids, i)
        if toks:
            seq_ratio[i] = math.exp(sum(float(logp[t].detach() - old[t]) for t in toks) / len(toks))
    for t in range(len(mask)):
        if not mask[t]:
            terms.append(None)
            continue
        a, r = adv[t], torch.exp(logp[t] - old[t])
        if name == "ppo_clip":
            term = torch.maximum(-a * r, -a * torch.clamp(r, 0.8, 1.28))
        elif name == "gspo":  # value s_i, gradient s_i d logp_t (GSPO-token)
            s = seq_ratio[int(seq_ids[t])] * torch.exp(logp[t] - logp[t].detach())
            term = torch.maximum(-a * s, -a * torch.clamp(s, 0.8, 1.28))
        else:
            term = -min(max(float(r.detach()), 0.7), 1.28) * a * logp[t]
        terms.append(float(w[t].detach()) * term)
    return _ref_agg_packed(terms, mask, seq_ids, agg, 16)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("name", ["ppo_clip", "gspo", "cispo"])
def test_is_weights_scale_only_the_policy_term(name, agg):
    logp, old, ref, adv, mask, seq_ids = _packed(15, noise=0.3)
    w = torch.rand(len(mask), generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    w.requires_grad_()  # the losses must detach it
    fn, kw = POLICY_LOSSES[name], dict(_loss_kwargs(name), seq_ids=seq_ids, agg=agg, max_len=16)
    loss, m = fn(logp, old, adv, mask, ref_logp=ref, kl_coef=0.05, is_weights=w, **kw)
    pg = _ref_is_loss(name, logp, old, adv, mask, seq_ids, w, agg)
    kl = _ref_kl_packed(logp, ref, mask, seq_ids, agg, 16)
    torch.testing.assert_close(loss, pg + 0.05 * kl, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m["kl"], kl.detach(), rtol=1e-10, atol=1e-12)
    g, g_w = torch.autograd.grad(loss, [logp, w], allow_unused=True)
    torch.testing.assert_close(g, torch.autograd.grad(pg + 0.05 * kl, logp)[0], rtol=1e-9, atol=1e-12)
    assert g_w is None
    unweighted, _ = fn(logp, old, adv, mask, ref_logp=ref, kl_coef=0.05, **kw)
    assert abs(float((unweighted - loss).detach())) > 1e-3


def _sampler_batch(seed):
    logp, old, _, _, mask, seq_ids = _packed(seed)
    g = torch.Generator().manual_seed(seed + 100)
    # per-token gaps ~ 0.4 nats plus a per-sequence offset: some tokens and sequences past cap 2 (log 2 = 0.69)
    offset = 0.7 * torch.randn(S, generator=g, dtype=torch.float64)[seq_ids]
    sampler = old + 0.4 * torch.randn(len(mask), generator=g, dtype=torch.float64) + offset
    return old.clone().requires_grad_(), sampler, mask, seq_ids


@pytest.mark.parametrize("mode", ["none", "tis", "mis_token", "mis_seq"])
def test_sampler_correction_matches_loops(mode):
    old, sampler, mask, seq_ids = _sampler_batch(16)
    cap = 2.0
    w, m = sampler_correction(old, sampler, mask, mode=mode, cap=cap, seq_ids=seq_ids)
    assert not w.requires_grad and w.shape == old.shape
    old = old.detach()
    want, affected = [1.0] * len(mask), 0
    seq_ratio = {}
    for i in range(S):
        toks = _seq_tokens(mask, seq_ids, i)
        if toks:
            seq_ratio[i] = math.exp(sum(float(old[t] - sampler[t]) for t in toks) / len(toks))
    for t in range(len(mask)):
        if not mask[t]:
            continue
        r = math.exp(float(old[t] - sampler[t]))
        if mode == "tis":
            want[t], affected = min(r, cap), affected + (r > cap)
        elif mode == "mis_token":
            keep = 1 / cap <= r <= cap
            want[t], affected = (r if keep else 0.0), affected + (not keep)
        elif mode == "mis_seq":
            q = seq_ratio[int(seq_ids[t])]
            keep = 1 / cap <= q <= cap
            want[t], affected = (q if keep else 0.0), affected + (not keep)
    assert w.tolist() == pytest.approx(want, rel=1e-12)
    n = int(mask.sum())
    gaps = [abs(float(sampler[t] - old[t])) for t in range(len(mask)) if mask[t]]
    assert float(m["logp_gap_mean"]) == pytest.approx(sum(gaps) / n, rel=1e-6)
    assert float(m["logp_gap_max"]) == pytest.approx(max(gaps), rel=1e-6)
    key = {"tis": "is_truncated_fraction", "mis_token": "is_masked_fraction", "mis_seq": "is_masked_fraction"}
    if mode in key:
        assert 0 < affected < n  # the batch exercises both sides of the cap
        assert float(m[key[mode]]) == pytest.approx(affected / n)
    else:
        assert set(m) == {"logp_gap_mean", "logp_gap_max"}


def test_sampler_correction_hand_values():
    # token ratios 0.5, 1 | 3, 1.5 | 0.2, 0.5 (old - sampler = log of them); sequences [0, 0, 1, 1, 2, 2]; cap 2
    ratio = torch.tensor([0.5, 1.0, 3.0, 1.5, 0.2, 0.5], dtype=torch.float64)
    sampler = torch.zeros(6, dtype=torch.float64)  # so old - sampler is log(ratio) exactly (0.5 = 1 / cap is kept)
    old, mask, ids = sampler + torch.log(ratio), torch.ones(6, dtype=torch.bool), torch.tensor([0, 0, 1, 1, 2, 2])
    w, m = sampler_correction(old, sampler, mask, mode="tis", cap=2.0)
    assert w.tolist() == pytest.approx([0.5, 1.0, 2.0, 1.5, 0.2, 0.5])
    assert float(m["is_truncated_fraction"]) == pytest.approx(1 / 6)
    # mis_token drops both sides of [1 / cap, cap], as mis_seq: 3 > 2 and 0.2 < 1/2 (0.5 itself is kept)
    w, m = sampler_correction(old, sampler, mask, mode="mis_token", cap=2.0)
    assert w.tolist() == pytest.approx([0.5, 1.0, 0.0, 1.5, 0.0, 0.5])
    assert float(m["is_masked_fraction"]) == pytest.approx(2 / 6)
    # geometric means: sqrt(0.5) = 0.71 (kept), sqrt(4.5) = 2.12 > 2 and sqrt(0.1) = 0.32 < 1/2 (dropped)
    w, m = sampler_correction(old, sampler, mask, mode="mis_seq", cap=2.0, seq_ids=ids)
    assert w.tolist() == pytest.approx([math.sqrt(0.5)] * 2 + [0.0] * 4)
    assert float(m["is_masked_fraction"]) == pytest.approx(4 / 6)
    assert float(m["logp_gap_max"]) == pytest.approx(math.log(5))  # |log 0.2|
    # padded [B, L]: a row per sequence, no seq_ids needed; the masked-out 3 does not count and gets weight 1
    w, m = sampler_correction(old[:4].reshape(2, 2), sampler[:4].reshape(2, 2), torch.tensor([[1, 1], [0, 1]]),
                              mode="mis_seq", cap=2.0)
    assert w.reshape(-1).tolist() == pytest.approx([math.sqrt(0.5)] * 2 + [1.0, 1.5])
    assert float(m["is_masked_fraction"]) == 0.0


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_token_advantages_match_loops(gamma):
    logp, old, ref, _, mask, seq_ids = _packed(17)
    rewards = torch.randn(S, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kl = (old - ref).detach()
    adv = reinforce_pp_token_advantages(rewards, mask, seq_ids, kl=kl, kl_coef=0.1, gamma=gamma)
    returns = {}
    for i in range(S):
        toks = _seq_tokens(mask, seq_ids, i)
        r = [-0.1 * float(kl[t]) + (float(rewards[i]) if j == len(toks) - 1 else 0.0) for j, t in enumerate(toks)]
        for j, t in enumerate(toks):
            returns[t] = sum(gamma ** (k - j) * r[k] for k in range(j, len(toks)))
    vals = list(returns.values())
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    want = [(returns[t] - mean) / (std + 1e-6) if t in returns else 0.0 for t in range(len(mask))]
    assert adv.tolist() == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert ADVANTAGE_ESTIMATORS["reinforce_pp_token"] is reinforce_pp_token_advantages


def test_reinforce_pp_token_advantages_hand_example():
    # seq 0: 2 tokens, reward 1; seq 1: a masked-out token between its 2 tokens, reward 0. gamma 1, no KL:
    # returns [1, 1, 0, -, 0]: mean 1/2, unbiased std sqrt(1/3)
    mask = torch.tensor([1, 1, 1, 0, 1], dtype=torch.bool)
    adv = reinforce_pp_token_advantages(torch.tensor([1.0, 0.0]), mask, torch.tensor([0, 0, 1, 1, 1]), eps=0.0)
    z = 0.5 / math.sqrt(1 / 3)
    assert adv.tolist() == pytest.approx([z, z, -z, 0.0, -z], rel=1e-6)
    # gamma 0.5 with a KL of 1 per token (kl_coef 0.2): seq 0 rewards [-0.2, 0.8] -> returns [0.2, 0.8]
    adv = reinforce_pp_token_advantages(torch.tensor([1.0, 0.0]), torch.ones(2, dtype=torch.bool),
                                        torch.tensor([0, 0]), kl=torch.ones(2), kl_coef=0.2, gamma=0.5, eps=0.0)
    s = math.sqrt(0.18)  # unbiased std of [0.2, 0.8]
    assert adv.tolist() == pytest.approx([-0.3 / s, 0.3 / s], rel=1e-6)


def test_overlong_penalty_eq13():
    lengths = torch.tensor([0, 12, 13, 16, 20, 21, 100])
    pen = overlong_penalty(lengths, max_len=20, buffer=8)  # soft limit 12
    assert pen.tolist() == pytest.approx([0.0, 0.0, -1 / 8, -0.5, -1.0, -1.0, -1.0])
    rand = torch.randint(0, 40, (37,), generator=torch.Generator().manual_seed(3))
    for n, p in zip(rand.tolist(), overlong_penalty(rand, max_len=30, buffer=7).tolist()):
        want = 0.0 if n <= 23 else ((23 - n) / 7 if n <= 30 else -1.0)
        assert p == pytest.approx(want), n


def test_informative_groups():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.5, 0.5 + 1e-9, 0.5], [1.0, 1.001, 1.0]],
                           dtype=torch.float64)
    assert informative_groups(rewards).tolist() == [False, True, False, True]
    assert informative_groups(rewards, atol=0.0).tolist() == [False, True, True, True]
    assert informative_groups(torch.ones(2, 1)).tolist() == [False, False]  # one sample: nothing to compare


def test_bad_input_new_functions():
    logp, old, ref, adv, mask, seq_ids = _packed(18)
    logp = logp.detach()
    with pytest.raises(ValueError, match="agg"):
        aggregation_weights(torch.tensor([1, 2]), "sum")
    with pytest.raises(ValueError, match="max_len"):
        aggregation_weights(torch.tensor([1, 2]), "seq_sum_norm")
    with pytest.raises(ValueError, match="lengths"):
        aggregation_weights(torch.tensor([1, -2]), "token_mean")
    with pytest.raises(ValueError, match="lengths"):
        aggregation_weights(torch.ones(2, 2), "token_mean")
    with pytest.raises(ValueError, match="token_weights"):
        ppo_clip(logp, old, adv, mask, token_weights=torch.ones(3))
    with pytest.raises(ValueError, match="is_weights"):
        cispo(logp, old, adv, mask, is_weights=torch.ones(3))
    with pytest.raises(ValueError, match="seq_ids"):
        gspo(logp, old, adv, mask)  # packed: the sequence ratio needs seq_ids
    with pytest.raises(ValueError, match="seq_ids"):
        gspo(logp, old, adv, mask, seq_ids=seq_ids, num_seqs=3)
    with pytest.raises(ValueError, match="clip_eps"):
        gspo(logp, old, adv, mask, seq_ids=seq_ids, clip_eps=0.0)
    with pytest.raises(ValueError, match="clip_eps_high"):
        cispo(logp, old, adv, mask, clip_eps_high=-1.0)
    with pytest.raises(ValueError, match="clip_eps_low"):
        cispo(logp, old, adv, mask, clip_eps_low=0.0)
    with pytest.raises(ValueError, match="ref_logp"):
        cispo(logp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="mode"):
        sampler_correction(old, ref, mask, mode="is", cap=2.0)
    with pytest.raises(ValueError, match="cap"):
        sampler_correction(old, ref, mask, mode="tis", cap=0.5)
    with pytest.raises(ValueError, match="sampler_logp"):
        sampler_correction(old, ref[:-1], mask, mode="tis", cap=2.0)
    with pytest.raises(ValueError, match="seq_ids"):
        sampler_correction(old, ref, mask, mode="mis_seq", cap=2.0)
    rewards = torch.zeros(S, dtype=torch.float64)
    with pytest.raises(ValueError, match="rewards"):
        reinforce_pp_token_advantages(rewards[None], mask, seq_ids)
    with pytest.raises(ValueError, match="seq_ids"):
        reinforce_pp_token_advantages(rewards[:3], mask, seq_ids)
    with pytest.raises(ValueError, match="kl"):
        reinforce_pp_token_advantages(rewards, mask, seq_ids, kl_coef=0.1)
    with pytest.raises(ValueError, match="gamma"):
        reinforce_pp_token_advantages(rewards, mask, seq_ids, gamma=1.5)
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(torch.tensor([3]), max_len=10, buffer=20)
    with pytest.raises(ValueError, match="lengths"):
        overlong_penalty(torch.tensor([-3]), max_len=10, buffer=2)
    with pytest.raises(ValueError, match="finite"):
        informative_groups(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="rewards"):
        informative_groups(torch.ones(3))
