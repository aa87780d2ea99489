"""Multi-turn environments: episode tokens vs the chat template, masks, truncation, tools, the guessing game."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from optsys.data.guess import binary_search_turns, guess_rows, guess_sft_rows, guess_transcript
from optsys.errors import DataError
from optsys.rollout.engine import Completion, Sampling
from optsys.rollout.environments import ENVIRONMENTS, TurnRenderer, make_environment, run_episodes, summarize_episodes
from optsys.rollout.games import ArithmeticEnv, GuessingGame
from optsys.rollout.tools import ToolError, ToolUse, calculate, parse_tool_calls

TOKENIZER = "factory"  # the tok fixture (tests/conftest.py): the tiny factory's own tokenizer


class ScriptedEngine:
    """generate() answers call t with script[t] (one text per prompt, in order); records every call."""

    def __init__(self, tok, script, *, finish=None):
        self.tok, self.script, self.finish = tok, list(script), finish or {}
        self.calls = []

    def generate(self, prompts, sampling, seeds):
        t = len(self.calls)
        self.calls.append((prompts, sampling, list(seeds)))
        assert len(self.script[t]) == len(prompts), f"call {t}: {len(prompts)} prompts"
        out = []
        for k, text in enumerate(self.script[t]):
            ids = list(self.tok(text, add_special_tokens=False).input_ids)
            finish = self.finish.get((t, k), "stop")
            if finish == "stop":
                ids.append(self.tok.eos_token_id)  # <|im_end|>, the template's end of turn
            lps = [-0.01 * (t + 1) - 0.001 * j for j in range(len(ids))]
            out.append([Completion(tuple(ids), tuple(lps), finish)])
        return out


def _play(tok, script, envs, rows, *, max_turns=4, max_tokens=512, finish=None, max_new_tokens=8):
    engine = ScriptedEngine(tok, script, finish=finish)
    sampling = Sampling(n=1, max_new_tokens=max_new_tokens, stop_token_ids=(tok.eos_token_id,))
    eps = run_episodes(engine, envs, tok, sampling, list(range(len(envs))), rows=rows, max_turns=max_turns,
                       max_tokens=max_tokens)
    return eps, engine


def _template_ids(tok, messages, generation_prompt):
    return list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                        return_dict=False))


def _check_aligned(tok, ep):
    """prompt + tokens == the template's tokens of the whole conversation, at every model turn and at the end."""
    seq = ep.prompt_ids + ep.token_ids
    n = len(ep.token_ids)
    assert len(ep.logprobs) == len(ep.loss_mask) == n
    model = [False] * n
    for s, e in ep.turn_spans:
        model[s:e] = [True] * (e - s)
    assert ep.loss_mask == model
    assert all(lp == 0.0 for lp, m in zip(ep.logprobs, ep.loss_mask) if not m)
    assert all(lp < 0.0 for lp, m in zip(ep.logprobs, ep.loss_mask) if m)
    # each model turn starts exactly where the template's generation prompt for the conversation so far ends
    assistant = [k for k, m in enumerate(ep.messages) if m["role"] == "assistant"]
    assert len(assistant) == len(ep.turn_spans) == ep.turns
    for k, (s, _) in zip(assistant, ep.turn_spans):
        assert seq[: len(ep.prompt_ids) + s] == _template_ids(tok, ep.messages[:k], True)
    # the whole conversation: the template writes "\n" after the last <|im_end|>, which generation stops before
    full = _template_ids(tok, ep.messages, False)
    assert seq == full[:-1] and tok.decode(full[-1:]) == "\n"
    ex = ep.example()  # the trainer's view: next-token targets only at model tokens
    assert ex.input_ids == seq[:-1] and len(ex.targets) == len(ex.input_ids)
    assert [t for t in ex.targets if t != -100] == [t for t, m in zip(ep.token_ids, ep.loss_mask) if m]
    assert all(ex.targets[len(ep.prompt_ids) - 1 + j] == (t if m else -100)
               for j, (t, m) in enumerate(zip(ep.token_ids, ep.loss_mask)))
    assert seq.count(tok.eos_token_id) == 2 * ep.turns + (ep.messages[0]["role"] == "system")  # once per turn


def test_guess_episode_tokens_are_the_template_rendering(tok):
    row = {"secret": 7, "n": 10, "game": "g"}
    eps, engine = _play(tok, [["4"], ["6"], ["7"]], [GuessingGame()], [row])
    ep = eps[0]
    assert ep.texts == ["4", "6", "7"] and ep.turns == 3 and ep.done and not ep.truncated
    assert ep.stop_reason == "done" and ep.reward == pytest.approx(0.8)  # 1 - 0.1 * (3 - 1)
    assert ep.step_rewards == [0.0, 0.0, pytest.approx(0.8)]
    assert [m["content"] for m in ep.messages] == ["Guess a number from 0 to 9.", "4", "higher", "6", "higher", "7"]
    assert ep.prompt_ids == _template_ids(tok, ep.messages[:1], True)
    _check_aligned(tok, ep)
    # the model's ids go in verbatim, with their log-probs
    s, e = ep.turn_spans[1]
    assert ep.token_ids[s:e] == list(tok("6", add_special_tokens=False).input_ids) + [tok.eos_token_id]
    assert ep.logprobs[s:e] == pytest.approx([-0.02, -0.021])
    # what the engine saw at turn 2 is the sequence so far
    assert engine.calls[2][0][0] == ep.prompt_ids + ep.token_ids[: ep.turn_spans[2][0]]


def test_lock_step_one_generate_call_per_turn(tok):
    rows = [{"secret": s, "n": 10, "game": f"g{s}"} for s in (4, 1, 9)]
    script = [["4", "4", "4"], ["2", "7"], ["1", "9"]]
    eps, engine = _play(tok, script, [GuessingGame() for _ in rows], rows)
    assert [len(c[0]) for c in engine.calls] == [3, 2, 2]
    assert all(c[1].n == 1 for c in engine.calls)
    assert engine.calls[0][2] != engine.calls[1][2][:2]  # seeds change with the turn
    assert [e.turns for e in eps] == [1, 3, 3] and all(e.done for e in eps)
    for e in eps:
        _check_aligned(tok, e)
    stats = summarize_episodes(eps)
    assert stats["env/episodes"] == 3 and stats["env/done_rate"] == 1.0 and stats["env/mean_turns"] == 7 / 3


def test_turn_limit_truncates_and_is_counted(tok):
    rows = [{"secret": 9, "n": 10, "game": "a"}, {"secret": 0, "n": 10, "game": "b"}]
    eps, engine = _play(tok, [["1", "0"], ["2"]], [GuessingGame(), GuessingGame()], rows, max_turns=2)
    a, b = eps
    assert a.truncated and not a.done and a.stop_reason == "max_turns" and a.turns == 2 and a.reward == 0.0
    assert b.done and b.turns == 1
    assert a.token_ids[-1] == tok.eos_token_id and a.loss_mask[-1]  # ends on the model's turn, no dangling reply
    _check_aligned(tok, a)
    stats = summarize_episodes(eps)
    assert stats["env/truncated_max_turns"] == 1 and stats["env/truncated_max_tokens"] == 0


def test_token_budget_truncates_before_the_turn_that_would_not_fit(tok):
    row = {"secret": 9, "n": 10, "game": "a"}
    env = GuessingGame()
    prompt = len(_template_ids(tok, [{"role": "user", "content": env.prompt_text(10)}], True))
    # room for the first turn (8 new tokens) but not for "higher" + the next generation prompt + 8 more
    eps, _ = _play(tok, [["1"]], [env], [row], max_tokens=prompt + 12)
    ep = eps[0]
    assert ep.truncated and ep.stop_reason == "max_tokens" and ep.turns == 1
    assert len(ep.token_ids) == 2 and all(ep.loss_mask)
    assert summarize_episodes(eps)["env/truncated_max_tokens"] == 1
    with pytest.raises(DataError, match="first prompt"):
        _play(tok, [["1"]], [GuessingGame()], [row], max_tokens=prompt + 7)


def test_turn_cut_at_max_new_tokens_gets_the_end_of_turn_token_once(tok):
    row = {"secret": 3, "n": 10, "game": "a"}
    eps, _ = _play(tok, [["55"], ["3"]], [GuessingGame()], [row], finish={(0, 0): "length"})
    ep = eps[0]
    assert ep.finish_reasons == ["length", "stop"] and ep.messages[2]["content"] == "invalid"
    s, e = ep.turn_spans[0]
    assert tok.eos_token_id not in ep.token_ids[s:e]
    assert ep.token_ids[e] == tok.eos_token_id and not ep.loss_mask[e]  # supplied by the environment, masked
    _check_aligned(tok, ep)


def test_sampling_n_must_be_one_and_counts_must_match(tok):
    env, row = GuessingGame(), {"secret": 1, "n": 10, "game": "a"}
    with pytest.raises(ValueError, match="n=1"):
        run_episodes(ScriptedEngine(tok, []), [env], tok, Sampling(n=2), [0], rows=[row], max_turns=2, max_tokens=99)
    with pytest.raises(ValueError, match="one seed and one row"):
        run_episodes(ScriptedEngine(tok, []), [env], tok, Sampling(), [0, 1], rows=[row], max_turns=2, max_tokens=99)


# ---------------------------------------------------------------------------- tools


def test_calculator_is_exact_and_refuses_unsafe_input():
    assert calculate("2+3*4") == 14
    assert calculate("(2+3)*4") == 20
    assert calculate("-3 - -2") == -1
    assert calculate("7/2") == Fraction(7, 2)
    assert calculate("((1+2)*(3+4))/7 - 10") == -7
    assert calculate("12*34+56") == 464
    assert ENVIRONMENTS and make_environment("guess").n == 10
    from optsys.rollout.tools import TOOLS

    calc = TOOLS["calculator"].fn
    assert calc({"expression": "7/2"}) == "3.5" and calc({"expression": "10/5"}) == "2"
    for bad in ("__import__('os').system('x')", "2**10", "1/0", "1.5+2", "2 3", "(1+2", "1+", "", "abs(1)",
                "1" * 61, "(" * 40 + "1" + ")" * 40, "*".join(["9" * 20] * 4), "1+" * 120 + "1"):
        with pytest.raises(ToolError):
            calculate(bad)
    with pytest.raises(ToolError, match="one argument"):
        calc({"expr": "1"})
    with pytest.raises(ValueError, match="unknown tools"):
        ToolUse(GuessingGame(), tools=("shell",))


def test_parse_tool_calls():
    ok = parse_tool_calls('x <tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>')
    assert len(ok) == 1 and ok[0].name == "calculator" and ok[0].arguments == {"expression": "1+1"} and not ok[0].error
    as_string = parse_tool_calls('<tool_call>{"name": "c", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert as_string[0].arguments == {"a": 1}
    assert parse_tool_calls("no call here 42") == []
    for bad in ("<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
                '<tool_call>{"name": "c", "arguments": [1]}</tool_call>', '<tool_call>{"name": "c"'):
        calls = parse_tool_calls(bad)
        assert len(calls) == 1 and calls[0].error.startswith("malformed tool call"), bad


def test_tool_episode_malformed_call_gets_an_error_observation(tok):
    row = {"question": "12*34+56=", "answer": "464"}
    good = '<tool_call>{"name": "calculator", "arguments": {"expression": "12*34+56"}}</tool_call>'
    script = [["<tool_call>{oops</tool_call>"], ['<tool_call>{"name": "nope", "arguments": {}}</tool_call>'],
              [good], ["464"]]
    env = make_environment("arithmetic_tool")
    eps, _ = _play(tok, script, [env], [row], max_new_tokens=64, max_tokens=1024)
    ep = eps[0]
    assert ep.done and ep.reward == 1.0 and ep.turns == 4 and env.calls == 3 and env.errors == 2
    tool = [m for m in ep.messages if m["role"] == "tool"]
    assert len(tool) == 3  # the tiny ChatML template renders a "tool" role: <|im_start|>tool\n...<|im_end|>
    assert json.loads(tool[0]["content"])["error"].startswith("malformed tool call")
    assert "unknown tool" in json.loads(tool[1]["content"])["error"]
    assert json.loads(tool[2]["content"]) == {"name": "calculator", "result": "464"}
    assert ep.messages[0] == {"role": "system", "content": ArithmeticEnv.system}
    _check_aligned(tok, ep)
    assert summarize_episodes(eps)["env/tool_turns"] == 3


def test_template_without_a_tool_role_gets_a_user_turn(tok):
    strict = tok.__class__.from_pretrained(tok.name_or_path)
    strict.chat_template = ("{%- for m in messages %}{%- if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
                            "{%- endif %}" + tok.chat_template.removeprefix("{%- for message in messages %}")
                            .replace("message[", "m["))
    assert TurnRenderer(tok).tool_role and not TurnRenderer(strict).tool_role
    msg = TurnRenderer(strict).message({"role": "tool", "content": "3"})
    assert msg == {"role": "user", "content": "<tool_response>\n3\n</tool_response>"}


# ---------------------------------------------------------------------------- the guessing game


def test_guessing_game_rules():
    env = GuessingGame(10, turn_penalty=0.25)
    assert env.reset({"secret": 6, "n": 10}) == "Guess a number from 0 to 9."
    assert env.step("3") == ("higher", 0.0, False)
    assert env.step(" 8 ") == ("lower", 0.0, False)
    assert env.step("ten") == ("invalid", 0.0, False)
    assert env.step("10") == ("invalid", 0.0, False)
    obs, reward, done = env.step("6")
    assert obs is None and done and reward == pytest.approx(1 - 0.25 * 4)
    env.reset({"secret": 6, "n": 10})
    assert env.step("6") == (None, 1.0, True)
    with pytest.raises(ValueError):
        env.reset({"secret": 12, "n": 10})


def test_guess_rows_split_and_transcripts():
    train, test = guess_rows("train", 200), guess_rows("test", 40)
    assert guess_rows("train", 200) == train  # deterministic
    assert not {r["game"] for r in train} & {r["game"] for r in test}
    assert {r["secret"] for r in train} == set(range(10))
    assert binary_search_turns(10) == 4
    for r in train[:50]:
        for strategy in ("binary", "random"):
            msgs = guess_transcript(r, strategy)
            assert msgs[-1] == {"role": "assistant", "content": str(r["secret"])}
            assert all(m["content"] in ("higher", "lower") for m in msgs[2::2])  # always a legal, consistent guess
        assert len(guess_transcript(r, "binary")) // 2 <= 4  # turns
    rows = guess_sft_rows("train", 3, strategy="random")
    assert len(rows) == 3 and rows[0]["messages"][0]["role"] == "user"


def test_sft_rows_tokenize_with_every_guess_trained(tok):
    from optsys.data.tokenize import IGNORE, tokenize_rows

    rows = guess_sft_rows("train", 4)
    examples, report = tokenize_rows(rows, tok, max_tokens=256)
    guesses = sum(m["role"] == "assistant" for r in rows for m in r["messages"])
    assert report.kept == 4
    assert sum(t != IGNORE for e in examples for t in e.targets) == 2 * guesses  # digit + <|im_end|> per guess


@pytest.mark.slow
def test_hf_engine_plays_four_episodes(tiny_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optsys.rollout.games import evaluate_guessing
    from optsys.rollout.hf_engine import HFEngine

    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    engine = HFEngine(model, pad_token_id=tokenizer.pad_token_id)
    rows = guess_rows("train", 4)
    sampling = Sampling(n=1, max_new_tokens=6, stop_token_ids=(tokenizer.eos_token_id,))
    eps = run_episodes(engine, [GuessingGame() for _ in rows], tokenizer, sampling, [1, 2, 3, 4], rows=rows,
                       max_turns=3, max_tokens=128)
    assert len(eps) == 4
    for ep in eps:
        assert 1 <= ep.turns <= 3 and (ep.done or ep.truncated)
        assert len(ep.token_ids) == len(ep.logprobs) == len(ep.loss_mask)
        seq = ep.prompt_ids + ep.token_ids
        assert len(seq) <= 128
        # the trainer's scoring of the built sequence reproduces the sampler's log-probs at model tokens (T=1)
        start = len(ep.prompt_ids)
        scored = engine.token_logprobs([seq], [start])[0]
        got = [s for s, m in zip(scored, ep.loss_mask) if m]
        want = [lp for lp, m in zip(ep.logprobs, ep.loss_mask) if m]
        assert got == pytest.approx(want, abs=1e-4)
    stats = evaluate_guessing(engine, tokenizer, guess_rows("test", 4), sampling, max_turns=3, max_tokens=128)
    assert 0.0 <= stats["eval/success_rate"] <= 1.0
