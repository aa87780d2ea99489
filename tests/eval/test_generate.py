"""Greedy evaluation stops where the model stops: generation_config's stop ids and the chat template's turn end."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optsys.eval.generate import end_of_turn_id, stop_token_ids
from optsys.eval.scaling import MethodSettings, greedy
from optsys.eval.tasks import Question
from optsys.rollout.hf_engine import HFEngine

MAX_NEW = 6
PROMPTS = [[{"role": "user", "content": "1+2="}], [{"role": "user", "content": "3+4="}]]


def generate_greedy(model, tok, conversations, *, max_new_tokens, batch_size):
    """The eval path: optsys.eval.scaling.greedy on the HF engine, batched, stopping at stop_token_ids."""
    engine = HFEngine(model, pad_token_id=tok.pad_token_id, greedy_batch=batch_size)
    settings = MethodSettings(max_new_tokens=max_new_tokens, stop_token_ids=tuple(stop_token_ids(model, tok)))
    questions = [Question(str(i), tuple(c), "") for i, c in enumerate(conversations)]
    samples, _, _ = greedy(engine, tok, "t", questions, settings, "exact")
    return [x[0].text for x in samples]


def script(model, tokens: list[int]):
    """Make greedy decoding emit `tokens` in order, the last one repeated (one generate call: the k-th lm_head call
    gives every row the k-th token)."""
    calls = []

    def hook(module, args, out):
        k = min(len(calls), len(tokens) - 1)
        calls.append(k)
        logits = torch.full_like(out, -1e4)
        logits[..., tokens[k]] = 0.0
        return logits

    model.get_output_embeddings().register_forward_hook(hook)
    return model


@pytest.fixture
def model_and_tokenizer(tiny_path):
    tok = AutoTokenizer.from_pretrained(tiny_path)
    tok.eos_token = "<|endoftext|>"  # as in base checkpoints: the tokenizer's eos is not the turn end
    return AutoModelForCausalLM.from_pretrained(tiny_path).eval(), tok


def test_generation_config_stop_list_ends_the_completion(model_and_tokenizer):
    model, tok = model_and_tokenizer
    seven, eight, im_start = (tok.convert_tokens_to_ids(t) for t in ("7", "8", "<|im_start|>"))
    # a second stop id that only the generation config knows (like Llama 3's <|eom_id|>)
    model.generation_config.eos_token_id = [tok.eos_token_id, im_start]
    script(model, [seven, im_start, eight])
    assert generate_greedy(model, tok, PROMPTS, max_new_tokens=MAX_NEW, batch_size=2) == ["7", "7"]


def test_chat_template_end_of_turn_ends_the_completion(model_and_tokenizer):
    model, tok = model_and_tokenizer
    seven, eight, im_end = (tok.convert_tokens_to_ids(t) for t in ("7", "8", "<|im_end|>"))
    model.generation_config.eos_token_id = tok.eos_token_id  # <|endoftext|> only
    assert end_of_turn_id(tok) == im_end
    script(model, [seven, im_end, eight])
    assert generate_greedy(model, tok, PROMPTS, max_new_tokens=MAX_NEW, batch_size=2) == ["7", "7"]


def test_stop_token_ids_union_in_order(model_and_tokenizer):
    model, tok = model_and_tokenizer
    endoftext, im_start, im_end = (tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>",
                                                                           "<|im_end|>"))
    model.generation_config.eos_token_id = [im_start, endoftext]
    assert stop_token_ids(model, tok) == [im_start, endoftext, im_end]
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"  # no special turn end
    model.generation_config.eos_token_id = None
    assert stop_token_ids(model, tok) == [endoftext]
