"""Log-likelihood scoring against plain Hugging Face forwards of each sequence alone (fp32)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import optsys.eval.loglik as loglik
import optsys.models.packed as packed
from optsys.data.tasks import get_task
from optsys.eval.loglik import (
    ChoiceItem,
    choice_logprobs,
    corpus_texts,
    multiple_choice_scores,
    perplexity,
    task_choice_items,
)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(tiny_path, request):
    return AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation=request.param).eval()


def enc(tok, text):
    return tok(text, add_special_tokens=False).input_ids


@torch.no_grad()
def plain_logprob(model, ids: list[int], first: int) -> float:
    """Sum of log p(ids[i] | ids[:i]) for i >= first, from one unpacked forward with full logits."""
    logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return sum(float(lp[i - 1, ids[i]]) for i in range(first, len(ids)))


def items_and_expected_ids(tok):
    """Chat and text items of odd lengths, with the (context ids, choice ids) a reader expects for each choice."""
    chat = task_choice_items("arithmetic_reversed", "test", 2, difficulty=2, num_choices=3)
    text = [
        ChoiceItem("Question: what is 12+7? Answer: ", ("19", "twenty one", "18"), 0),  # trailing space moves
        ChoiceItem("The quick brown fox jumps over the", (" lazy dog.", " fox"), 1),
        ChoiceItem("", ("The answer is correct.", "sort"), 0),  # empty context: conditioned on the EOS token
    ]
    expected = []
    for it in chat:
        rendered = tok.apply_chat_template(it.context, add_generation_prompt=True, tokenize=False)
        expected.append([(enc(tok, rendered), enc(tok, c)) for c in it.choices])
    expected.append([(enc(tok, "Question: what is 12+7? Answer:"), enc(tok, " " + c)) for c in text[0].choices])
    expected.append([(enc(tok, text[1].context), enc(tok, c)) for c in text[1].choices])
    expected.append([([tok.eos_token_id], enc(tok, c)) for c in text[2].choices])
    return chat + text, expected


def test_choice_logprobs_match_plain_forwards_packed_one_row_and_many(model, tok, monkeypatch):
    items, expected = items_and_expected_ids(tok)
    want = [[plain_logprob(model, ctx + ch, len(ctx)) for ctx, ch in exp] for exp in expected]
    rows = []
    real = loglik.packed_token_logps
    monkeypatch.setattr(loglik, "packed_token_logps", lambda m, *a, **k: rows.append(list(a[2])) or real(m, *a, **k))
    longest = max(len(ctx) + len(ch) for exp in expected for ctx, ch in exp)
    for max_tokens in (2048, longest + 3):
        rows.clear()
        got = choice_logprobs(model, tok, items, max_tokens=max_tokens)
        for k, (g, w, exp, it) in enumerate(zip(got, want, expected, items)):
            assert [c["logprob"] for c in g] == pytest.approx(w, abs=1e-4), (max_tokens, k)
            assert [c["tokens"] for c in g] == [len(ch) for _, ch in exp]
            assert [c["chars"] for c in g] == [len(c) for c in it.choices]
        assert any(len(r) > 1 for r in rows), rows  # several sequences shared a row
        assert (len(rows) == 1) == (max_tokens == 2048), rows
    assert model.training is False
    # The comparison above is sensitive to attention leaking across packed sequences: a plain causal mask fails it.
    monkeypatch.setattr(packed, "block_diagonal_causal_mask",
                        lambda lens, device, additive_dtype=None: _causal(sum(lens), device, additive_dtype))
    leaky = choice_logprobs(model, tok, items)
    assert max(abs(c["logprob"] - w) for g, ws in zip(leaky, want) for c, w in zip(g, ws)) > 1e-2


def _causal(n, device, additive_dtype):
    mask = torch.ones(n, n, dtype=torch.bool, device=device).tril_()
    if additive_dtype is not None:
        mask = torch.zeros(n, n, dtype=additive_dtype).masked_fill_(~mask, torch.finfo(additive_dtype).min)
    return mask[None, None]


def test_choice_logprobs_restores_training_mode_and_uses_attached_methods(tiny_path, tok):
    m = AutoModelForCausalLM.from_pretrained(tiny_path).train()
    items = [ChoiceItem("1+1=", ("2", "3"), 0)]
    plain = choice_logprobs(m, tok, items)
    assert m.training
    calls = []
    packed.attach_forward_methods(m, {"packed_token_logps": lambda *a, **k: calls.append(1) or
                                      packed.packed_token_logps(*a, **k)})
    assert choice_logprobs(m, tok, items) == plain and calls  # the FSDP-registered method, when a model has it


def test_multiple_choice_scores_argmax_norm_and_ties(monkeypatch, tiny_path, tok):
    m = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    items, _ = items_and_expected_ids(tok)
    lps = choice_logprobs(m, tok, items)
    for s, lp, it in zip(multiple_choice_scores(m, tok, items), lps, items):
        vals = [c["logprob"] for c in lp]
        assert s["pred"] == vals.index(max(vals)) and s["logprobs"] == vals and s["answer"] == it.answer
        assert s["correct"] == (s["pred"] == it.answer)

    # acc_norm differs from acc: the long choice loses in total but wins per character.
    fake = [[{"logprob": -2.0, "tokens": 1, "chars": 1}, {"logprob": -3.0, "tokens": 3, "chars": 6}],
            [{"logprob": -1.0, "tokens": 1, "chars": 2}, {"logprob": -1.0, "tokens": 1, "chars": 2}]]
    monkeypatch.setattr(loglik, "choice_logprobs", lambda *a, **k: fake)
    s = multiple_choice_scores(None, None, [ChoiceItem("q", ("a", "bbbbbb"), 1), ChoiceItem("q", ("xy", "zw"), 1)])
    assert (s[0]["pred"], s[0]["pred_norm"], s[0]["correct"], s[0]["correct_norm"]) == (0, 1, False, True)
    assert (s[1]["pred"], s[1]["pred_norm"], s[1]["correct"]) == (0, 0, False)  # a tie goes to the lowest index


def test_perplexity_matches_plain_forwards_with_windows(tiny_path, tok):
    m = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    texts = corpus_texts("test", 3) + ["Hi", "The answer is correct. " * 5, "7"]
    # every token is scored, the first one too, conditioned on the prefix token (lm-eval's rolling
    # log-likelihood; issue 23, item 12: the first token was context only); this tokenizer has no BOS: EOS
    assert tok.bos_token_id is None
    ids = [[tok.eos_token_id] + enc(tok, t) for t in texts]
    assert max(map(len, ids)) > 20 and len(ids[-1]) == 2  # "7" is one token, and it is scored
    n_bytes = sum(len(t.encode()) for t in texts)
    count = sum(len(x) - 1 for x in ids)
    for max_tokens in (2048, 9):
        # by hand: windows of max_tokens inputs over x[:-1], each predicting the next token, context restarting
        nll = -sum(plain_logprob(m, x[s : min(s + max_tokens, len(x) - 1) + 1], 1)
                   for x in ids for s in range(0, len(x) - 1, max_tokens))
        got = perplexity(m, tok, texts, max_tokens=max_tokens)
        assert got["tokens"] == count and got["texts"] == len(texts) and got["bytes"] == n_bytes
        assert got["nll_per_token"] == pytest.approx(nll / count, abs=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
        assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)


def test_task_choice_items_deterministic_distinct_and_split():
    task = get_task("arithmetic_reversed")
    items = task_choice_items("arithmetic_reversed", "test", 40, difficulty=2, seed=3, num_choices=4)
    assert items == task_choice_items("arithmetic_reversed", "test", 40, difficulty=2, seed=3, num_choices=4)
    assert items != task_choice_items("arithmetic_reversed", "test", 40, difficulty=2, seed=4, num_choices=4)
    problems = task.problems("test", 40, difficulty=2, seed=3)
    for it, p in zip(items, problems, strict=True):
        assert it.context == task.messages(p.prompt)
        assert len(it.choices) == 4 and len(set(it.choices)) == 4
        assert it.choices[it.answer] == p.answer
        assert sum(task.check(c, p.answer) for c in it.choices) == 1
    assert len({it.answer for it in items}) > 1  # shuffled, not always first
    train = task_choice_items("arithmetic_reversed", "train", 200, difficulty=2, seed=3, num_choices=3)
    assert {it.context[-1]["content"] for it in train}.isdisjoint(it.context[-1]["content"] for it in items)
    assert {len(it.choices) for it in train} == {3}
    with pytest.raises(ValueError, match="lower num_choices"):  # a 2-list has one wrong order
        task_choice_items("sorting", "test", 3, difficulty=2, num_choices=4)
    with pytest.raises(ValueError, match="environment"):
        task_choice_items("guess", "test", 3, difficulty=2)


def test_corpus_texts_deterministic_and_split():
    test = corpus_texts("test", 30, seed=1)
    assert test == corpus_texts("test", 30, seed=1) and len(set(test)) == 30
    train = corpus_texts("train", 200, seed=1)
    assert set(train).isdisjoint(test) and set(train).isdisjoint(corpus_texts("test", 30, seed=2))
    assert corpus_texts("train", 5, seed=2) != train[:5]


def test_bad_input_names_the_index(tiny_path, tok):
    m = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    chat = [{"role": "user", "content": "1+1="}]
    ok = ChoiceItem("1+1=", ("2", "3"), 0)
    with pytest.raises(ValueError, match=r"item 1, choice 1 \(''\) tokenizes to no tokens"):
        choice_logprobs(m, tok, [ok, ChoiceItem(chat, ("2", ""), 0)])
    with pytest.raises(ValueError, match="item 2, choice 0: context \\+ choice is .* over max_tokens=12"):
        choice_logprobs(m, tok, [ok, ok, ChoiceItem("1+1=" * 5, ("2", "3"), 0)], max_tokens=12)
    with pytest.raises(ValueError, match="item 0: answer 2"):
        choice_logprobs(m, tok, [ChoiceItem(chat, ("2", "3"), 2)])
    with pytest.raises(ValueError, match="text 1 is empty"):
        perplexity(m, tok, ["fine text", ""])
