"""Our preference losses vs TRL's own code on the same inputs (TRL 1.16, a dev dependency).

TRL 1.x computes DPO and KTO inside `Trainer._compute_loss(model, inputs)`, straight from the model's
per-token log-probs. We call that method unbound, with a stand-in `self` holding the config attributes
it reads and a stand-in model that returns per-token log-probs we choose (a leaf tensor), so TRL's
real loss code runs and we can compare both the loss and its gradient w.r.t. the log-probs.
CPO/SimPO and ORPO (trl.experimental) still expose their loss as a method of sequence log-probs.

Intended differences from TRL (not tested here; see optsys/losses/preference.py): ORPO's and CPO's NLL
term is a per-sequence token mean in optsys and a batch token mean in TRL; KTO's KL baseline is
estimated per micro-batch in optsys; cDPO (DPO with label_smoothing > 0) is ours only: TRL 1.16's
"sigmoid" loss ignores label_smoothing (its "robust" loss uses it, and is compared below).
"""

import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from optsys.losses import PREFERENCE_LOSSES, chosen_nll, cpo, kto, orpo, simpo

trl = pytest.importorskip("trl", reason="TRL parity needs trl (in the dev extra)")

B, L = 7, 10  # pairs, padded sequence length


def _accelerator():
    same = lambda x: x  # noqa: E731 - one process: gathers are identities
    return SimpleNamespace(device=torch.device("cpu"), gather=same, gather_for_metrics=same, unwrap_model=same)


class _FakeLM:
    """Stands in for TRL's model call `model(**kw, labels=..., fused_lm_head=True)`: returns fixed per-token
    log-probs (for the main batch, or the KL batch when called with KTO's KL_input_ids)."""

    training = True

    def __init__(self, by_input_ids: dict[int, torch.Tensor]):
        self.by_input_ids = by_input_ids

    def __call__(self, input_ids, **_):
        lp = self.by_input_ids[id(input_ids)]
        zeros = torch.zeros_like(lp.detach())
        return SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _completions(n: int, seed: int):
    """Right-aligned completion masks [n, L] with 1..L-1 completion tokens, and per-token log-probs on the
    shifted positions (zero elsewhere, as TRL's fused head returns for label -100), a leaf tensor."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L, (n,), generator=g)
    mask = (torch.arange(L) >= L - lengths[:, None]).long()
    per_token = (-3 * torch.rand(n, L - 1, generator=g, dtype=torch.float64)) * mask[:, 1:]
    return mask, per_token.requires_grad_(), lengths.double()


def _self(model, **attrs):
    return SimpleNamespace(model=model, accelerator=_accelerator(), aux_loss_enabled=False, precompute_ref_logps=True,
                           _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
                           _tp_size=1, **attrs)


@pytest.mark.parametrize("loss_type,name,eps", [("sigmoid", "dpo", 0.0), ("robust", "robust", 0.0),
                                                ("robust", "robust", 0.2), ("ipo", "ipo", 0.0)])
def test_dpo_family_matches_trl_loss_and_gradient(loss_type, name, eps):
    mask, per_token, lengths = _completions(2 * B, seed=zlib.crc32(f"{loss_type}-{eps}".encode()) % 1000)
    g = torch.Generator().manual_seed(1)
    ref = -30 * torch.rand(2 * B, generator=g, dtype=torch.float64)
    beta = 0.1
    inputs = {"input_ids": torch.zeros(2 * B, L, dtype=torch.long), "attention_mask": torch.ones(2 * B, L),
              "completion_mask": mask, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    fake = _self(_FakeLM({id(inputs["input_ids"]): per_token}), ld_alpha=None, f_divergence_type="reverse_kl",
                 loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=eps, use_weighting=False)
    trl_loss = trl.DPOTrainer._compute_loss(fake, fake.model, inputs, return_outputs=False)
    (trl_grad,) = torch.autograd.grad(trl_loss, per_token)

    ours_in = per_token.detach().clone().requires_grad_()
    logps = ours_in.sum(1)
    spec = PREFERENCE_LOSSES[name]
    if spec.average_logps:  # IPO: TRL divides the log-ratios by the completion length; so do we (length-averaged)
        logps, ref = logps / lengths, ref / lengths
    hyper = {"beta": beta} if name == "ipo" else {"beta": beta, "label_smoothing": eps}
    ours, metrics = spec(logps[:B], logps[B:], ref[:B], ref[B:], **hyper)
    ours = ours.mean()
    (our_grad,) = torch.autograd.grad(ours, ours_in)
    torch.testing.assert_close(ours, trl_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(our_grad, trl_grad, rtol=1e-10, atol=1e-12)
    if name != "ipo":  # TRL logs beta * summed log-ratio as the reward for every loss type
        assert float(metrics["rewards_chosen"].mean()) == pytest.approx(fake._metrics["train"]["rewards/chosen"][0])
        assert float(metrics["reward_accuracy"].mean()) == pytest.approx(
            fake._metrics["train"]["rewards/accuracies"][0])


@pytest.mark.parametrize("loss_type,name,eps", [("sigmoid", "dpo", 0.0), ("robust", "robust", 0.1),
                                                ("ipo", "ipo", 0.0)])
def test_rpo_alpha_matches_trl_sft_term(loss_type, name, eps):
    """pref.rpo_alpha = TRL 1.16's loss_type=[<loss>, "sft"] with loss_weights=[1, alpha] (the old rpo_alpha):
    ours is the preference mean + alpha * chosen_nll(summed chosen log-probs, the batch's chosen tokens)."""
    alpha = 0.7
    mask, per_token, lengths = _completions(2 * B, seed=zlib.crc32(f"rpo-{loss_type}".encode()) % 1000)
    ref = -30 * torch.rand(2 * B, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    inputs = {"input_ids": torch.zeros(2 * B, L, dtype=torch.long), "attention_mask": torch.ones(2 * B, L),
              "completion_mask": mask, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    fake = _self(_FakeLM({id(inputs["input_ids"]): per_token}), ld_alpha=None, f_divergence_type="reverse_kl",
                 loss_types=[loss_type, "sft"], loss_weights=[1.0, alpha], beta=0.1, label_smoothing=eps,
                 use_weighting=False)
    trl_loss = trl.DPOTrainer._compute_loss(fake, fake.model, inputs, return_outputs=False)
    (trl_grad,) = torch.autograd.grad(trl_loss, per_token)

    ours_in = per_token.detach().clone().requires_grad_()
    sums = ours_in.sum(1)
    spec = PREFERENCE_LOSSES[name]
    logps, ref_in = (sums / lengths, ref / lengths) if spec.average_logps else (sums, ref)
    hyper = {"beta": 0.1} if name == "ipo" else {"beta": 0.1, "label_smoothing": eps}
    pref, _ = spec(logps[:B], logps[B:], ref_in[:B], ref_in[B:], **hyper)
    ours = pref.mean() + alpha * chosen_nll(sums[:B], int(lengths[:B].sum()))
    (our_grad,) = torch.autograd.grad(ours, ours_in)
    torch.testing.assert_close(ours, trl_loss, rtol=1e-10, atol=1e-12)
    # on the completion tokens (TRL's "sft" term sends no gradient to the zeros outside them; our sums would)
    on = mask[:, 1:].bool()
    torch.testing.assert_close(our_grad[on], trl_grad[on], rtol=1e-10, atol=1e-12)
    assert abs(float(trl_loss - pref.mean())) > 0.1  # the NLL term is a real part of what matched


@pytest.mark.parametrize("kl_shift", [2.0, -3.0], ids=["kl_positive", "kl_clamped"])
def test_kto_matches_trl_loss_and_gradient(kl_shift):
    labels = torch.tensor([True, False, True, True, False, False, True])
    mask, per_token, _ = _completions(B, seed=5)
    kl_mask, kl_per_token, _ = _completions(B, seed=6)
    g = torch.Generator().manual_seed(2)
    ref = -15 * torch.rand(B, generator=g, dtype=torch.float64)
    # shift the KL partners' reference so the KL estimate is positive or clamped to 0
    ref_kl = kl_per_token.detach().sum(1) - kl_shift + 0.1 * torch.randn(B, generator=g, dtype=torch.float64)
    inputs = {"input_ids": torch.zeros(B, L, dtype=torch.long), "attention_mask": torch.ones(B, L),
              "completion_mask": mask, "KL_input_ids": torch.ones(B, L, dtype=torch.long),
              "KL_attention_mask": torch.ones(B, L), "KL_completion_mask": kl_mask, "label": labels,
              "ref_logps": ref, "ref_KL_logps": ref_kl}
    model = _FakeLM({id(inputs["input_ids"]): per_token, id(inputs["KL_input_ids"]): kl_per_token})
    fake = _self(model, calculate_KL=True, loss_type="kto", beta=0.3, desirable_weight=1.0, undesirable_weight=1.5)
    fake._compute_kl_logps = lambda m, batch: trl.KTOTrainer._compute_kl_logps(fake, m, batch)
    trl_loss = trl.KTOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
    (trl_grad,) = torch.autograd.grad(trl_loss, per_token)

    ours_in = per_token.detach().clone().requires_grad_()
    ours, m = kto(ours_in.sum(1), ref, kl_per_token.detach().sum(1), ref_kl, labels, beta=0.3,
                  desirable_weight=1.0, undesirable_weight=1.5)
    ours = ours.mean()
    (our_grad,) = torch.autograd.grad(ours, ours_in)
    torch.testing.assert_close(ours, trl_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(our_grad, trl_grad, rtol=1e-10, atol=1e-12)
    assert float(m["kl"]) == pytest.approx(fake._metrics["train"]["kl"][0], rel=1e-10, abs=1e-12)
    assert (float(m["kl"]) == 0.0) == (kl_shift < 0)


def _experimental(module: str, cls: str, method: str, **attrs):
    """A trl.experimental trainer's loss method, unbound, with a stand-in `self`."""
    trainer = getattr(pytest.importorskip(f"trl.experimental.{module}"), cls)
    fake = SimpleNamespace(accelerator=_accelerator(), **attrs)
    return lambda *args: getattr(trainer, method)(fake, *args)


def _logps(seed, lo, hi):
    g = torch.Generator().manual_seed(seed)
    return [(lo + (hi - lo) * torch.rand(B, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(2)]


def _loss_and_grads(loss, inputs):
    return (loss.detach(), *torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_simpo_matches_trl(eps):
    pw, pl = _logps(12, -3.0, -0.05)  # length-averaged
    call = _experimental("cpo", "CPOTrainer", "cpo_loss", loss_type="simpo", beta=2.0, simpo_gamma=0.5,
                         label_smoothing=eps, alpha=0.0)
    # TRL's simpo_gamma is in reward units, divided by beta inside: the same gamma as ours
    theirs = _loss_and_grads(call(pw, pl)[0].sum(), [pw, pl])
    ours = _loss_and_grads(simpo(pw, pl, beta=2.0, gamma=0.5, label_smoothing=eps)[0].sum(), [pw, pl])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_cpo_preference_term_matches_trl():
    pw, pl = _logps(13, -60.0, -5.0)  # summed
    call = _experimental("cpo", "CPOTrainer", "cpo_loss", loss_type="sigmoid", beta=0.1, label_smoothing=0.1,
                         alpha=0.0)
    losses, chosen_rewards, _ = call(pw, pl)
    theirs = _loss_and_grads(losses.sum(), [pw, pl])
    # alpha=0 drops our NLL term; TRL adds its NLL (a batch token mean) outside cpo_loss
    out, m = cpo(pw, pl, beta=0.1, alpha=0.0, label_smoothing=0.1)
    for a, b in zip(_loss_and_grads(out.sum(), [pw, pl]), theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m["rewards_chosen"], chosen_rewards)


def test_orpo_odds_ratio_term_matches_trl():
    pw, pl = _logps(14, -3.0, -0.01)  # length-averaged, some near 0 (odds large)
    call = _experimental("orpo", "ORPOTrainer", "odds_ratio_loss", beta=0.25)
    losses, chosen_rewards, _, _, log_odds = call(pw, pl)
    theirs = _loss_and_grads(-losses.sum(), [pw, pl])  # TRL: loss = nll - mean(beta * log sigma(log odds))
    out, m = orpo(pw, pl, lam=0.25)
    # ours = NLL + odds-ratio term; the NLL of a length-averaged log-prob is -pw
    ours = _loss_and_grads((out - (-pw)).sum(), [pw, pl])
    for a, b in zip(ours, theirs):  # TRL computes ORPO in fp32 whatever the input dtype
        torch.testing.assert_close(a, b.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["log_odds_ratio"].mean(), log_odds.detach().double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["rewards_chosen"], chosen_rewards.double(), rtol=1e-5, atol=1e-6)
