"""Preference trainer: short real runs of every method, the metrics, reference modes and the cache."""

import json

import pytest
import torch

from optsys.config import ConfigError
from optsys.trainers import preference
from optsys.validation import load_config

METRICS = ("train/loss", "train/rewards_chosen", "train/rewards_rejected", "train/reward_accuracy", "train/margin",
           "train/logps_chosen", "train/logps_rejected", "throughput/tokens_per_s")


def pref_cfg(out, model_path, *extra, method="dpo"):
    return load_config("dpo_tiny", overrides=[
        f"method={method}", f"model.name_or_path={model_path}", f"output_dir={out}", "data.num_train=120",
        "data.num_eval=40", "data.max_tokens=512", "trainer.batch_tokens=512", "trainer.max_steps=4",
        "trainer.warmup_steps=1", "trainer.log_every=2", "trainer.progress=false", "trainer.lr=1e-3",
        "eval.batch_size=40", "eval.max_new_tokens=4", *extra])


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_run_writes_metrics_and_learns_training_pairs(tmp_path, tiny_path):
    out = tmp_path / "dpo"
    summary = preference.train(pref_cfg(out, tiny_path, "trainer.max_steps=24", "trainer.log_every=4",
                                        "trainer.eval_every=12", "data.num_train=60", "pref.beta=0.5"))
    logged = [r for r in rows(out) if "train/loss" in r]
    assert len(logged) == 6
    for r in logged:
        for key in METRICS:
            assert key in r, key
    assert logged[-1]["train/reward_accuracy"] > logged[0]["train/reward_accuracy"]
    assert logged[-1]["train/reward_accuracy"] >= 0.65 and logged[-1]["train/loss"] < logged[0]["train/loss"]
    assert any("eval/reward_accuracy" in r for r in rows(out))
    for key in ("eval/reward_accuracy", "eval/margin", "eval/loss", "eval/accuracy_before", "eval/accuracy_after",
                "eval/reward_accuracy_before"):
        assert key in summary, key
    assert (out / "ref_logps.safetensors").exists() and (out / "final" / "model.safetensors").exists()
    assert json.loads((out / "summary.json").read_text())["data/pairs"] == 60


def test_reference_cache_round_trip_and_mismatch(tmp_path, tiny_path):
    path = tmp_path / "ref.safetensors"
    fp = {"model.name_or_path": "m", "tokenizer.vocab_size": 512, "data.train_sha256": "abc"}
    logps = {"train": torch.randn(5, 2), "eval": torch.randn(3, 2)}
    preference.save_reference_cache(path, logps, fp)
    back = preference.load_reference_cache(path, fp)
    torch.testing.assert_close(back["train"], logps["train"], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="tokenizer.vocab_size: cached 512, now 1000"):
        preference.load_reference_cache(path, {**fp, "tokenizer.vocab_size": 1000})
    assert preference.load_reference_cache(tmp_path / "none.safetensors", fp) is None

    # In a run: the same data reuses the cache; other data is refused, naming the field. (overwrite=true moves
    # the old run aside, cache included, so the cache is carried into each new folder here.)
    out = tmp_path / "run"
    preference.train(pref_cfg(out, tiny_path, "trainer.max_steps=1", "eval.before=false", "eval.after=false"))
    before = (out / "ref_logps.safetensors").stat().st_mtime_ns
    preference.train(pref_cfg(with_cache(out, tmp_path / "same"), tiny_path, "trainer.max_steps=1",
                              "eval.before=false", "eval.after=false"))
    assert (tmp_path / "same" / "ref_logps.safetensors").stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match="data.train_sha256"):
        preference.train(pref_cfg(with_cache(out, tmp_path / "other"), tiny_path, "trainer.max_steps=1",
                                  "data.num_train=50"))


def with_cache(run, new):
    """A fresh output folder holding only `run`'s reference cache (mtime kept)."""
    import shutil

    new.mkdir()
    shutil.copy2(run / "ref_logps.safetensors", new / "ref_logps.safetensors")
    return new


def test_reference_cache_sees_a_checkpoint_retrained_in_place(tmp_path, tiny_path):
    """The same model path with new weights (an SFT run re-written into the same folder) refuses the cache."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "sft-final"
    shutil.copytree(tiny_path, model)
    out = tmp_path / "run"
    quick = ("trainer.max_steps=1", "eval.before=false", "eval.after=false")
    preference.train(pref_cfg(out, model, *quick))
    weights = next(model.glob("*.safetensors"))
    state = load_file(weights)
    save_file({k: v + 0.01 for k, v in state.items()}, str(weights), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="model.weights_stamp: cached '[0-9a-f]{64}', now '[0-9a-f]{64}'"):
        preference.train(pref_cfg(with_cache(out, tmp_path / "again"), model, *quick))


def test_reference_modes_agree(tmp_path, tiny_path):
    """precompute and copy give the same losses step for step (same initial model)."""
    extra = ("eval.before=false", "eval.after=false", "trainer.log_every=1")
    a = preference.train(pref_cfg(tmp_path / "a", tiny_path, *extra))
    b = preference.train(pref_cfg(tmp_path / "b", tiny_path, *extra, "pref.reference=copy"))
    la = [r["train/loss"] for r in rows(tmp_path / "a") if "train/loss" in r]
    lb = [r["train/loss"] for r in rows(tmp_path / "b") if "train/loss" in r]
    assert len(la) == 4
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-4, atol=1e-5)
    assert a["eval/reward_accuracy"] == pytest.approx(b["eval/reward_accuracy"])


def test_lora_adapters_off_reference(tmp_path, tiny_path):
    out = tmp_path / "lora"
    summary = preference.train(pref_cfg(out, tiny_path, "model.lora.r=4", "pref.reference=adapters_off",
                                        "eval.before=false", "eval.after=false"))
    assert torch.isfinite(torch.tensor(summary["train/loss"]))
    assert (out / "final" / "adapter_config.json").exists()
    first = next(r for r in rows(out) if "train/loss" in r)
    assert first["train/loss"] == pytest.approx(0.6931, abs=0.02)  # policy == reference at the start


def test_adapters_off_needs_lora(tmp_path, tiny_path):
    with pytest.raises(ConfigError, match="adapters_off needs LoRA"):
        pref_cfg(tmp_path / "x", tiny_path, "pref.reference=adapters_off")


# orpo: dpo_tiny's pref.beta (0.5) is not read by ORPO's loss, and a setting a method ignores is refused
@pytest.mark.parametrize("method, extra", [("orpo", ("pref.beta=0.1",)), ("simpo", ("pref.beta=2.0",)), ("kto", ()),
                                           ("cpo", ()), ("ipo", ()), ("robust", ("pref.label_smoothing=0.1",))])
def test_other_methods_run_end_to_end(tmp_path, tiny_path, method, extra, capsys):
    """Each method raises its own margin (and reward accuracy) on the pairs it trains on, evaluated before and
    after 4 steps from the random-init tiny model (eval set = the training file). Measured, seed 0 (seeds 1-3
    alike): margin orpo -0.0007 -> 0.0032, simpo -0.015 -> 0.31, kto 0 -> 0.02-0.28, cpo 0.06 -> 0.16,
    ipo 0 -> 0.08, robust 0 -> 0.28; accuracy up in every case (orpo 0.5 -> 0.55, the others >= 0.1)."""
    from optsys.data.preference import unpaired_rows
    from optsys.data.tasks import get_task

    pairs = get_task("arithmetic").preference_pairs("train", 40, difficulty=2)
    with_answers = method == "cpo"  # held-out accuracy needs a gold answer: cpo's rows carry one, the others not
    if with_answers:
        pairs = [{**p, "answer": p["chosen"]} for p in pairs]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (unpaired_rows(pairs) if method == "kto" else pairs)))
    out = tmp_path / method
    summary = preference.train(pref_cfg(out, tiny_path, *extra, "data.task=null", f"data.dataset={data}",
                                        f"data.eval_dataset={data}", method=method))
    said = capsys.readouterr().out
    if with_answers:
        assert summary["eval/accuracy_questions"] == 40 and summary["eval/match"] == "numeric"
        assert 0 <= summary["eval/accuracy_before"] <= 1 and 0 <= summary["eval/accuracy_after"] <= 1
    else:  # said once, not an error
        assert "eval/accuracy_before" not in summary and "eval/accuracy_after" not in summary
        assert said.count("has an 'answer' field") == 1
    assert torch.isfinite(torch.tensor(summary["train/loss"]))
    assert summary["eval/margin"] > summary["eval/margin_before"]
    assert summary["eval/reward_accuracy"] > summary["eval/reward_accuracy_before"]
    assert (out / "ref_logps.safetensors").exists() == (method in ("kto", "ipo", "robust"))
    if method in ("kto", "ipo", "robust"):  # the policy is its reference before training, bit for bit
        assert summary["eval/rewards_chosen_before"] == summary["eval/rewards_rejected_before"] == 0.0
    logged = [r for r in rows(out) if "train/loss" in r]
    assert all(k in logged[-1] for k in METRICS)


@pytest.mark.parametrize("method", ["dpo", "ipo"])  # summed and length-averaged log-probs
def test_rpo_alpha_step_matches_a_plain_torch_reference(tiny_path, method):
    """pref.rpo_alpha through the trainer's fused path, a step of several micro-batches: the step's loss, its
    gradient and the logged nll_chosen equal a plain torch computation from the model's own logits, one sequence
    at a time: mean preference loss over the step's pairs + alpha x mean NLL over ALL the step's chosen tokens."""
    from transformers import AutoModelForCausalLM

    from optsys.data.preference import packed_pair_batches, tokenize_pairs
    from optsys.data.tasks import get_task
    from optsys.models.load import load_tokenizer
    from optsys.parallel.dist import World
    from optsys.trainers.common import MetricWindow, backward_share

    cpu, alpha, beta = torch.device("cpu"), 0.6, 0.3
    cfg = load_config("dpo_tiny", overrides=[f"model.name_or_path={tiny_path}", f"method={method}",
                                             "trainer.kernel_backend=torch", f"pref.rpo_alpha={alpha}",
                                             f"pref.beta={beta}"])
    tok = load_tokenizer(str(tiny_path))
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    pairs, _ = tokenize_pairs(get_task("arithmetic").preference_pairs("train", 9, difficulty=2), tok, max_tokens=128)
    group = packed_pair_batches(pairs, 100, shuffle_seed=None)
    assert len(group) >= 3 and len({b.num_pairs for b in group} | {1}) >= 2  # several rows, not all the same
    ref = -20 - 10 * torch.rand(len(pairs), 2, generator=torch.Generator().manual_seed(0))

    n_pairs, n_tokens = preference.step_counts(group)
    meter = MetricWindow(preference.METRIC_KEYS)
    model.zero_grad()
    total = sum(backward_share(preference.batch_loss(model, b, ref[torch.tensor(b.pair_index)], method=method,
                                                     cfg=cfg, device=cpu, meter=meter, step=(n_pairs, n_tokens)),
                               True, n_pairs, World(0, 1, 0, cpu)) for b in group) / n_pairs
    ours = [p.grad.clone() for p in model.parameters()]

    def token_logps(ex):  # [n] log-probs of the sequence's targets, from its own full logits
        logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0].double()
        t = torch.tensor(ex.targets)
        keep = t != -100
        return torch.log_softmax(logits[keep], -1).gather(1, t[keep, None])[:, 0]

    model.zero_grad()
    prefs, chosen_tokens = [], []
    for i, p in enumerate(pairs):
        c, r = token_logps(p.chosen), token_logps(p.rejected)
        chosen_tokens.append(c)
        if method == "dpo":  # Rafailov et al. eq. 7 on summed log-probs
            prefs.append(-torch.nn.functional.logsigmoid(beta * ((c.sum() - ref[i, 0]) - (r.sum() - ref[i, 1]))))
        else:  # IPO on length-averaged ones; the reference cache holds the same kind
            prefs.append(((c.mean() - ref[i, 0]) - (r.mean() - ref[i, 1]) - 1 / (2 * beta)) ** 2)
    nll = -torch.cat(chosen_tokens).mean()
    want = torch.stack(prefs).mean() + alpha * nll
    want.backward()
    nll, want = nll.detach(), want.detach()
    assert n_tokens == sum(len(c) for c in chosen_tokens) and n_pairs == len(pairs)
    assert total == pytest.approx(float(want), rel=1e-5)
    for a, (name, p) in zip(ours, model.named_parameters()):
        torch.testing.assert_close(a, p.grad.float(), rtol=1e-4, atol=1e-6, msg=name)
    m = meter.means("")
    assert m["nll_chosen"] == pytest.approx(float(nll), rel=1e-5)
    assert m["loss"] == pytest.approx(float(want), rel=1e-5)
    assert float(alpha * nll) > 0.1 * float(want)  # the term is a real part of what matched


def test_rpo_alpha_run_logs_nll_chosen(tmp_path, tiny_path):
    """A short DPO run with pref.rpo_alpha logs train/ and eval/nll_chosen (none without it), and the NLL term
    pulls the held-out chosen NLL down from the random-init model."""
    out = tmp_path / "rpo"
    summary = preference.train(pref_cfg(out, tiny_path, "pref.rpo_alpha=1.0", "eval.after=false"))
    logged = [r for r in rows(out) if "train/loss" in r]
    assert logged and all("train/nll_chosen" in r for r in logged)
    assert summary["eval/nll_chosen"] < summary["eval/nll_chosen_before"] - 0.1
    plain = preference.train(pref_cfg(tmp_path / "plain", tiny_path, "eval.before=false", "eval.after=false"))
    assert "eval/nll_chosen" not in plain and all("train/nll_chosen" not in r for r in rows(tmp_path / "plain"))


@pytest.mark.slow
def test_dpo_on_sft_model_raises_heldout_reward_accuracy(tmp_path, quickstart_run):
    """DPO from the quickstart's SFT'd model (the shared session fixture) with the dpo_tiny recipe.

    The issue's bar: held-out reward accuracy >= 0.9 and no drop in task accuracy. Measured with the recipe:
    0.94 (task 1.0 -> 1.0) from one quickstart model, 1.0 (task 1.0 -> 1.0, 109 s) from another.
    """
    _, sft_out = quickstart_run
    cfg = load_config("dpo_tiny", overrides=[f"model.name_or_path={sft_out / 'final'}",
                                             f"output_dir={tmp_path / 'dpo'}", "trainer.progress=false"])
    s = preference.train(cfg)
    print({k: v for k, v in s.items() if k.startswith("eval/")})
    assert s["eval/reward_accuracy"] >= 0.9
    assert s["eval/reward_accuracy"] > s["eval/reward_accuracy_before"]
    assert s["eval/accuracy_before"] >= 0.8  # it really starts from a model that can add
    assert s["eval/accuracy_after"] >= s["eval/accuracy_before"]


def test_separate_reference_model_and_mismatches(tmp_path, tiny_path, tiny_cache):
    from safetensors.torch import load_file

    from optsys.models.tiny import build_tiny

    other = build_tiny("test", seed=1, cache_dir=tiny_cache)  # same family and tokenizer, other weights
    for mode in ("precompute", "copy"):
        s = preference.train(pref_cfg(tmp_path / mode, tiny_path, "trainer.max_steps=1", f"pref.reference={mode}",
                                      f"pref.reference_model={other}", "eval.before=true"))
        # before training the policy is not its reference: the rewards are not all 0
        assert abs(s["eval/rewards_chosen_before"]) > 1e-3, mode
    # the cache holds the other model's log-probs: equal to scoring with it directly
    cached = load_file(tmp_path / "precompute" / "ref_logps.safetensors")
    own = preference.train(pref_cfg(tmp_path / "own", tiny_path, "trainer.max_steps=1"))
    assert own["eval/rewards_chosen_before"] == 0.0
    assert not torch.allclose(cached["train"], load_file(tmp_path / "own" / "ref_logps.safetensors")["train"])

    llama = build_tiny("test-llama", seed=0, cache_dir=tiny_cache)
    with pytest.raises(ConfigError, match=r"architecture: policy 'qwen2', reference 'llama'"):
        preference.train(pref_cfg(tmp_path / "llama", tiny_path, f"pref.reference_model={llama}"))
    small = build_tiny("small", seed=0, cache_dir=tiny_cache)  # vocab 32000, another tokenizer
    with pytest.raises(ConfigError, match=r"tokenizer: the policy's has 512 tokens.*\n.*vocab \(lm_head rows\): "
                                          r"policy 512, reference 32000"):
        preference.train(pref_cfg(tmp_path / "small", tiny_path, f"pref.reference_model={small}"))
    with pytest.raises(ConfigError, match="reference-free"):
        pref_cfg(tmp_path / "simpo", tiny_path, f"pref.reference_model={other}", method="simpo")


def test_kto_reward_accuracy_is_the_ranking_auc(monkeypatch):
    """KTO rows are unpaired: reward_accuracy counts desirable-over-undesirable reward orderings in a micro-batch."""
    from types import SimpleNamespace

    from optsys.trainers.common import MetricWindow

    policy = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0])
    ref = torch.tensor([[-1.5, -1.0], [-2.0, -1.0], [-2.0, -1.0], [-4.5, -1.0], [-5.0, -1.0]])
    labels = [True, False, True, False, True]  # rewards beta * (policy - ref): 0.5b, 0, -1b, 0.5b, 0
    monkeypatch.setattr(preference, "row_logps", lambda *a, **k: (policy, torch.ones(5)))
    meter = MetricWindow(preference.METRIC_KEYS)
    cfg = load_config("kto_tiny")
    preference.batch_loss(None, SimpleNamespace(labels=labels, half=lambda which: None), ref, method="kto", cfg=cfg,
                          device=torch.device("cpu"), meter=meter, z0=0.0)
    m = meter.means("")
    # desirable rewards (0.5, -1, 0) vs undesirable (0, 0.5): wins 0.5>0; -1 none; 0 none -> 1 of 6
    assert m["reward_accuracy"] == pytest.approx(1 / 6)
    beta = cfg.pref.beta
    assert m["margin"] == pytest.approx(beta * ((0.5 - 1 + 0) / 3 - (0 + 0.5) / 2))


def test_kto_z0_is_the_mean_over_all_the_steps_partners(tiny_path, monkeypatch):
    """z0 of a step of several micro-batches: the mean log-ratio over ALL its KL partners (each scored here by a
    separate forward), not a micro-batch's, nor a rank's; every micro-batch's loss uses it."""
    from transformers import AutoModelForCausalLM

    from optsys.data.preference import packed_pair_batches, tokenize_pairs, unpaired_rows
    from optsys.data.tasks import get_task
    from optsys.losses import kto, sequence_logprobs
    from optsys.models.load import load_tokenizer
    from optsys.models.packed import lm_head_weight
    from optsys.parallel.dist import World
    from optsys.trainers.common import MetricWindow

    cpu = torch.device("cpu")
    cfg = load_config("kto_tiny", overrides=[f"model.name_or_path={tiny_path}", "trainer.kernel_backend=torch"])
    tok = load_tokenizer(str(tiny_path))
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    pairs, _ = tokenize_pairs(unpaired_rows(get_task("arithmetic").preference_pairs("train", 5, difficulty=2)), tok,
                              max_tokens=128, kto=True)
    group = packed_pair_batches(pairs, 100, shuffle_seed=None)
    assert len(group) >= 3  # a step of several micro-batches

    def direct_logp(ex):  # one sequence, its own forward
        with torch.no_grad():
            hidden = model.get_decoder()(input_ids=torch.tensor([ex.input_ids])).last_hidden_state[0]
            out, _ = sequence_logprobs(hidden, lm_head_weight(model), torch.tensor(ex.targets),
                                       seq_ids=torch.zeros(len(ex.targets), dtype=torch.long), backend="torch")
        return out[0]

    # Reference log-probs chosen so the log-ratio is row r's own ((r - 1)^2 + noise): per-row means differ.
    g = torch.Generator().manual_seed(0)
    refs, ratios = [], []
    for r, b in enumerate(group):
        pol = torch.stack([direct_logp(pairs[i].rejected) for i in b.pair_index])
        ratio = (r - 1) ** 2 + 0.1 * torch.randn(len(pol), generator=g)
        refs.append(torch.stack([torch.full_like(pol, -30.0), pol - ratio], 1))
        ratios.append(ratio)
    want = torch.cat(ratios).mean()
    assert want > 0 and all(abs(float(x.mean() - want)) > 0.2 for x in ratios)
    rows = [(b, True) for b in group]
    z0 = preference.kto_z0(model, rows, refs, cfg=cfg, device=cpu, world=World(0, 1, 0, cpu))
    assert z0 == pytest.approx(float(want), abs=1e-4)

    # Two ranks, faked: each takes its round-robin share (3 rows and 2 + a filler); the all-reduce is replayed
    # from what each rank contributed. Both get the global mean (not the mean of their means; fillers not counted).
    from optsys.parallel.dist import shared_batches

    def run_rank(rank, reduce):
        world = World(rank, 2, rank, cpu)
        share = list(shared_batches(group, world))
        share_refs = [next(r for g, r in zip(group, refs) if g is b) for b, _ in share]
        monkeypatch.setattr(preference, "all_reduce_sum", reduce)
        return preference.kto_z0(model, share, share_refs, cfg=cfg, device=cpu, world=world)

    sent = []
    for rank in (0, 1):
        run_rank(rank, lambda values, world: sent.append(values) or values)
    total = [a + b for a, b in zip(*sent)]
    means = [run_rank(rank, lambda values, world: total) for rank in (0, 1)]
    assert means == pytest.approx([float(want)] * 2, abs=1e-4)
    assert abs(sum(x[0] / x[1] for x in sent) / 2 - float(want)) > 0.05  # a mean of the ranks' means differs

    for (b, _), ref in zip(rows, refs):
        meter = MetricWindow(preference.METRIC_KEYS)
        got = preference.batch_loss(model, b, ref, method="kto", cfg=cfg, device=cpu, meter=meter, z0=z0)
        pol = torch.stack([direct_logp(pairs[i].chosen) for i in b.pair_index])
        loss, _ = kto(pol, ref[:, 0], None, None, torch.tensor(b.labels), beta=cfg.pref.beta, z0=float(want))
        torch.testing.assert_close(got, loss.sum(), rtol=1e-4, atol=1e-5)
        assert meter.means("")["kl"] == pytest.approx(float(want), abs=1e-4)


def test_kto_log_window_with_one_label_logs(tmp_path, tiny_path, monkeypatch):
    """One example per step (data.max_tokens fits a single (example, partner) row) and log_every=1: a window with
    one label has no desirable-vs-undesirable couple, so train/reward_accuracy is absent from its row (not a
    KeyError); z0 is logged as train/kl. With several rows per step, z0 is estimated over the whole step."""
    out = tmp_path / "kto1"
    cfg = pref_cfg(out, tiny_path, "data.max_tokens=48", "trainer.batch_tokens=48", "trainer.max_steps=3",
                   "trainer.log_every=1", "data.num_train=8", "data.num_eval=4", "eval.before=false",
                   "eval.after=false", method="kto")
    preference.train(cfg)
    logged = [r for r in rows(out) if "train/loss" in r]
    assert len(logged) == 3
    assert all("train/reward_accuracy" not in r and "train/kl" in r for r in logged)

    seen, real = [], preference.kto_z0
    monkeypatch.setattr(preference, "kto_z0", lambda model, rows, *a, **k: seen.append(len(rows)) or real(
        model, rows, *a, **k))
    preference.train(pref_cfg(tmp_path / "kto2", tiny_path, "data.max_tokens=48", "trainer.batch_tokens=200",
                              "trainer.max_steps=2", "data.num_train=8", "data.num_eval=4", "eval.before=false",
                              "eval.after=false", method="kto"))
    assert seen[0] >= 2 and len(seen) == 2 + 1  # a step of several micro-batches, then the final eval's split
