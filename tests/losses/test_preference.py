"""Preference losses vs their papers' equations, written out independently here in fp64."""

import pytest
import torch

from optsys.losses import PREFERENCE_LOSSES, chosen_nll, cpo, dpo, ipo, kto, orpo, robust, simpo

B = 7  # odd


def _sig(x):
    return 1 / (1 + torch.exp(-x))


def _logsig(x):
    return torch.log(_sig(x))


def _inputs(seed, average=False, b=B):
    """Policy and reference log-probs: sums in [-60, -5], or means in [-3, -0.05]."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-3.0, -0.05) if average else (-60.0, -5.0)
    return [(lo + (hi - lo) * torch.rand(b, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(4)]


# Each reference is the paper's equation, term by term (see the loss docstrings for the numbers).
def ref_dpo(pw, pl, rw, rl, beta=0.1, label_smoothing=0.0):
    h = torch.log(torch.exp(pw) / torch.exp(rw)) - torch.log(torch.exp(pl) / torch.exp(rl))
    e = label_smoothing
    return -(1 - e) * _logsig(beta * h) - e * _logsig(-beta * h)


def ref_robust(pw, pl, rw, rl, beta=0.1, label_smoothing=0.0):
    h = (pw - rw) - (pl - rl)
    e = label_smoothing
    return ((1 - e) * -_logsig(beta * h) - e * -_logsig(-beta * h)) / (1 - 2 * e)


def ref_ipo(pw, pl, rw, rl, beta=0.1):
    h = (pw + rl) - (pl + rw)  # log(pi(y_w) ref(y_l) / (pi(y_l) ref(y_w)))
    return (h - 1 / (2 * beta)) ** 2


def ref_simpo_from_sums(sum_w, sum_l, len_w, len_l, beta, gamma):
    return -_logsig(beta / len_w * sum_w - beta / len_l * sum_l - gamma)


def ref_orpo(mw, ml, lam=0.1):
    pw, pl = torch.exp(mw), torch.exp(ml)
    odds_ratio = (pw / (1 - pw)) / (pl / (1 - pl))
    return -mw + lam * -_logsig(torch.log(odds_ratio))


def ref_cpo(pw, pl, beta=0.1, alpha=1.0):
    return -_logsig(beta * pw - beta * pl) + alpha * -pw


def ref_kto(pol, ref, kl_pol, kl_ref, labels, beta, lam_d, lam_u):
    z0 = max(0.0, float((kl_pol - kl_ref).detach().mean()))
    out = []
    for i in range(pol.shape[0]):
        r = pol[i] - ref[i]
        v = lam_d * _sig(beta * (r - z0)) if labels[i] else lam_u * _sig(beta * (z0 - r))
        out.append((lam_d if labels[i] else lam_u) - v)
    return torch.stack(out)


PAIRED_CASES = [  # (registry name, hyperparameters, the equation)
    ("dpo", dict(beta=0.1), lambda pw, pl, rw, rl: ref_dpo(pw, pl, rw, rl, 0.1)),
    ("dpo", dict(beta=0.3, label_smoothing=0.2), lambda pw, pl, rw, rl: ref_dpo(pw, pl, rw, rl, 0.3, 0.2)),
    ("robust", dict(beta=0.2, label_smoothing=0.1), lambda pw, pl, rw, rl: ref_robust(pw, pl, rw, rl, 0.2, 0.1)),
    ("ipo", dict(beta=0.5), lambda pw, pl, rw, rl: ref_ipo(pw, pl, rw, rl, 0.5)),
    ("simpo", dict(beta=2.5, gamma=1.4), lambda pw, pl, rw, rl: -_logsig(2.5 * pw - 2.5 * pl - 1.4)),
    ("orpo", dict(lam=0.25), lambda pw, pl, rw, rl: ref_orpo(pw, pl, 0.25)),
    ("cpo", dict(beta=0.1, alpha=0.7), lambda pw, pl, rw, rl: ref_cpo(pw, pl, 0.1, 0.7)),
]


@pytest.mark.parametrize("case", range(len(PAIRED_CASES)), ids=[f"{c[0]}-{i}" for i, c in enumerate(PAIRED_CASES)])
def test_paired_loss_and_grad_match_equation(case):
    name, hyper, reference = PAIRED_CASES[case]
    spec = PREFERENCE_LOSSES[name]
    pw, pl, rw, rl = _inputs(100 + case, average=spec.average_logps)
    refs = (rw, rl) if spec.needs_reference else (None, None)
    loss, metrics = spec(pw, pl, *refs, **hyper)
    expected = reference(pw, pl, rw, rl)
    assert loss.shape == (B,) and loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    w = torch.linspace(0.5, 1.5, B, dtype=torch.float64)  # distinct per-pair weights in the backward
    got = torch.autograd.grad((loss * w).sum(), [pw, pl])
    want = torch.autograd.grad((expected * w).sum(), [pw, pl])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for key in ("rewards_chosen", "rewards_rejected", "margin", "reward_accuracy"):
        assert metrics[key].shape == (B,) and not metrics[key].requires_grad


def test_dpo_metrics_are_beta_times_logratio():
    pw, pl, rw, rl = _inputs(5)
    _, m = dpo(pw, pl, rw, rl, beta=0.2)
    torch.testing.assert_close(m["rewards_chosen"], 0.2 * (pw - rw).detach())
    torch.testing.assert_close(m["rewards_rejected"], 0.2 * (pl - rl).detach())
    torch.testing.assert_close(m["margin"], m["rewards_chosen"] - m["rewards_rejected"])
    assert m["reward_accuracy"].tolist() == ((pw - rw) > (pl - rl)).double().tolist()


def test_label_smoothing():
    pw, pl, rw, rl = _inputs(6)
    plain, _ = dpo(pw, pl, rw, rl, beta=0.1)
    # cDPO at eps: a mixture of the loss and the flipped-label loss
    flipped, _ = dpo(pl, pw, rl, rw, beta=0.1)
    smoothed, _ = dpo(pw, pl, rw, rl, beta=0.1, label_smoothing=0.3)
    torch.testing.assert_close(smoothed, 0.7 * plain + 0.3 * flipped)
    # robust: unbiased combination; equals DPO at eps = 0
    torch.testing.assert_close(robust(pw, pl, rw, rl, beta=0.1)[0], plain)
    rob, _ = robust(pw, pl, rw, rl, beta=0.1, label_smoothing=0.3)
    torch.testing.assert_close(rob, (0.7 * plain - 0.3 * flipped) / 0.4)


def test_simpo_length_normalization():
    """simpo on mean log-probs is the paper's eq. 6 written with sums and lengths."""
    sum_w, sum_l, _, _ = _inputs(7)
    len_w = torch.tensor([3, 10, 41, 7, 1, 99, 12], dtype=torch.float64)
    len_l = torch.tensor([20, 5, 13, 7, 64, 2, 31], dtype=torch.float64)
    loss, m = simpo(sum_w / len_w, sum_l / len_l, beta=2.0, gamma=0.8)
    expected = ref_simpo_from_sums(sum_w, sum_l, len_w, len_l, 2.0, 0.8)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m["rewards_chosen"], (2.0 * sum_w / len_w).detach())
    # same per-token quality at any length -> same loss
    a, _ = simpo(torch.tensor([-1.0]), torch.tensor([-2.0]))
    b, _ = simpo(torch.tensor([-100.0 / 100]), torch.tensor([-6.0 / 3]))
    torch.testing.assert_close(a, b)


def test_orpo_log_odds_stable_near_zero_and_far_below():
    """log1p(-exp(x)) cancels near 0 in fp32; the fp32 loss matches the fp64 equation there."""
    mw = torch.tensor([-1e-4, -3e-3, -0.5, -30.0], dtype=torch.float64)
    ml = torch.tensor([-2e-4, -80.0, -1e-5, -0.1], dtype=torch.float64)
    x32w, x32l = mw.float().requires_grad_(), ml.float().requires_grad_()
    loss, _ = orpo(x32w, x32l, lam=1.0)
    torch.testing.assert_close(loss.double(), ref_orpo(mw, ml, 1.0), rtol=1e-5, atol=1e-6)
    gw, gl = torch.autograd.grad(loss.sum(), [x32w, x32l])
    assert torch.isfinite(gw).all() and torch.isfinite(gl).all()
    # p = 1 exactly: infinite odds, clamped to finite loss and gradient
    z = torch.zeros(1, requires_grad=True)
    loss0, _ = orpo(z, torch.tensor([-1.0]), lam=1.0)
    assert torch.isfinite(loss0).all() and torch.isfinite(torch.autograd.grad(loss0.sum(), z)[0]).all()


def test_cpo_nll_per_token():
    pw, pl, _, _ = _inputs(8)
    n = torch.arange(1, B + 1, dtype=torch.float64)
    loss, m = cpo(pw, pl, beta=0.1, chosen_num_tokens=n)
    torch.testing.assert_close(loss, -_logsig(0.1 * (pw - pl)) - pw / n)
    torch.testing.assert_close(m["nll"], (-pw / n).detach())


def test_chosen_nll_is_the_token_mean_over_the_batch_and_splits_over_micro_batches():
    """RPO's term: mean -log p over every chosen token of the batch (not a mean of per-sequence means); micro-batch
    parts given the whole batch's token count add up to it, gradient included."""
    g = torch.Generator().manual_seed(12)
    lengths = [3, 1, 17, 8, 5]
    per_token = [(-4 * torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_() for n in lengths]
    want = -torch.cat(per_token).mean()
    per_sequence_mean = -torch.stack([t.detach().mean() for t in per_token]).mean()
    assert abs(float(want) - float(per_sequence_mean)) > 1e-3  # a different normalization would be seen
    sums = torch.stack([t.sum() for t in per_token])
    torch.testing.assert_close(chosen_nll(sums, sum(lengths)), want, rtol=1e-12, atol=1e-12)
    parts = chosen_nll(sums[:2], sum(lengths)) + chosen_nll(sums[2:], sum(lengths))
    torch.testing.assert_close(parts, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(parts, per_token), torch.autograd.grad(want, per_token)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="num_tokens must be > 0"):
        chosen_nll(sums, 0)
    with pytest.raises(ValueError, match="chosen_logp_sums must be 1-D"):
        chosen_nll(sums[None], 5)


def _kto_inputs(seed, kl_shift):
    g = torch.Generator().manual_seed(seed)
    pol = (-40 + 30 * torch.rand(B, generator=g, dtype=torch.float64)).requires_grad_()
    ref = -40 + 30 * torch.rand(B, generator=g, dtype=torch.float64)
    kl_ref = -40 + 30 * torch.rand(5, generator=g, dtype=torch.float64)
    kl_pol = (kl_ref + kl_shift + torch.randn(5, generator=g, dtype=torch.float64)).requires_grad_()
    labels = torch.tensor([True, False, True, True, False, False, True])
    return pol, ref, kl_pol, kl_ref, labels


@pytest.mark.parametrize("kl_shift", [2.0, -3.0], ids=["kl_positive", "kl_clamped"])
def test_kto_matches_equation_and_kl_baseline_is_detached(kl_shift):
    pol, ref, kl_pol, kl_ref, labels = _kto_inputs(9, kl_shift)
    loss, m = kto(pol, ref, kl_pol, kl_ref, labels, beta=0.3, desirable_weight=1.0, undesirable_weight=1.5)
    expected = ref_kto(pol, ref, kl_pol, kl_ref, labels, 0.3, 1.0, 1.5)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    z0 = max(0.0, float((kl_pol - kl_ref).detach().mean()))
    assert float(m["kl"]) == pytest.approx(z0, abs=1e-12)
    if kl_shift < 0:
        assert float(m["kl"]) == 0.0  # clamped at 0
    (g_pol,) = torch.autograd.grad(loss.sum(), [pol], retain_graph=True)
    (g_ref,) = torch.autograd.grad(expected.sum(), [pol])
    torch.testing.assert_close(g_pol, g_ref, rtol=1e-9, atol=1e-12)
    (g_kl,) = torch.autograd.grad(loss.sum(), [kl_pol], allow_unused=True)
    assert g_kl is None or (g_kl == 0).all()  # the KL baseline carries no gradient
    torch.testing.assert_close(m["rewards"], 0.3 * (pol - ref).detach())
    assert m["rewards_chosen"].shape == (4,) and m["rewards_rejected"].shape == (3,)


def test_registry():
    assert set(PREFERENCE_LOSSES) == {"dpo", "robust", "ipo", "simpo", "orpo", "cpo", "kto"}
    assert {n for n, s in PREFERENCE_LOSSES.items() if s.average_logps} == {"ipo", "simpo", "orpo"}
    assert {n for n, s in PREFERENCE_LOSSES.items() if not s.needs_reference} == {"simpo", "orpo", "cpo"}
    assert not PREFERENCE_LOSSES["kto"].paired


def test_bad_input():
    pw, pl, rw, rl = (t.detach() for t in _inputs(10))
    with pytest.raises(ValueError, match="rejected_logps"):
        dpo(pw, pl[:-1], rw, rl)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo(pw, pl, rw, rl[:3])
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo(pw, pl, None, rl)
    with pytest.raises(ValueError, match="chosen_logps"):
        ipo(pw[None], pl[None], rw[None], rl[None])
    with pytest.raises(ValueError, match="beta"):
        dpo(pw, pl, rw, rl, beta=-0.1)
    with pytest.raises(ValueError, match="beta"):
        simpo(pw, pl, beta=0.0)
    with pytest.raises(ValueError, match="lam"):
        orpo(pw, pl, lam=-1.0)
    for eps in (0.5, -0.1, 0.7):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo(pw, pl, rw, rl, label_smoothing=eps)
        with pytest.raises(ValueError, match="label_smoothing"):
            robust(pw, pl, rw, rl, label_smoothing=eps)
    with pytest.raises(ValueError, match="reference-free"):
        simpo(pw, pl, rw, rl)
    with pytest.raises(ValueError, match="labels"):
        kto(pw, rw, pl, rl, torch.tensor([1, 0, 1, 1, 0, 0, 1]))
    with pytest.raises(ValueError, match="labels"):
        kto(pw, rw, pl, rl, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="kl_ref_logps"):
        kto(pw, rw, pl, rl[:2], torch.ones(B, dtype=torch.bool))


@pytest.mark.parametrize("kl_shift", [2.0, -3.0], ids=["kl_positive", "kl_clamped"])
def test_kto_with_a_given_z0_equals_the_batch_estimate(kl_shift):
    """z0 estimated elsewhere (the trainer's, over a step and ranks) enters exactly like the batch's own estimate:
    clamped at 0, detached."""
    pol, ref, kl_pol, kl_ref, labels = _kto_inputs(11, kl_shift)
    want, m_want = kto(pol, ref, kl_pol, kl_ref, labels, beta=0.3, undesirable_weight=1.5)
    mean = (kl_pol - kl_ref).mean()  # carries a gradient: the loss must not pass it on
    got, m = kto(pol, ref, None, None, labels, beta=0.3, undesirable_weight=1.5, z0=mean)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert float(m["kl"]) == float(m_want["kl"]) == max(0.0, float(mean))
    (g_kl,) = torch.autograd.grad(got.sum(), [kl_pol], allow_unused=True)
    assert g_kl is None or (g_kl == 0).all()
    got_float, _ = kto(pol, ref, None, None, labels, beta=0.3, undesirable_weight=1.5, z0=float(mean))
    torch.testing.assert_close(got_float, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="either kl_policy_logps and kl_ref_logps or z0"):
        kto(pol, ref, kl_pol, kl_ref, labels, z0=0.5)
