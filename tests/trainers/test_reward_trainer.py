"""Reward model: the Bradley-Terry loss, a short run to >= 0.9 held-out pair accuracy, an HF reload."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from optsys.config import ConfigError
from optsys.losses.reward import bradley_terry
from optsys.models.load import load_tokenizer
from optsys.trainers import reward
from optsys.validation import load_config


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
    # Plain text too, and texts whose last token IS the pad token (HF pools the token before it).
    plain = ["plain text works too", f"ends in pad{tok.pad_token}", f"two pads{tok.pad_token}{tok.pad_token}"]
    ours = reward.score(model, tok, convs + plain)
    ids = [tok(tok.apply_chat_template(c, tokenize=False), add_special_tokens=False)["input_ids"] for c in convs]
    ids += [tok(t, add_special_tokens=True)["input_ids"] for t in plain]
    assert [s[-1] == tok.pad_token_id for s in ids] == [False] * 4 + [True] * 2
    hf = _hf_right_padded(model, ids, tok.pad_token_id)
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-5)
    assert ours.shape == (6,)


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


@pytest.fixture(scope="module")
def pad_eos_path(tiny_path, tmp_path_factory):
    """The tiny model with a Llama-3-style tokenizer: no pad token (so load_tokenizer sets pad = eos) and a chat
    template that ends every turn in eos, with nothing after it."""
    import shutil

    path = tmp_path_factory.mktemp("pad-eos") / "model"
    shutil.copytree(tiny_path, path)
    for name, drop in (("tokenizer_config.json", "pad_token"), ("config.json", "pad_token_id")):
        conf = json.loads((path / name).read_text())
        conf[drop] = None
        (path / name).write_text(json.dumps(conf))
    (path / "chat_template.jinja").write_text(
        "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    return path


def _hf_right_padded(model, seqs: list[list[int]], pad: int) -> torch.Tensor:
    """The HF model's own rewards [N] on a right-padded batch."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, 0]


def test_pad_equal_to_eos_trained_scored_and_exported_rewards_agree(pad_eos_path, tmp_path):
    """pad == eos and sequences ending in eos: packed_rewards (training), score() and the saved folder reloaded by
    AutoModelForSequenceClassification (right-padded batch) read the same token, HF's rightmost non-pad one."""
    from optsys.config import ModelConfig
    from optsys.data.preference import packed_pair_batches, tokenize_pairs
    from optsys.data.tasks import get_task
    from optsys.models.reward import load_reward_model, packed_rewards, pooled_positions

    model, tok = load_reward_model(ModelConfig(name_or_path=str(pad_eos_path)), torch.device("cpu"), seed=3)
    model.eval()
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos and model.config.pad_token_id == eos

    # Training path: the pairs as the RM trainer packs them; every sequence ends in eos (= pad).
    pairs, _ = tokenize_pairs(get_task("sorting").preference_pairs("train", 5, difficulty=2), tok, max_tokens=512)
    seqs = [ex.input_ids for p in pairs for ex in (p.chosen, p.rejected)]
    assert all(s[-1] == eos and s[-2] != eos for s in seqs)
    trained = torch.zeros(len(seqs))
    for batch in packed_pair_batches(pairs, 512, shuffle_seed=None):
        b = batch.packed
        with torch.no_grad():
            r = packed_rewards(model, b.input_ids, b.position_ids, b.seq_lens)
        for j, i in enumerate(batch.pair_index):
            trained[2 * i], trained[2 * i + 1] = r[2 * j], r[2 * j + 1]

    # `text`-row style strings: ending in eos, in two eos, and with an eos inside.
    texts = ["plain text<|im_end|>", "two ends<|im_end|><|im_end|>", "in<|im_end|>side"]
    text_ids = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    convs = [[{"role": "user", "content": "sort: 3 1 2"}, {"role": "assistant", "content": a}] for a in ("1 2 3",
                                                                                                         "3 1 2")]
    scored = reward.score(model, tok, convs + texts)

    model.save_pretrained(tmp_path / "final")
    tok.save_pretrained(tmp_path / "final")
    tok2 = load_tokenizer(str(tmp_path / "final"))
    hf_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    assert hf_model.config.pad_token_id == tok2.pad_token_id == eos
    conv_ids = [tok2(tok2.apply_chat_template(c, tokenize=False), add_special_tokens=False)["input_ids"]
                for c in convs]
    hf = _hf_right_padded(hf_model, seqs + conv_ids + text_ids, eos)

    torch.testing.assert_close(trained, hf[: len(seqs)], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scored, hf[len(seqs):], rtol=1e-5, atol=1e-5)
    # The case is a real one: no sequence but the last is pooled at its last token.
    all_ids = seqs + conv_ids + text_ids
    lens = [len(s) for s in all_ids]
    flat = torch.tensor([t for s in all_ids for t in s])[None]
    pooled = pooled_positions(flat, lens, eos)
    ends = torch.tensor(lens).cumsum(0) - 1
    assert (pooled[:-1] < ends[:-1]).all()
    assert pooled[len(seqs) + len(conv_ids) + 1] == ends[len(seqs) + len(conv_ids) + 1] - 2  # two trailing eos
    assert pooled[-1] == ends[-1]  # "in<eos>side": pooled at the end, past the inner eos


def test_pooled_positions_rule():
    """Rightmost non-pad token per packed sequence; first token if all pad; last token if no pad id."""
    from optsys.models.reward import pooled_positions

    ids = torch.tensor([[5, 7, 0, 0, 0, 0, 9, 0, 3]])  # sequences [5, 7, 0], [0, 0], [0, 9, 0, 3]
    lens = [3, 2, 4]
    assert pooled_positions(ids, lens, 0).tolist() == [1, 3, 8]
    assert pooled_positions(ids, lens, 3).tolist() == [2, 4, 7]
    assert pooled_positions(ids, lens, None).tolist() == [2, 4, 8]
