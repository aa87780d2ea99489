"""Test-time methods on the rollout engine interface, each counting the tokens it generates.

    greedy            one completion at temperature 0
    sample            a pool of N samples per question: pass@k (the oracle: some sample is right)
    self_consistency  the same pool: majority vote over canonical answers (maj@k, unbiased from the pool)
    best_of_n         the same pool: the sample a scorer (reward model, verifier) likes best (best-of-N@k, unbiased)
    self_correct      answer, then up to R rounds of critique-and-revise (or verify-then-revise with a verifier)
    budget            chain of thought cut at a thinking-token budget (answer forced), optionally extended with
                      "Wait" when the model stops early (budget forcing, s1), on token ids

Every method returns, per question, its samples (text, generated tokens, canonical answer, correct) and curve
points {x, accuracy, tokens_per_question}, so methods share one accuracy-vs-generated-tokens axis. The pool
methods estimate every k <= N from one pool of N samples (the unbiased estimators of optsys.eval.metrics), so a
curve over N = 1..16 costs 16 samples per question, not 1 + 2 + ... + 16, and its points are not the first-k
prefix of one draw. Expected tokens at k are k times the question's mean tokens per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from optsys.data.answers import answers_match, canonical_answer, canonical_reference
from optsys.eval.metrics import best_of_n, best_of_n_at_k, maj_at_k, majority_vote, pass_at_k
from optsys.eval.tasks import Question
from optsys.rollout.engine import EngineError, Sampling, stable_seed

METHODS = ("greedy", "sample", "self_consistency", "best_of_n", "self_correct", "budget")
POOL_METHODS = ("sample", "self_consistency", "best_of_n")


@dataclass
class Sample:
    text: str
    tokens: int  # tokens the engine generated for it (every round / phase included)
    answer: str | None  # canonical answer; None = unparsed
    correct: bool
    finish: str = "stop"
    score: float | None = None  # best_of_n: the scorer's value
    mean_logprob: float | None = None  # the sampler's mean log-prob per token (the `confidence` scorer)


@dataclass
class MethodSettings:
    n: list[int] = field(default_factory=lambda: [1])  # pool sizes / k values (pool methods)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    rounds: int = 2  # self_correct
    critique: str = ("Review your answer above. If it is correct, repeat it exactly; if it is wrong, reply with "
                     "the corrected answer only.")
    budgets: list[int] = field(default_factory=lambda: [64])  # budget: thinking tokens
    extend: int = 0  # budget: "Wait" extensions when the model stops thinking early
    answer_tokens: int = 16  # budget: tokens for the forced answer
    think_open: str = "<think>\n"
    think_close: str = "</think>"
    wait: str = "Wait"
    max_model_len: int = 2048


def _sampling(s: MethodSettings, *, n: int = 1, temperature: float | None = None, max_new_tokens: int | None = None):
    return Sampling(n=n, temperature=s.temperature if temperature is None else temperature, top_p=s.top_p,
                    top_k=s.top_k, max_new_tokens=max_new_tokens or s.max_new_tokens, stop_token_ids=s.stop_token_ids)


def render(tokenizer, messages) -> list[int]:
    """Chat prompt token ids, generation prompt included (rendered here so every engine sees the same tokens)."""
    return list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def check_context(prompts: list[list[int]], new_tokens: int, max_model_len: int, questions: list[Question]) -> None:
    """Refuse before generating when a prompt plus its new tokens cannot fit the engine's context."""
    for q, p in zip(questions, prompts):
        if len(p) + new_tokens > max_model_len:
            raise EngineError(f"question {q.id}: its prompt has {len(p)} tokens and {new_tokens} new tokens are asked "
                              f"for: {len(p) + new_tokens} > the engine's context of {max_model_len} tokens. Raise "
                              f"max_model_len (the model must support it) or lower max_new_tokens / the budget")


def _score(tokenizer, token_ids, finish: str, reference: str, match: str, tokens: int | None = None,
           logprobs=()) -> Sample:
    text = tokenizer.decode(list(token_ids), skip_special_tokens=True)
    answer = canonical_answer(text, match)
    mean_lp = sum(logprobs) / len(logprobs) if logprobs else None
    return Sample(text, len(token_ids) if tokens is None else tokens, answer,
                  answers_match(answer, reference, match), finish, mean_logprob=mean_lp)


def question_seeds(seed: int, task: str, questions: list[Question], *parts) -> list[int]:
    """One seed per question from its id: the same samples whatever the batch, the engine or the model compared."""
    return [stable_seed(seed, task, q.id, *parts) for q in questions]


def references(questions: list[Question], match: str) -> list[str]:
    return [canonical_reference(q.answer, match) for q in questions]


# ---------------------------------------------------------------------------- single-pass methods


def greedy(engine, tokenizer, task: str, questions: list[Question], s: MethodSettings, match: str):
    prompts = [render(tokenizer, q.messages) for q in questions]
    check_context(prompts, s.max_new_tokens, s.max_model_len, questions)
    outs = engine.generate(prompts, _sampling(s, temperature=0.0), question_seeds(s.seed, task, questions))
    refs = references(questions, match)
    samples = [[_score(tokenizer, g[0].token_ids, g[0].finish_reason, r, match)] for g, r in zip(outs, refs)]
    per_q = [float(x[0].correct) for x in samples]
    point = {"x": 1, "per_question": per_q, "tokens": [x[0].tokens for x in samples]}
    return samples, [point], [{"answer": x[0].answer, "correct": x[0].correct} for x in samples]


def sample_pool(engine, tokenizer, task: str, questions: list[Question], s: MethodSettings, match: str):
    """max(s.n) samples per question at s.temperature, one seed per question (shared by every pool method)."""
    prompts = [render(tokenizer, q.messages) for q in questions]
    check_context(prompts, s.max_new_tokens, s.max_model_len, questions)
    outs = engine.generate(prompts, _sampling(s, n=max(s.n)), question_seeds(s.seed, task, questions, "pool"))
    refs = references(questions, match)
    return [[_score(tokenizer, c.token_ids, c.finish_reason, r, match, logprobs=c.logprobs) for c in g]
            for g, r in zip(outs, refs)]


def pool_curve(method: str, pool: list[list[Sample]], ks: list[int]) -> tuple[list[dict], list[dict]]:
    """Curve points for k in ks from one pool, and each question's final pick at k = N."""
    points = []
    for k in ks:
        per_q = []
        for samples in pool:
            correct = [x.correct for x in samples]
            if method == "sample":
                per_q.append(pass_at_k(len(samples), sum(correct), k))
            elif method == "self_consistency":
                per_q.append(maj_at_k([x.answer for x in samples], correct, k))
            else:
                per_q.append(best_of_n_at_k([_finite(x.score) for x in samples], correct, k))
        tokens = [k * sum(x.tokens for x in samples) / len(samples) for samples in pool]
        points.append({"x": k, "per_question": per_q, "tokens": tokens})
    finals = []
    for samples in pool:
        if method == "self_consistency":
            vote = majority_vote([x.answer for x in samples])
            ok = next((x.correct for x in samples if x.answer == vote), False) if vote is not None else False
            finals.append({"answer": vote, "correct": ok})
        elif method == "best_of_n":
            pick = samples[best_of_n([_finite(x.score) for x in samples])]
            finals.append({"answer": pick.answer, "correct": pick.correct, "chosen": samples.index(pick)})
        else:
            finals.append({"answer": None, "correct": any(x.correct for x in samples)})
    return points, finals


def _finite(score: float | None) -> float:
    return float("nan") if score is None else float(score)


CONFIDENCE = "confidence"  # the built-in scorer: the sampler's mean log-prob per token (no extra compute)


def score_pool(pool: list[list[Sample]], questions: list[Question], scorer: Callable[[list[tuple]], list[float]] | str):
    """Give every sample its scorer value (best_of_n); `scorer` takes [(prompt, completion, answer)], or is
    CONFIDENCE: the model's own mean token log-prob under the sampling distribution (self-certainty).

    The answer passed is always None: a scorer that saw the reference would turn best-of-N into pass@k (an
    oracle), so it never sees it (optsys.eval.config refuses the reference rewards as scorers by name)."""
    if scorer == CONFIDENCE:
        for samples in pool:
            for x in samples:
                if x.mean_logprob is None:
                    raise EngineError("scorer=confidence needs the sampler's log-probs, and this engine returned "
                                      "none (an endpoint without logprobs support?); use another scorer")
                x.score = x.mean_logprob
        return
    flat = [(q.prompt, x.text, None) for q, samples in zip(questions, pool) for x in samples]  # no gold: see above
    values = iter(scorer(flat))
    for samples in pool:
        for x in samples:
            x.score = next(values)


# ---------------------------------------------------------------------------- self-correction


def self_correct(engine, tokenizer, task: str, questions: list[Question], s: MethodSettings, match: str,
                 verifier: Callable[[list[tuple]], list[float]] | None = None):
    """Round 0 answers; each later round shows the model its answer and asks it to critique and revise.

    Without a verifier the model reviews every answer and a round that repeats the previous answer ends that
    question (it stands by it). With a verifier (a scorer: reward model or function; > 0.5 = accepted) only rejected
    answers get a revision round; like a best_of_n scorer it is given answer=None, never the reference (with it,
    self-correction would be an oracle that stops exactly at the right answer). Points x = rounds used (0..R):
    accuracy of the answer held after that round, tokens generated up to it."""
    refs = references(questions, match)
    conversations = [list(q.messages) for q in questions]
    held: list[Sample | None] = [None] * len(questions)
    history: list[list[Sample]] = [[] for _ in questions]
    done = [False] * len(questions)
    tokens = [0] * len(questions)
    points = []
    for rnd in range(s.rounds + 1):
        todo = [i for i in range(len(questions)) if not done[i]]
        if todo:
            prompts = [render(tokenizer, conversations[i]) for i in todo]
            check_context(prompts, s.max_new_tokens, s.max_model_len, [questions[i] for i in todo])
            seeds = [stable_seed(s.seed, task, questions[i].id, "correct", rnd) for i in todo]
            outs = engine.generate(prompts, _sampling(s), seeds)
            for i, g in zip(todo, outs):
                c = g[0]
                new = _score(tokenizer, c.token_ids, c.finish_reason, refs[i], match)
                tokens[i] += new.tokens
                if rnd > 0 and verifier is None and held[i] is not None and new.answer == held[i].answer:
                    done[i] = True  # the model stands by its answer
                held[i] = new
                history[i].append(new)
                conversations[i] = conversations[i] + [{"role": "assistant", "content": new.text},
                                                       {"role": "user", "content": s.critique}]
            if verifier is not None:
                verdicts = verifier([(questions[i].prompt, held[i].text, None) for i in todo])  # no gold
                for i, v in zip(todo, verdicts):
                    done[i] = done[i] or (v is not None and v > 0.5)
        points.append({"x": rnd, "per_question": [float(h.correct) for h in held], "tokens": list(tokens)})
    finals = [{"answer": h.answer, "correct": h.correct, "rounds": len(history[i]) - 1} for i, h in enumerate(held)]
    return history, points, finals


# ---------------------------------------------------------------------------- thinking budgets


def _find(seq: list[int], sub: list[int]) -> int:
    """Index of the first occurrence of sub in seq, or -1."""
    n = len(sub)
    for i in range(len(seq) - n + 1):
        if seq[i: i + n] == sub:
            return i
    return -1


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []


def budget_forcing(engine, prompts: list[list[int]], seeds: list[int], sampling: Sampling, *, budget: int,
                   extend: int, close_ids: list[int], wait_ids: list[int], answer_tokens: int) -> list[dict]:
    """Thinking cut at `budget` tokens, extended with `wait_ids` up to `extend` times when it ends early; on ids.

    prompts already end where thinking starts (the chat prompt + the opening tag). Per prompt returns
    {"thinking": ids kept, "answer": ids, "generated": every token the engine generated, "forced": the budget
    cut the thinking, "extensions": Waits appended}. Thinking that closes itself and finishes its answer in the
    same call keeps that answer; an answer it began but the budget's call cut short is continued (up to
    answer_tokens in all), not generated again; otherwise the answer is generated after `close_ids`, up to
    answer_tokens. While an extension is due and the close tag is one token, the engine stops at it (as s1 stops
    at the end-of-thinking delimiter), so no answer is generated only to be replaced by the Wait; a close tag of
    several tokens cannot be a stop token, and what follows it in that call is generated, counted and dropped."""
    if budget < 1 or not close_ids:
        raise ValueError(f"budget forcing needs budget >= 1 and a close tag, got budget={budget}, close={close_ids}")
    stops = set(sampling.stop_token_ids)
    stop_at_close = len(close_ids) == 1
    state = [{"thinking": [], "answer": None, "partial": [], "generated": 0, "forced": False, "extensions": 0}
             for _ in prompts]
    active = list(range(len(prompts)))
    call = 0
    while active:
        groups: dict[tuple[int, bool], list[int]] = {}  # one engine call per (remaining budget, stop at close)
        for i in active:
            room = budget - len(state[i]["thinking"])
            if room > 0:
                groups.setdefault((room, stop_at_close and state[i]["extensions"] < extend), []).append(i)
            else:
                state[i]["forced"] = True  # a Wait filled the budget
        next_active = []
        for (room, at_close), idx in sorted(groups.items()):
            stop_ids = tuple(sampling.stop_token_ids) + (tuple(close_ids) if at_close else ())
            outs = engine.generate([prompts[i] + state[i]["thinking"] for i in idx],
                                   replace(sampling, n=1, max_new_tokens=room, stop_token_ids=stop_ids),
                                   [seeds[i] + 7919 * call for i in idx])
            for i, g in zip(idx, outs):
                st, c = state[i], g[0]
                out = list(c.token_ids)
                st["generated"] += len(out)
                at = _find(out, close_ids)
                if at < 0:
                    ended = bool(out) and out[-1] in stops
                    body = out[:-1] if ended else out
                    if ended and st["extensions"] < extend and len(st["thinking"]) + len(body) < budget:
                        st["thinking"] += body + wait_ids  # stopped without closing: keep thinking
                        st["extensions"] += 1
                        next_active.append(i)
                    else:
                        st["thinking"] += body
                        st["forced"] = not ended  # the budget ran out (or the turn ended: answer from here)
                    continue
                st["thinking"] += out[:at]
                tail = out[at + len(close_ids):]
                if st["extensions"] < extend and len(st["thinking"]) < budget:
                    st["thinking"] += wait_ids  # s1: suppress the end of thinking, append "Wait"
                    st["extensions"] += 1
                    next_active.append(i)
                elif c.finish_reason == "stop" and tail:
                    st["answer"] = tail  # closed and answered within the budget
                else:
                    st["partial"] = tail  # closed; its answer not begun, or cut by the call's room: continued below
        active = next_active
        call += 1
    need: dict[int, list[int]] = {}  # one engine call per number of answer tokens still to generate
    for i, st in enumerate(state):
        if st["answer"] is None:
            left = answer_tokens - len(st["partial"])
            if left > 0:
                need.setdefault(left, []).append(i)
            else:
                st["answer"] = st["partial"]  # the cut answer is already answer_tokens long
    for left, idx in sorted(need.items()):
        outs = engine.generate([prompts[i] + state[i]["thinking"] + close_ids + state[i]["partial"] for i in idx],
                               replace(sampling, n=1, max_new_tokens=left), [seeds[i] + 104729 for i in idx])
        for i, g in zip(idx, outs):
            state[i]["answer"] = state[i]["partial"] + list(g[0].token_ids)
            state[i]["generated"] += len(g[0].token_ids)
    for st in state:
        del st["partial"]
    return state


def budget(engine, tokenizer, task: str, questions: list[Question], s: MethodSettings, match: str):
    """Points x = budget: accuracy and tokens generated per question at each thinking budget."""
    refs = references(questions, match)
    open_ids, close_ids, wait_ids = (_encode(tokenizer, t) for t in (s.think_open, s.think_close, s.wait))
    prompts = [render(tokenizer, q.messages) + open_ids for q in questions]
    points, history = [], [[] for _ in questions]
    for b in s.budgets:
        check_context(prompts, b + len(wait_ids) * s.extend + len(close_ids) + s.answer_tokens, s.max_model_len,
                      questions)
        seeds = question_seeds(s.seed, task, questions, "budget", b)
        states = budget_forcing(engine, prompts, seeds, _sampling(s), budget=b, extend=s.extend, close_ids=close_ids,
                                wait_ids=wait_ids, answer_tokens=s.answer_tokens)
        for i, st in enumerate(states):
            ids = st["thinking"] + close_ids + st["answer"]
            x = _score(tokenizer, ids, "forced" if st["forced"] else "stop", refs[i], match, tokens=st["generated"])
            history[i].append(x)
        points.append({"x": b, "per_question": [float(h[-1].correct) for h in history],
                       "tokens": [h[-1].tokens for h in history]})
    finals = [{"answer": h[-1].answer, "correct": h[-1].correct} for h in history]
    return history, points, finals
