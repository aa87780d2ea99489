"""Preference trainer: short real runs of every method, the metrics, reference modes and the cache."""

import json

import pytest
import torch

from optsys.config import ConfigError, load_config
from optsys.trainers import preference

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


@pytest.mark.parametrize("method, extra", [("orpo", ()), ("simpo", ("pref.beta=2.0",)), ("kto", ()),
                                           ("cpo", ()), ("ipo", ()), ("robust", ("pref.label_smoothing=0.1",))])
def test_other_methods_run_end_to_end(tmp_path, tiny_path, method, extra):
    out = tmp_path / method
    summary = preference.train(pref_cfg(out, tiny_path, *extra, "eval.before=false", "eval.after=false",
                                        method=method))
    assert torch.isfinite(torch.tensor(summary["train/loss"]))
    assert "eval/reward_accuracy" in summary
    assert (out / "ref_logps.safetensors").exists() == (method in ("kto", "ipo", "robust"))
    logged = [r for r in rows(out) if "train/loss" in r]
    assert all(k in logged[-1] for k in METRICS)


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
    monkeypatch.setattr(preference, "pair_logps",
                        lambda *a, **k: (policy, torch.full((5,), -1.0), torch.ones(5)))
    meter = MetricWindow(preference.METRIC_KEYS)
    cfg = load_config("kto_tiny")
    preference.batch_loss(None, SimpleNamespace(labels=labels), ref, method="kto", cfg=cfg, device=torch.device("cpu"),
                          meter=meter)
    m = meter.means("")
    # desirable rewards (0.5, -1, 0) vs undesirable (0, 0.5): wins 0.5>0; -1 none; 0 none -> 1 of 6
    assert m["reward_accuracy"] == pytest.approx(1 / 6)
    beta = cfg.pref.beta
    assert m["margin"] == pytest.approx(beta * ((0.5 - 1 + 0) / 3 - (0 + 0.5) / 2))
