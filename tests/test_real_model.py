"""The real model, SmolLM2-135M-Instruct (a Q4_1 GGUF dequantized once per session: the `real_model` fixture), on
what tiny models never exercised: a template with a default system prompt, pad = eos = <|im_end|>, tied embeddings
through the weight sync, vocab 49152, bf16 storage, LoRA by the Llama names, gradient checkpointing, resume.

Tests that run the model many times use `real_model_2l`, its first 2 of 30 layers (same tokenizer, template,
vocabulary, head_dim, tied embeddings). The full model runs in test_the_named_source_is_one_plain_folder_for_every
_entry_point (its folder and tokenizer) and in the recipe_full tests at the end.
"""

from __future__ import annotations

import json

import pytest
import torch

from optsys.errors import ConfigError, DataError, EngineError

IM_END = "<|im_end|>"
QUESTIONS = ["What is 12 + 7?", "Name a colour of the sky.", "Write the word cat backwards."]


def hf_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    from optsys.models.packed import attach_forward_methods

    return attach_forward_methods(AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval())


def chat_prompt(tokenizer, text: str) -> list[int]:
    from optsys.eval.scaling import render

    return render(tokenizer, [{"role": "user", "content": text}])


def test_the_named_source_is_one_plain_folder_for_every_entry_point(real_model, capsys, monkeypatch):
    """Dequantized once into a plain HF folder in the dtype asked for, with the real shape, tokenizer, template
    and generation config; train (optsys.sources), eval and serve resolve the name to that same folder."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from optsys.models.gguf import file_sha256, named_path
    from optsys.models.sources import local_source
    from optsys.sources import resolve_source

    config = json.loads((real_model / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["architectures"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"],
            config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"],
            config["tie_word_embeddings"], config["max_position_embeddings"]) == \
        (["LlamaForCausalLM"], 30, 576, 49152, 9, 3, 64, True, 8192)
    with safe_open(str(real_model / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # stored as model.dtype asked
        assert "lm_head.weight" not in f.keys()  # tied: one matrix
    source = json.loads((real_model / "gguf_source.json").read_text())
    assert source["sha256"] == file_sha256(named_path("smollm2-135m-instruct"))
    generation = json.loads((real_model / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(real_model)
    assert tok.pad_token == tok.eos_token == IM_END == tok.convert_ids_to_tokens(generation["eos_token_id"])
    text = tok.decode(chat_prompt(tok, "hi"))
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # the default
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")

    capsys.readouterr()
    assert local_source("smollm2-135m-instruct", dtype="bfloat16") == str(real_model)
    assert resolve_source("smollm2-135m-instruct", dtype="bfloat16") == str(real_model)  # train and eval_cli
    assert "dequantizing" not in capsys.readouterr().out  # reused, not built again

    import optsys.serve

    seen = {}

    def stop(path, **kw):
        seen["path"] = path
        raise ConfigError("stop here")

    monkeypatch.setattr(optsys.serve, "build_server_args", stop)
    assert optsys.serve.main(["--model", "smollm2-135m-instruct", "--dtype", "bfloat16"]) == 2
    assert seen["path"] == str(real_model)


def test_fused_loss_and_token_logprobs_match_the_models_own_logits(real_model_2l):
    """Vocab 49152, tied head: the fused cross-entropy and token log-probs on a packed row of two chat sequences
    equal log_softmax of the model's `forward` logits, each sequence run alone."""
    from transformers import AutoTokenizer

    from optsys.models.packed import packed_token_logps

    model = hf_model(real_model_2l)
    tok = AutoTokenizer.from_pretrained(real_model_2l)
    seqs = [chat_prompt(tok, q) + tok.encode("An answer." + IM_END) for q in QUESTIONS[:2]]
    ids = torch.tensor([sum(seqs, [])])
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    targets = torch.cat([torch.tensor(s[1:] + [-100]) for s in seqs])
    with torch.no_grad():
        ref = torch.cat([model(torch.tensor([s])).logits[0].log_softmax(-1) for s in seqs])
        want = ref[torch.arange(len(targets)), targets.clamp(min=0)].masked_fill(targets < 0, 0)
        ce = model.token_loss_sum(targets[None], input_ids=ids, position_ids=pos, seq_lens=[len(s) for s in seqs],
                                  reduction="none", backend="torch")
        logps, _ = packed_token_logps(model, ids, pos, [len(s) for s in seqs], targets[None], backend="torch")
    assert ref.shape[-1] == 49152
    torch.testing.assert_close(-ce.reshape(-1), want, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(logps, want[targets >= 0], atol=2e-4, rtol=1e-4)  # one per target


def test_sft_masks_keep_im_end_though_it_is_the_pad_token(real_model_2l):
    """pad = eos = <|im_end|>: the assistant turn's closing <|im_end|> is trained (it is where generation stops)
    and nothing is masked for being the pad id; the default system prompt and the user turn are not trained."""
    from optsys.data.tokenize import tokenize_rows
    from optsys.models.load import load_tokenizer

    tok = load_tokenizer(str(real_model_2l))
    rows = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
    (ex,), _ = tokenize_rows(rows, tok, source="t", max_tokens=128)
    trained = [t for t in ex.targets if t != -100]
    assert tok.decode(trained) == "4" + IM_END
    assert tok.pad_token_id == tok.eos_token_id and trained[-1] == tok.eos_token_id
    assert "You are a helpful AI assistant" in tok.decode(ex.input_ids)


def test_a_chat_row_whose_roles_the_template_rejects_names_the_row_and_roles(real_model_2l):
    """SmolLM2's template renders any order of system/user/assistant turns; a template that refuses one (as many
    do: Llama 2 and Mistral insist that user and assistant alternate) fails the row with the template's own
    message, the row and the roles it has."""
    from optsys.data.tokenize import tokenize_rows
    from optsys.models.load import load_tokenizer

    tok = load_tokenizer(str(real_model_2l))
    tok.chat_template = ("{%- for m in messages %}{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('roles must alternate user/assistant/user/assistant') }}{%- endif %}"
                         "{%- endfor %}" + tok.chat_template)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "user", "content": "quick"},
                          {"role": "assistant", "content": "4"}]}]
    with pytest.raises(DataError) as e:
        tokenize_rows(rows, tok, source="chat.jsonl", max_tokens=128)
    msg = str(e.value)
    assert "chat.jsonl: row 1" in msg and "roles must alternate user/assistant" in msg
    assert "roles ['user', 'user', 'assistant']" in msg


def test_a_prompt_longer_than_the_context_is_refused_before_generating(real_model_2l):
    """The real context (8192, from config.json) bounds an eval prompt plus its new tokens."""
    from optsys.eval.run import _context_length
    from optsys.eval.scaling import MethodSettings, greedy
    from optsys.eval.tasks import Question
    from optsys.models.load import load_tokenizer

    tok = load_tokenizer(str(real_model_2l))
    context = _context_length(str(real_model_2l), 10**6)
    assert context == 8192

    class NoEngine:
        def generate(self, *a, **k):
            raise AssertionError("generated")

    long = Question("q0", ({"role": "user", "content": "one " * 8200},), "1")
    with pytest.raises(EngineError, match="context of 8192 tokens"):
        greedy(NoEngine(), tok, "t", [long], MethodSettings(max_new_tokens=16, max_model_len=context), "exact")


def test_reward_pooling_with_pad_equal_to_eos(real_model_2l):
    """pad = eos: a sequence's reward is read at its last token that is not <|im_end|> (HF's rule), the same
    packed with another sequence as alone."""
    from optsys.models.reward import packed_rewards, pooled_positions

    ids = [[5, 6, 7, 2], [9, 2, 11, 12, 2, 2]]  # ends in <|im_end|> (id 2); an inner one is not the end
    row = torch.tensor([sum(ids, [])])
    assert pooled_positions(row, [4, 6], pad_token_id=2).tolist() == [2, 4 + 3]

    from optsys.config import ModelConfig
    from optsys.models.reward import load_reward_model

    rm, tok = load_reward_model(ModelConfig(name_or_path=str(real_model_2l)), torch.device("cpu"))
    rm.eval()
    assert rm.config.pad_token_id == tok.pad_token_id == tok.eos_token_id == 2
    pos = torch.cat([torch.arange(len(s)) for s in ids])[None]
    with torch.no_grad():
        packed = packed_rewards(rm, row, pos, [4, 6])
        alone = torch.cat([rm(torch.tensor([s])).logits[:, 0] for s in ids])  # HF's own pooling, one at a time
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)


def test_lora_sft_bf16_storage_checkpointing_and_crash_resume(real_model_2l, tmp_path, monkeypatch):
    """LoRA by the Llama names (no target_modules given), bf16 storage with fp32 master weights, gradient
    checkpointing, a held-out loss of eval.loss_max_rows rows; a run that dies in its last step (3) resumes from its
    step-2 checkpoint to the same final adapter as a run that was never interrupted."""
    from safetensors.torch import load_file

    from optsys.trainers import common, sft
    from optsys.validation import load_config

    def cfg(out, *extra):
        return load_config("quickstart", overrides=[
            f"model.name_or_path={real_model_2l}", f"output_dir={out}", "model.dtype=bfloat16", "model.lora.r=8",
            "model.gradient_checkpointing=true", "model.lora.save_merged=true", "data.task=arithmetic",
            "data.num_train=64", "data.num_eval=10", "eval.loss_max_rows=4", "data.max_tokens=256",
            "trainer.batch_tokens=256", "trainer.max_steps=3", "trainer.warmup_steps=1", "trainer.save_every=1",
            "trainer.log_every=1", "trainer.progress=false", "trainer.plots=false", "trainer.tensorboard=false",
            "eval.before=false", "eval.after=false", *extra])

    seen = {}
    build = common.build_optimizer

    def spy(model, *a, **k):
        seen["trained"] = {p.dtype for p in model.parameters() if p.requires_grad}
        seen["frozen"] = {p.dtype for p in model.parameters() if not p.requires_grad}
        seen["checkpointing"] = model.is_gradient_checkpointing
        return build(model, *a, **k)

    monkeypatch.setattr(sft, "build_optimizer", spy)
    whole = sft.train(cfg(tmp_path / "whole"))
    assert seen["trained"] == {torch.float32} and seen["checkpointing"]  # fp32 master weights
    assert whole["eval/loss_rows"] == 4 and whole["eval/loss"] == whole["eval/loss"]  # finite, 4 of 10 rows
    adapter = json.loads((tmp_path / "whole" / "final" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}
    merged = load_file(tmp_path / "whole" / "final-merged" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}  # stored in model.dtype

    step = common.clip_and_step
    calls = []

    def dies_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return step(*a, **k)

    monkeypatch.setattr(sft, "clip_and_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        sft.train(cfg(tmp_path / "killed"))
    monkeypatch.setattr(sft, "clip_and_step", step)
    sft.train(cfg(tmp_path / "killed", "resume=true"))
    a = load_file(tmp_path / "whole" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_vllm_greedy_matches_hf_and_a_tied_embedding_sync_reaches_the_engine(real_model_2l):
    """HF and vLLM greedy completions of chat prompts are the same tokens and both stop at <|im_end|>. The tied
    embedding is one parameter (embed_tokens) on the trainer's side: syncing it changes the engine's output head
    too, and the canary then agrees with the trainer."""
    from transformers import AutoTokenizer

    from optsys.eval.generate import stop_token_ids
    from optsys.rollout.engine import Sampling
    from optsys.rollout.hf_engine import HFEngine
    from optsys.rollout.sync import Canary, SyncError, sync_weights
    from optsys.rollout.vllm_engine import VLLMEngine

    model = hf_model(real_model_2l)
    tok = AutoTokenizer.from_pretrained(real_model_2l)
    stops = stop_token_ids(model, tok)
    assert stops == [tok.convert_tokens_to_ids(IM_END)]
    prompts = [chat_prompt(tok, q) for q in QUESTIONS]
    greedy = Sampling(n=1, temperature=0.0, max_new_tokens=12, stop_token_ids=tuple(stops))
    hf = HFEngine(model, pad_token_id=tok.pad_token_id, greedy_batch=len(prompts))
    engine = VLLMEngine(str(real_model_2l), dtype=torch.float32, max_model_len=512, seed=0,
                        device=torch.device("cpu"))
    try:
        def both():
            a = [g[0].token_ids for g in hf.generate(prompts, greedy, seeds=[0, 1, 2])]
            b = [g[0].token_ids for g in engine.generate(prompts, greedy, seeds=[0, 1, 2])]
            return a, b

        a, b = both()
        assert a == b
        canary = Canary(prompts[0], list(a[0][:6]), tolerance=1e-3)
        assert canary.check(engine, model) < 1e-3
        names = [n for n, _ in model.named_parameters()]
        assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied: one parameter
        with torch.no_grad():
            emb = model.model.embed_tokens.weight
            emb.add_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(0)) * emb.std() * 0.5)
        assert model.lm_head.weight.data_ptr() == emb.data_ptr()
        with pytest.raises(SyncError):
            canary.check(engine, model)  # the engine still has the old embedding and head
        sync_weights(engine, model, dtype=torch.float32, bucket_mb=16)
        assert canary.check(engine, model) < 1e-3
        a2, b2 = both()
        assert a2 == b2 and a2 != a
    finally:
        engine.close()


# ---------------------------------------------------------------------------- the full model, beyond CI's budget


@pytest.mark.recipe_full
def test_full_model_lora_sft_with_held_out_loss(real_model, tmp_path):
    """The reported hang: 3 LoRA steps of the full model, eval loss at the end over eval.loss_max_rows rows (not
    all 500 held-out rows of the quickstart recipe): minutes, with a bar, not a silent quarter of an hour."""
    from optsys.trainers import sft
    from optsys.validation import load_config

    s = sft.train(load_config("quickstart", overrides=[
        "model.name_or_path=smollm2-135m-instruct", "model.dtype=bfloat16", f"output_dir={tmp_path}",
        "trainer.max_steps=3", "model.lora.r=8", "eval.before=false", "eval.after=false", "trainer.plots=false"]))
    assert s["eval/loss_rows"] == 200 and s["eval/loss"] == s["eval/loss"]
