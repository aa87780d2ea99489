"""Log-likelihood scoring: multiple choice (lm-eval's acc / acc_norm) and perplexity, from packed rows.

Every scored sequence is packed with others into [1, T] rows (T <= max_tokens) with position_ids restarting per
sequence and a block-diagonal causal mask (optsys.models.packed), and its log-probs come from the fused token
log-prob kernel at the scored positions only: no [tokens x vocab] logits exist for a row.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from dataclasses import dataclass

import torch

from optsys.data.packing import pack_best_fit_decreasing
from optsys.data.tasks import Task, get_task, normalize_answer
from optsys.models.packed import packed_token_logps

IGNORE = -100


@dataclass(frozen=True)
class ChoiceItem:
    """A question and its candidate answers; `answer` indexes the correct choice.

    `context` is plain text, or chat messages (rendered with the tokenizer's chat template and
    add_generation_prompt=True, so a choice is the assistant's reply text)."""

    context: str | list[dict]
    choices: tuple[str, ...]
    answer: int


@dataclass
class _Seq:
    """One sequence to feed: input ids and, per position, the token scored there (-100: not scored)."""

    ids: list[int]
    targets: list[int]


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _render(tokenizer, context: str | list[dict]) -> tuple[str, bool]:
    """(context text, whether it is a chat rendering)."""
    if isinstance(context, str):
        return context, False
    if tokenizer.chat_template is None:
        raise ValueError("a chat context needs the tokenizer's chat template, and this tokenizer has none; set "
                         "tokenizer.chat_template or pass the context as plain text")
    return tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False), True


def _prefix_token(tokenizer) -> int:
    """What an empty text context and a perplexity text start from (lm-eval's prefix token): BOS, else EOS."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ValueError("an empty text context (or a perplexity text) needs a BOS or EOS token to condition on; "
                         "this tokenizer has neither")
    return tid


def _sequence_logprobs(model, seqs: list[_Seq], *, max_tokens: int, backend: str) -> list[float]:
    """Sum of log p(target) over each sequence's scored positions, packing sequences into rows of <= max_tokens.

    Goes through `model.packed_token_logps` when attached (what FSDP2 registers as a forward). Sums are
    accumulated in float64 so that a long text's total does not lose the last digits of its tokens."""
    fn = getattr(model, "packed_token_logps", None) or functools.partial(packed_token_logps, model)
    device = next(model.parameters()).device
    out = [0.0] * len(seqs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for row in pack_best_fit_decreasing([len(s.ids) for s in seqs], max_tokens):
                lens = [len(seqs[i].ids) for i in row]
                ids = torch.tensor([t for i in row for t in seqs[i].ids], dtype=torch.long, device=device)
                targets = torch.tensor([t for i in row for t in seqs[i].targets], dtype=torch.long, device=device)
                positions = torch.cat([torch.arange(n, dtype=torch.long) for n in lens]).to(device)
                logps, _ = fn(ids[None], positions[None], lens, targets[None], backend=backend)  # [N], N = scored
                seg = torch.repeat_interleave(torch.arange(len(row), device=device),
                                              torch.tensor(lens, device=device))
                sums = torch.zeros(len(row), dtype=torch.float64, device=device)
                sums.index_add_(0, seg[targets != IGNORE], logps.double())
                for i, s in zip(row, sums.tolist()):
                    out[i] = s
    finally:
        model.train(was_training)
    return out


def choice_logprobs(model, tokenizer, items: list[ChoiceItem], *, max_tokens: int = 2048,
                    backend: str = "auto") -> list[list[dict]]:
    """Per item, per choice: {"logprob": sum log p(choice tokens | context), "tokens": n, "chars": len(choice)}.

    Context and choice are tokenized separately (no special tokens added: a chat template writes its own) and
    their ids concatenated; the trailing whitespace of a text context moves onto the choice, as lm-eval does, so
    "Answer: " + "Paris" scores " Paris". An empty text context becomes the BOS (else EOS) token. Each
    context+choice is its own packed sequence; a shared context is re-run once per choice (simple and exact
    under every attention backend, flash-attention's varlen included)."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 (a context token and a choice token), got {max_tokens}")
    contexts, choice_texts = [], []
    for k, item in enumerate(items):
        if not item.choices:
            raise ValueError(f"item {k}: no choices")
        if not 0 <= item.answer < len(item.choices):
            raise ValueError(f"item {k}: answer {item.answer} is not an index of its {len(item.choices)} choices")
        text, chat = _render(tokenizer, item.context)
        move = "" if chat else text[len(text.rstrip()):]
        contexts.append(text[: len(text) - len(move)])
        choice_texts.append([move + c for c in item.choices])
    ctx_ids = _encode(tokenizer, contexts)
    flat = _encode(tokenizer, [c for cs in choice_texts for c in cs])
    seqs, counts = [], []
    for k, item in enumerate(items):
        ctx = ctx_ids[k] or [_prefix_token(tokenizer)]
        for j in range(len(item.choices)):
            cont = flat[len(seqs)]
            if not cont:
                raise ValueError(f"item {k}, choice {j} ({item.choices[j]!r}) tokenizes to no tokens; give every "
                                 "choice some text")
            if len(ctx) + len(cont) > max_tokens:
                raise ValueError(f"item {k}, choice {j}: context + choice is {len(ctx) + len(cont)} tokens, over "
                                 f"max_tokens={max_tokens}; raise max_tokens or shorten the context")
            # The last choice token is only a target: feed ctx + cont[:-1], score cont at the positions before it.
            seqs.append(_Seq(ctx + cont[:-1], [IGNORE] * (len(ctx) - 1) + cont))
            counts.append(len(cont))
    sums = _sequence_logprobs(model, seqs, max_tokens=max_tokens, backend=backend)
    out, n = [], 0
    for item in items:
        out.append([{"logprob": sums[n + j], "tokens": counts[n + j], "chars": len(c)}
                    for j, c in enumerate(item.choices)])
        n += len(item.choices)
    return out


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])  # max keeps the first of equal keys: ties go low


def score_item(logprobs: list[dict], answer: int) -> dict:
    """One item's multiple-choice scores from its choices' log-probs (lm-eval's acc and acc_norm)."""
    pred = _argmax([c["logprob"] for c in logprobs])
    pred_norm = _argmax([c["logprob"] / c["chars"] for c in logprobs])
    return {"pred": pred, "pred_norm": pred_norm, "correct": pred == answer, "correct_norm": pred_norm == answer,
            "logprobs": [c["logprob"] for c in logprobs], "answer": answer}


def multiple_choice_scores(model, tokenizer, items: list[ChoiceItem], **kw) -> list[dict]:
    """Per item: pred (argmax log-prob), pred_norm (argmax log-prob / characters), correct, correct_norm,
    logprobs and answer. Ties go to the lowest index. `kw` goes to `choice_logprobs`."""
    return [score_item(lp, item.answer) for lp, item in zip(choice_logprobs(model, tokenizer, items, **kw), items)]


def perplexity(model, tokenizer, texts: list[str], *, max_tokens: int = 2048, backend: str = "auto") -> dict:
    """Token-level perplexity of a set of texts: exp(-sum log p / count) over every token of every text.

    As lm-eval's rolling log-likelihood: each text is tokenized without special tokens and conditioned on the
    prefix token (BOS, else EOS), so its first token is scored too. The sequence [prefix] + tokens is fed as
    consecutive, non-overlapping windows of max_tokens input tokens over all but its last token, each position
    predicting the next: every text token is scored exactly once, and the model's context restarts at each window
    (the first predictions of a window see little context; the count does not depend on max_tokens).
    bits_per_byte = sum nll / ln 2 / UTF-8 bytes of the texts."""
    if not texts:
        raise ValueError("perplexity needs at least one text")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    for k, t in enumerate(texts):
        if not isinstance(t, str) or not t:
            raise ValueError(f"text {k} is empty (or not a string); every text needs at least one token")
    prefix = _prefix_token(tokenizer)
    ids = _encode(tokenizer, texts)
    seqs = []
    for k, x in enumerate(ids):
        if not x:
            raise ValueError(f"text {k} tokenizes to no tokens")
        x = [prefix] + x
        for s in range(0, len(x) - 1, max_tokens):
            e = min(s + max_tokens, len(x) - 1)
            seqs.append(_Seq(x[s:e], x[s + 1 : e + 1]))
    count = sum(len(x) for x in ids)
    n_bytes = sum(len(t.encode()) for t in texts)
    nll = -sum(_sequence_logprobs(model, seqs, max_tokens=max_tokens, backend=backend))
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "tokens": count,
            "bits_per_byte": nll / math.log(2) / n_bytes, "bytes": n_bytes, "texts": len(texts)}


def task_choice_items(task_name: str, split: str, n: int, *, difficulty: int, seed: int = 0,
                      num_choices: int = 4) -> list[ChoiceItem]:
    """Multiple-choice items from a built-in task: its chat prompt, the correct answer and distinct wrong ones.

    Wrong answers come from `task.wrong`, drawn until `num_choices` distinct ones (distinct after the task's answer
    normalization); the order is shuffled. Deterministic for (task, split, difficulty, seed); the problems are
    `task.problems(split, ...)`, so the held-out split never meets the training one."""
    task = get_task(task_name)
    if not isinstance(task, Task):
        raise ValueError(f"task {task_name!r} is played against an environment and has no wrong answers to choose "
                         "among; use arithmetic, arithmetic_reversed or sorting")
    if num_choices < 2:
        raise ValueError(f"num_choices must be >= 2, got {num_choices}")
    rng = random.Random(f"{task_name}-choices-{split}-{difficulty}-{seed}")
    items = []
    for p in task.problems(split, n, difficulty=difficulty, seed=seed):
        choices, seen = [p.answer], {normalize_answer(p.answer)}
        draws = 0
        while len(choices) < num_choices:
            draws += 1
            if draws > 100 * num_choices:
                raise ValueError(f"task {task_name}: problem {p.prompt!r} gave only {len(choices) - 1} distinct wrong "
                                 f"answers in {draws - 1} draws, fewer than num_choices - 1 = {num_choices - 1}; "
                                 "lower num_choices")
            w = task.wrong(p, rng)
            if normalize_answer(w) not in seen:
                seen.add(normalize_answer(w))
                choices.append(w)
        rng.shuffle(choices)
        items.append(ChoiceItem(task.messages(p.prompt), tuple(choices), choices.index(p.answer)))
    return items


_WORDS = ("the quick brown fox jumps over a lazy dog language model predicts next token from tokens before it "
          "fine-tuning teaches answer in given format preference optimization which of two answers people prefer "
          "reinforcement learning rewards answers that checker verifies sum numbers sort list ascending order "
          "correct wrong think step by step then give final").split()


def _corpus_text(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 14))]
    sentence = " ".join(words).capitalize() + "."
    a, b = rng.randrange(10 ** rng.randint(1, 4)), rng.randrange(10 ** rng.randint(1, 4))
    xs = [rng.randrange(100) for _ in range(rng.randint(2, 6))]
    listed = f"sort: {' '.join(map(str, xs))} -> {' '.join(map(str, sorted(xs)))}"
    parts = [sentence, f"Compute: {a}+{b}={a + b}.", listed]
    rng.shuffle(parts)
    return " ".join(parts[: rng.randint(1, 3)])


def corpus_texts(split: str, n: int, seed: int = 0) -> list[str]:
    """`n` distinct short texts for perplexity, in the style of the tiny tokenizer's corpus (its prose words,
    sums, sorted lists), from a deterministic generator rather than `builtin_corpus` itself. A text's split is
    fixed by a hash of the text (1 in 8 is "test"), so train and test never share a text whatever the seed."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"corpus-{split}-{seed}")
    out, seen = [], set()
    for _ in range(100 * n + 1000):
        if len(out) == n:
            return out
        t = _corpus_text(rng)
        h = int.from_bytes(hashlib.blake2b(t.encode(), digest_size=4).digest(), "little")
        if t not in seen and ("test" if h % 8 == 0 else "train") == split:
            seen.add(t)
            out.append(t)
    raise ValueError(f"could not draw {n} distinct {split} texts; ask for fewer")
