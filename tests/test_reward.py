"""Reward model: the Bradley-Terry loss, a short run to >= 0.9 held-out pair accuracy, an HF reload."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from optsys.config import ConfigError, load_config
from optsys.losses.reward import bradley_terry
from optsys.models.load import load_tokenizer
from optsys.trainers import reward


def test_bradley_terry_margin_and_centering():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    loss, m = bradley_terry(rc, rr)
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(rc - rr))
    assert m["accuracy"].tolist() == [1.0, 0.0]
    loss2, _ = bradley_terry(rc, rr, margin=torch.tensor([0.5, 0.5]), center_coef=0.1)
    torch.testing.assert_close(loss2, -torch.nn.functional.logsigmoid(rc - rr - 0.5) + 0.1 * (rc + rr) ** 2)


def test_reward_model_learns_and_reloads(tmp_path, tiny_path):
    out = tmp_path / "rm"
    # Sorting pairs of two numbers (sorted vs swapped: the head must compare them) are learnable from the
    # random-init 0.5M backbone in 150 steps: held-out 0.49-0.54 -> 0.975-0.98 over seeds 0-2 (~18 s, 1 thread).
    cfg = load_config("rm_tiny", overrides=[
        f"model.name_or_path={tiny_path}", f"output_dir={out}", "data.task=sorting", "data.difficulty=2",
        "data.num_train=800", "data.num_eval=200", "data.max_tokens=1024", "trainer.batch_tokens=1024",
        "trainer.max_steps=150", "trainer.lr=2e-3", "trainer.warmup_steps=5", "trainer.log_every=10",
        "trainer.eval_every=0", "trainer.progress=false"])
    summary = reward.train(cfg)
    print({k: v for k, v in summary.items() if k.startswith("eval/")})
    assert summary["eval/accuracy_before"] < 0.9 <= summary["eval/accuracy"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/accuracy" in r and "throughput/tokens_per_s" in r for r in logged)

    tok = load_tokenizer(str(out / "final"))
    model = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    convs = [[{"role": "user", "content": "sort: 3 1 2"}, {"role": "assistant", "content": a}]
             for a in ("1 2 3", "3 1 2", "1 2 3 4 5")]
    ours = reward.score(model, tok, convs + ["plain text works too"])
    texts = [tok.apply_chat_template(c, tokenize=False) for c in convs]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        hf = model(**enc).logits[:, 0]
    torch.testing.assert_close(ours[:3], hf, rtol=1e-5, atol=1e-5)
    assert ours.shape == (4,)


def test_score_rejects_other_inputs(tiny_path):
    tok = load_tokenizer(str(tiny_path))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=1, pad_token_id=0)
    with pytest.raises(TypeError, match="strings or conversations"):
        reward.score(model, tok, [42])


def test_lora_reward_model_trains_adapters_and_head_and_saves_merged(tmp_path, tiny_path):
    """LoRA on the backbone + a trainable head: only those change; final/ is merged and reloads as a plain HF
    sequence-classification model scoring exactly as the trained adapter model did; final-adapter/ is peft's."""
    from peft import AutoPeftModelForSequenceClassification
    from safetensors.torch import load_file

    out = tmp_path / "rm-lora"
    cfg = load_config("rm_tiny", overrides=[
        f"model.name_or_path={tiny_path}", f"output_dir={out}", "data.task=sorting", "data.difficulty=2",
        "data.num_train=200", "data.num_eval=100", "trainer.batch_tokens=1024", "trainer.max_steps=30",
        "trainer.lr=3e-3", "trainer.warmup_steps=2", "trainer.eval_every=0", "trainer.progress=false",
        "model.lora.r=8", "model.lora.alpha=16"])
    summary = reward.train(cfg)
    assert summary["eval/accuracy"] > summary["eval/accuracy_before"]
    assert summary["model/parameters"] > 0

    base = load_file(tiny_path / "model.safetensors")
    merged = load_file(out / "final" / "model.safetensors")
    assert not any("lora_" in k for k in merged) and "score.weight" in merged
    changed = [k for k in base if k in merged and not torch.equal(base[k], merged[k])]
    # the merged projections differ from the base (adapters folded in); embeddings and norms do not
    assert changed and all(any(t in k for t in ("proj",)) for k in changed), changed

    tok = load_tokenizer(str(out / "final"))
    plain = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    adapter = AutoPeftModelForSequenceClassification.from_pretrained(out / "final-adapter", num_labels=1).eval()
    texts = ["<|im_start|>user\nsort: 3 1<|im_end|>\n<|im_start|>assistant\n1 3<|im_end|>\n", "plain text"]
    torch.testing.assert_close(reward.score(plain, tok, texts), reward.score(adapter, tok, texts), rtol=1e-5,
                               atol=1e-5)


def test_qlora_reward_model_is_refused(tmp_path, tiny_path):
    cfg = load_config("rm_tiny", overrides=[f"model.name_or_path={tiny_path}", f"output_dir={tmp_path / 'q'}",
                                            "model.lora.r=8", "model.lora.quantize=nf4"])
    with pytest.raises(ConfigError, match="not QLoRA"):
        reward.train(cfg)
