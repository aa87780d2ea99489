"""Test-time methods on the engine interface, with scripted engines (exact control of what is generated)."""

import pytest

from optsys.eval.metrics import maj_at_k
from optsys.eval.scaling import (
    MethodSettings,
    budget_forcing,
    greedy,
    pool_curve,
    sample_pool,
    score_pool,
    self_correct,
)
from optsys.eval.tasks import Question
from optsys.rollout.engine import Completion, EngineError, Sampling


class TextEngine:
    """Answers with text: script(prompt_text, sampling, seed, call) -> list of n strings."""

    def __init__(self, tokenizer, script):
        self.tok, self.script, self.calls = tokenizer, script, []

    def generate(self, prompts, sampling, seeds):
        out = []
        for p, seed in zip(prompts, seeds):
            text = self.tok.decode(p)
            self.calls.append((text, sampling, seed))
            group = []
            for s in self.script(text, sampling, seed, len(self.calls)):
                ids = tuple(self.tok(s, add_special_tokens=False).input_ids) + (self.tok.eos_token_id,)
                group.append(Completion(ids, (0.0,) * len(ids), "stop"))
            out.append(group)
        return out


def _questions(n=3):
    return [Question(f"q{i}", ({"role": "user", "content": f"{i}+{i}="},), str(2 * i)) for i in range(n)]


def test_self_consistency_picks_the_majority_and_estimates_without_bias(tok):
    # question 0: the right answer 0 is the majority; question 1: a wrong answer wins; question 2: unparsed + a tie
    pools = {"0+0=": ["0", "0", "5", "0", "7"], "1+1=": ["3", "3", "2", "3", "3"], "2+2=": ["", "4", "9", "", ""]}
    engine = TextEngine(tok, lambda text, s, seed, call: next(v for k, v in pools.items() if k in text))
    qs = _questions()
    s = MethodSettings(n=[1, 3, 5], temperature=1.0)
    pool = sample_pool(engine, tok, "t", qs, s, "exact")
    assert [len(p) for p in pool] == [5, 5, 5] and engine.calls[0][1].n == 5
    points, finals = pool_curve("self_consistency", pool, s.n)
    assert [f["answer"] for f in finals] == ["0", "3", "4"]  # q2: 4 and 9 tie, unparsed excluded, min wins
    assert [f["correct"] for f in finals] == [True, False, True]
    assert points[-1]["per_question"] == [1.0, 0.0, 1.0]  # k = N is the vote of the whole pool
    assert points[0]["per_question"][0] == pytest.approx(3 / 5)  # k = 1: the fraction right
    k3 = [maj_at_k([x.answer for x in p], [x.correct for x in p], 3) for p in pool]
    assert points[1]["per_question"] == pytest.approx(k3)
    # tokens at k: k times the question's mean tokens per sample
    mean0 = sum(x.tokens for x in pool[0]) / 5
    assert points[1]["tokens"][0] == pytest.approx(3 * mean0)


def test_best_of_n_follows_the_scorer_and_pass_at_k_is_the_oracle(tok):
    engine = TextEngine(tok, lambda text, s, seed, call: ["7", "2", "9"] if "1+1" in text else ["0", "5", "6"])
    qs = _questions(2)
    s = MethodSettings(n=[1, 3], temperature=1.0)
    pool = sample_pool(engine, tok, "t", qs, s, "exact")
    # a scorer that likes longer... here: likes the digit 2 and 0, i.e. the right answers
    score_pool(pool, qs, lambda rows: [1.0 if c.strip() in ("2", "0") else float(len(c)) * 0.01 for _, c, _ in rows])
    points, finals = pool_curve("best_of_n", pool, s.n)
    assert [f["chosen"] for f in finals] == [0, 1] and all(f["correct"] for f in finals)
    assert points[-1]["per_question"] == [1.0, 1.0]
    assert points[0]["per_question"] == pytest.approx([1 / 3, 1 / 3])
    pts, _ = pool_curve("sample", pool, s.n)
    assert pts[-1]["per_question"] == [1.0, 1.0] and pts[0]["per_question"] == pytest.approx([1 / 3, 1 / 3])


def test_greedy_uses_temperature_zero_and_counts_unparsed(tok):
    engine = TextEngine(tok, lambda text, s, seed, call: ["<think>never closed"] if "0+0" in text else ["2"])
    samples, points, finals = greedy(engine, tok, "t", _questions(2), MethodSettings(), "exact")
    assert all(c[1].temperature == 0.0 for c in engine.calls)
    assert samples[0][0].answer is None and not samples[0][0].correct  # unparsed counts as wrong
    assert points[0]["per_question"] == [0.0, 1.0]


def test_self_correct_revises_and_stops_when_the_model_stands_by_its_answer(tok):
    # q0: wrong, then revised to right, then repeats it (stops); q1: right, and repeats it at once
    def script(text, s, seed, call):
        turns = text.count("Review your answer")
        if "0+0" in text:
            return [["5", "0", "0", "0"][turns]]
        return ["2"]

    engine = TextEngine(tok, script)
    history, points, finals = self_correct(engine, tok, "t", _questions(2), MethodSettings(rounds=3), "exact")
    assert [p["per_question"] for p in points] == [[0.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    assert [len(h) for h in history] == [3, 2]  # q0 answered 3 times, q1 twice (it stood by its answer)
    assert points[0]["tokens"][0] < points[-1]["tokens"][0]  # every round's tokens counted
    assert finals[0]["correct"] and finals[0]["rounds"] == 2
    # a verifier that accepts right answers: q1 is never revised, q0 once
    engine2 = TextEngine(tok, script)
    history, points, finals = self_correct(engine2, tok, "t", _questions(2), MethodSettings(rounds=3), "exact",
                                           verifier=lambda rows: [float(c.strip() in ("0", "2")) for _, c, a in rows])
    assert [len(h) for h in history] == [2, 1]


def test_scorers_and_verifiers_never_see_the_reference_answer(tok):
    """Issue 23, item 11: with the gold answer a scorer makes best-of-N pass@k, and a verifier makes
    self-correction an oracle; both are given answer=None."""
    seen = []

    def spy(rows):
        seen.extend(a for _, _, a in rows)
        return [0.0] * len(rows)

    engine = TextEngine(tok, lambda text, s, seed, call: ["7", "2"])
    qs = _questions(2)
    pool = sample_pool(engine, tok, "t", qs, MethodSettings(n=[2], temperature=1.0), "exact")
    score_pool(pool, qs, spy)
    self_correct(TextEngine(tok, lambda text, s, seed, call: ["2"]), tok, "t", qs, MethodSettings(rounds=1),
                 "exact", verifier=spy)
    assert len(seen) == 4 + 4 and set(seen) == {None}


class IdEngine:
    """Token-id script: step(prompt ids, max_new_tokens, call) -> (ids, finish)."""

    def __init__(self, step):
        self.step, self.calls = step, []

    def generate(self, prompts, sampling, seeds):
        out = []
        for p in prompts:
            self.calls.append((list(p), sampling.max_new_tokens))
            ids, finish = self.step(list(p), sampling.max_new_tokens, len(self.calls))
            if len(ids) > sampling.max_new_tokens:  # an engine stops at max_new_tokens
                ids, finish = ids[: sampling.max_new_tokens], "length"
            out.append([Completion(tuple(ids), (0.0,) * len(ids), finish)])
        return out


CLOSE, WAIT, EOS = [90, 91], [77], 99
SAMPLING = Sampling(temperature=0.0, max_new_tokens=8, stop_token_ids=(EOS,))


def test_budget_forcing_cuts_thinking_at_the_budget_and_forces_the_answer():
    # the model would think forever (token 5 again and again)
    engine = IdEngine(lambda p, m, c: ([5] * m, "length") if p[-1] != CLOSE[-1] else ([42, EOS], "stop"))
    [st] = budget_forcing(engine, [[1, 2]], [0], SAMPLING, budget=6, extend=0, close_ids=CLOSE, wait_ids=WAIT,
                          answer_tokens=4)
    assert st["thinking"] == [5] * 6 and st["forced"] and st["answer"] == [42, EOS]
    assert engine.calls[0] == ([1, 2], 6)  # asked for exactly the budget
    assert engine.calls[1] == ([1, 2] + [5] * 6 + CLOSE, 4)  # then the close tag and the answer
    assert st["generated"] == 6 + 2


def test_budget_forcing_keeps_an_answer_given_within_the_budget():
    engine = IdEngine(lambda p, m, c: ([5, 5] + CLOSE + [42, EOS], "stop"))
    [st] = budget_forcing(engine, [[1]], [0], SAMPLING, budget=16, extend=0, close_ids=CLOSE, wait_ids=WAIT,
                          answer_tokens=4)
    assert st["thinking"] == [5, 5] and st["answer"] == [42, EOS] and not st["forced"]
    assert len(engine.calls) == 1 and st["generated"] == 6


def test_budget_forcing_extends_with_wait_when_thinking_stops_early():
    # thinks 2 tokens then closes; after a Wait it thinks 3 more and closes again
    def step(p, m, c):
        if p[-1] == CLOSE[-1]:
            return [43, EOS], "stop"
        return ([6, 6, 6] if p[-1] == WAIT[0] else [5, 5]) + CLOSE + [42, EOS], "stop"

    engine = IdEngine(step)
    [st] = budget_forcing(engine, [[1]], [0], SAMPLING, budget=16, extend=2, close_ids=CLOSE, wait_ids=WAIT,
                          answer_tokens=4)
    assert st["thinking"] == [5, 5] + WAIT + [6, 6, 6] + WAIT + [6, 6, 6]
    assert st["extensions"] == 2 and st["answer"] == [42, EOS]  # the last pass closed and answered itself
    assert [m for _, m in engine.calls] == [16, 13, 9]  # each pass gets what is left of the budget
    # extension stops at the budget: with budget 5 the Wait fills it and the answer is forced
    engine = IdEngine(step)
    [st] = budget_forcing(engine, [[1]], [0], SAMPLING, budget=5, extend=3, close_ids=CLOSE, wait_ids=WAIT,
                          answer_tokens=4)
    assert st["thinking"] == [5, 5] + WAIT + [6, 6] and st["forced"] and st["answer"] == [43, EOS]


def test_budget_forcing_continues_an_answer_the_budget_cut_instead_of_generating_it_again():
    """Issue 23, item 12: an answer begun within the budget call and cut by its room was thrown away and
    generated again, its tokens counted twice."""
    def step(p, m, c):
        if p[-len(CLOSE):] == CLOSE:
            return [42, 43, 44, EOS], "stop"
        if p[-1] == 43:
            return [44, EOS], "stop"
        return [5, 5] + CLOSE + [42, 43, 44, EOS], "stop"

    engine = IdEngine(step)
    [st] = budget_forcing(engine, [[1]], [0], SAMPLING, budget=6, extend=0, close_ids=CLOSE, wait_ids=WAIT,
                          answer_tokens=4)
    assert st["thinking"] == [5, 5] and st["answer"] == [42, 43, 44, EOS] and not st["forced"]
    assert engine.calls[1] == ([1, 5, 5] + CLOSE + [42, 43], 2)  # continued: 2 of the 4 answer tokens left
    assert st["generated"] == 6 + 2  # every token generated once, all of them kept


class StopIdEngine(IdEngine):
    """IdEngine that stops at the sampling's stop ids (the stop token kept, as vLLM and HF generate do)."""

    def generate(self, prompts, sampling, seeds):
        self.stops = getattr(self, "stops", []) + [tuple(sampling.stop_token_ids)]
        out = []
        for [c] in super().generate(prompts, sampling, seeds):
            ids = list(c.token_ids)
            cut = next((k for k, t in enumerate(ids) if t in sampling.stop_token_ids), None)
            if cut is not None:
                ids, c = ids[: cut + 1], Completion(tuple(ids[: cut + 1]), (0.0,) * (cut + 1), "stop")
            out.append([c])
        return out


def test_budget_forcing_stops_at_a_one_token_close_tag_while_an_extension_is_due():
    """Issue 23, item 12: the answer after a close tag that a Wait then replaces was generated and counted; with
    a one-token tag the engine now stops at it (s1's stop at the end-of-thinking delimiter)."""
    close = [90]

    def step(p, m, c):
        if p[-1] == 90:
            return [42, EOS], "stop"
        return ([6, 6] if p[-1] == WAIT[0] else [5, 5]) + close + [42, EOS], "stop"

    engine = StopIdEngine(step)
    [st] = budget_forcing(engine, [[1]], [0], SAMPLING, budget=16, extend=1, close_ids=close, wait_ids=WAIT,
                          answer_tokens=4)
    assert st["thinking"] == [5, 5] + WAIT + [6, 6] and st["answer"] == [42, EOS] and st["extensions"] == 1
    assert engine.stops == [(EOS, 90), (EOS,)]  # stop at the tag only while a Wait is due
    assert st["generated"] == 3 + 5  # [5, 5, close], then [6, 6, close, 42, EOS]: no answer thrown away


def test_context_overflow_is_refused_before_generating(tok):
    engine = TextEngine(tok, lambda *a: ["1"])
    with pytest.raises(EngineError, match="context of 8 tokens"):
        greedy(engine, tok, "t", _questions(1), MethodSettings(max_model_len=8), "exact")
    assert engine.calls == []
