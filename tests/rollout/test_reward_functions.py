"""RL rewards: answer extraction, the built-in functions, user functions by dotted path, the reward model as a
reward, and scoring that contains functions which raise, return junk or hang."""

import math
import os
import random
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from helpers import REPO_ROOT

from optsys.config import ConfigError
from optsys.data.tasks import TASKS
from optsys.rollout.rewards import (
    REWARD_FUNCTIONS,
    RewardError,
    build_rewards,
    check_reward_names,
    correct,
    digits,
    extract_answer,
    format_reward,
    numeric,
    resolve_reward,
    reward_model_fn,
    score_completions,
)


@pytest.mark.parametrize("text,expected", [
    ("42", "42"),
    ("  42 \n", "42"),
    ("<think>so 5?</think> 42", "42"),
    ("<think>Answer: 1</think>Answer: 2", "2"),
    ("<think>\\boxed{9}</think>\n3", "3"),
    ("opened in the prompt</think>7", "7"),
    ("<think>never closed, 42", None),
    ("<think>a</think>b<think>again", None),
    ("<think>all thought</think>   ", None),
    ("", None),
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{{a}{b}} and \\boxed{ 7 }", "7"),
    ("x \\boxed{1} then\nAnswer: 2", "2"),
    ("Answer: 2\nbut \\boxed{3} after all", "3"),
    ("Answer: \\boxed{4}", "4"),
    ("steps\n#### 1,234", "1,234"),
    ("#### 5\nfinal answer: 6\nmore text", "6"),
    ("answer:  5 \nexplanation follows", "5"),
    ("ANSWER: x", "x"),
    ("Answer:\n", None),
    ("\\boxed{unbalanced 3", "\\boxed{unbalanced 3"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def _call(fn, completion, answer):
    return fn(completion, prompt="p", answer=answer)


@pytest.mark.parametrize("fn,completion,answer,expected", [
    (correct, "132", "132", 1.0),
    (correct, "  1   3 2 ", "1 3 2", 1.0),
    (correct, "<think>maybe 131</think>\\boxed{132}", "132", 1.0),
    (correct, "131", "132", 0.0),
    (correct, "<think>132", "132", 0.0),
    (numeric, "Answer: $1,234.50", "1234.5", 1.0),
    (numeric, "50%", "50", 1.0),
    (numeric, "1000000.1", "1000000", 0.0),  # an integer reference is met exactly (issue 23, item 8)
    (numeric, "1000001", "1000000", 0.0),
    (numeric, "1.0000001", "1", 0.0),
    (numeric, "0.3333333", "0.33333333", 1.0),  # a non-integer reference: within 1e-6 relative
    (numeric, "The answer is 42. 17 is less.", "42", 1.0),
    (numeric, "\\boxed{\\frac{1}{2}}", "1", 0.0),  # not read as its first number
    (numeric, "1.001", "1", 0.0),
    (numeric, "0", "0", 1.0),
    (numeric, "nan", "nan", 0.0),
    (numeric, "abc", "abc", 0.0),  # equal strings, but not numbers
    (numeric, "", "3", 0.0),
    (format_reward, "<think>x</think>42", None, 1.0),
    (format_reward, "42", None, 1.0),
    (format_reward, "<think>x 42", None, 0.0),
    (format_reward, "   ", None, 0.0),
    (format_reward, "<think>x</think>", None, 0.0),
    (digits, "132", "132", 1.0),
    (digits, "133", "132", 2 / 3),
    (digits, "32", "132", 2 / 3),  # aligned at the end: the missing leading digit costs one position
    (digits, "231", "2310", 3 / 4),  # aligned at the start (reversed sums)
    (digits, "1", "132", 0.0),  # lengths differ by 2
    (digits, "132 is my answer", "132", 0.0),
    (digits, "<think>132", "132", 0.0),
    (digits, "999", "132", 0.0),
])
def test_builtin_functions_on_hand_cases(fn, completion, answer, expected):
    assert _call(fn, completion, answer) == pytest.approx(expected)


def test_registry_names():
    assert REWARD_FUNCTIONS == {"correct": correct, "numeric": numeric, "format": format_reward, "digits": digits}
    assert all(resolve_reward(n) is fn for n, fn in REWARD_FUNCTIONS.items())


@pytest.mark.parametrize("name", sorted(n for n, t in TASKS.items() if not getattr(t, "environment", None)))
def test_task_check_agrees_with_correct_on_the_tasks_problems(name):
    task = TASKS[name]
    problems = task.problems("train", 40, difficulty=2) + task.problems("test", 10, difficulty=2)
    wrongs = [task.wrong(p, random.Random(i)) for i, p in enumerate(problems)]
    checked = 0
    for p, wrong in zip(problems, wrongs):
        for c in (p.answer, f"  {p.answer}\n", p.answer.replace(" ", "  "), wrong, p.answer + "0", p.answer[1:], ""):
            assert task.check(c, p.answer) == bool(_call(correct, c, p.answer)), (name, p, c)
            assert (_call(digits, c, p.answer) == 1.0) == task.check(c, p.answer), (name, p, c)
            checked += task.check(c, p.answer)
    assert checked >= 3 * len(problems)  # the agreement covered right answers, not only wrong ones


@pytest.mark.parametrize("fn", [correct, numeric, digits])
def test_a_reference_is_required(fn):
    with pytest.raises(ValueError, match=f"reward '{fn.__name__}' needs a reference answer"):
        fn("1", prompt="p", answer=None)


def test_weighted_total_matches_hand_computation():
    samples = [("1+2=", "3", "3"), ("5+5=", "11", "10"), ("9+9=", "<think>18", "18"), ("1+1=", "Answer: 2.0", "2")]
    fns = [("correct", correct, 2.0), ("digits", digits, 0.5), ("numeric", numeric, -1.0),
           ("format", format_reward, 0.25)]
    result = score_completions(fns, samples, timeout_s=5, on_error="error")
    # digits: "11" vs "10" matches 1 of 2 positions; "2.0" vs "2" differ in length by 2
    assert result.per_function == {
        "correct": [1.0, 0.0, 0.0, 0.0], "digits": [1.0, 0.5, 0.0, 0.0],
        "numeric": [1.0, 0.0, 0.0, 1.0], "format": [1.0, 1.0, 0.0, 1.0]}
    hand = [2 + 0.5 - 1 + 0.25, 0.5 * 0.5 + 0.25, 0.0, -1 + 0.25]
    assert result.total == pytest.approx(hand)
    assert result.errors == {} and result.timeouts == {}


HELPERS = '''
import time

def length_reward(completion, *, prompt, answer):
    return len(completion) / 10

def kw_reward(completion, **kwargs):
    return float(completion == kwargs["answer"])

def prompt_reward(completion, prompt, answer=None):
    return 0.5 if prompt.startswith("q") else -0.5

CONSTANT = 3

def one_arg(completion):
    return 0.0

def needs_extra(completion, *, prompt, answer, temperature):
    return 0.0
'''


@pytest.fixture
def helper_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(HELPERS)
    (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("my_rewards", "broken_rewards"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return "my_rewards"


def test_dotted_paths_resolve_and_score(helper_module):
    import my_rewards

    assert resolve_reward("my_rewards.length_reward") is my_rewards.length_reward
    assert resolve_reward("my_rewards:kw_reward") is my_rewards.kw_reward
    fns = [(n, resolve_reward(n), w) for n, w in (("my_rewards.length_reward", 1.0), ("my_rewards:kw_reward", 2.0),
                                                   ("my_rewards.prompt_reward", 1.0))]
    result = score_completions(fns, [("q1", "abcde", "abcde"), ("x", "ab", "no")], timeout_s=5, on_error="error")
    assert result.per_function == {"my_rewards.length_reward": [0.5, 0.2], "my_rewards:kw_reward": [1.0, 0.0],
                                   "my_rewards.prompt_reward": [0.5, -0.5]}
    assert result.total == pytest.approx([3.0, -0.3])
    check_reward_names(["correct", "my_rewards.length_reward"], [1.0, 0.5])
    check_reward_names(["correct"], None)


@pytest.mark.parametrize("name,words", [
    ("corect", ["'corect'", "did you mean 'correct'"]),
    ("nosuch_module_xyz.fn", ["'nosuch_module_xyz.fn'", "cannot import module 'nosuch_module_xyz'",
                              "No module named"]),
    ("broken_rewards.fn", ["'broken_rewards.fn'", "RuntimeError: boom at import"]),
    ("my_rewards.lenght_reward", ["'my_rewards.lenght_reward'", "no attribute 'lenght_reward'",
                                  "did you mean 'length_reward'"]),
    ("my_rewards.zzzz", ["its callables: kw_reward, length_reward, needs_extra, one_arg, prompt_reward"]),
    ("my_rewards.CONSTANT", ["'my_rewards.CONSTANT' is a int, not a function"]),
    ("my_rewards.one_arg", ["'my_rewards.one_arg'", "one_arg(completion)", "cannot be called as"]),
    ("my_rewards:needs_extra", ["'my_rewards:needs_extra'", "temperature", "cannot be called as"]),
    ("my_rewards.", ["'my_rewards.'", "package.module.function"]),
    ("reward_model:/x", ["is a reward model", "reward_model_fn"]),
])
def test_resolve_errors_name_the_string_and_the_problem(helper_module, name, words):
    with pytest.raises(ConfigError) as e:
        resolve_reward(name)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("names,weights,words", [
    (["correct", "digitz"], None, ["'digitz'", "did you mean 'digits'"]),
    (["correct", "digits"], [1.0], ["1 reward weights", "2 rewards"]),
    (["correct", "digits"], [1.0, 2.0, 3.0], ["3 reward weights"]),
    (["correct"], [float("nan")], ["'correct'", "weight nan", "finite"]),
    (["correct"], [float("inf")], ["weight inf", "finite"]),
    (["correct"], ["1"], ["weight '1'", "finite number"]),
    ([], None, ["no reward functions"]),
    (["correct", "correct"], None, ["'correct' is listed twice"]),
    (["reward_model:/no/such/folder"], None, ["/no/such/folder", "does not exist"]),
    (["reward_model:"], None, ["reward_model:<path>"]),
])
def test_check_reward_names_refuses(names, weights, words):
    with pytest.raises(ConfigError) as e:
        check_reward_names(names, weights)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def _returns(value):
    def fn(completion, *, prompt, answer):
        return value if completion == "bad" else 1.0
    return fn


@pytest.mark.parametrize("value,shown", [(None, "returned None (NoneType)"), ("abc", "returned 'abc' (str)"),
                                         (float("nan"), "returned nan (float)"), (math.inf, "returned inf (float)"),
                                         ([1.0], "returned [1.0] (list)")])
def test_non_number_returns_are_errors(value, shown):
    name = f"returns_{type(value).__name__}_{value!r}"
    samples = [("q0", "good", None), ("q1 " + "p" * 300, "bad", None), ("q2", "bad", None)]
    with pytest.raises(RewardError) as e:
        score_completions([(name, _returns(value), 1.0)], samples, timeout_s=5, on_error="error")
    msg = str(e.value)
    for w in (f"reward {name!r} on sample 1", shown, "expected a finite float", "'q1 " + "p" * 197 + "'", "'bad'"):
        assert w in msg, (w, msg)
    assert "p" * 198 not in msg  # the prompt is cut at 200 characters
    result = score_completions([(name, _returns(value), 1.0)], samples, timeout_s=5, on_error="zero")
    assert result.per_function[name] == [1.0, 0.0, 0.0] and result.errors == {name: 2} and result.total == [1, 0, 0]


def test_bool_and_int_returns_are_accepted():
    result = score_completions([("b", _returns(True), 1.0), ("i", _returns(3), 0.5)], [("q", "bad", None)] * 2,
                               timeout_s=5, on_error="error")
    assert result.per_function == {"b": [1.0, 1.0], "i": [3.0, 3.0]} and result.total == [2.5, 2.5]


def test_raising_function_both_modes(capsys):
    def flaky(completion, *, prompt, answer):
        if "boom" in completion:
            raise KeyError("no such thing")
        return 0.5

    samples = [("q0", "fine", None), ("q1", "boom " + "c" * 300, None), ("q2", "boom", None), ("q3", "ok", None)]
    with pytest.raises(RewardError) as e:
        score_completions([("flaky", flaky, 1.0)], samples, timeout_s=5, on_error="error")
    msg = str(e.value)
    for w in ("reward 'flaky' on sample 1", "raised KeyError: 'no such thing'", "prompt: 'q1'", "'boom " + "c" * 195,
              "set rl.on_reward_error=zero"):  # the config key, not the library argument
        assert w in msg, (w, msg)
    assert "c" * 196 not in msg and isinstance(e.value.__cause__, KeyError)
    capsys.readouterr()
    for _ in range(2):
        result = score_completions([("flaky", flaky, 2.0), ("format", format_reward, 1.0)], samples, timeout_s=5,
                                   on_error="zero")
        assert result.per_function["flaky"] == [0.5, 0.0, 0.0, 0.5] and result.errors == {"flaky": 2}
        assert result.total == [2.0, 1.0, 1.0, 2.0]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "reward 'flaky' on sample 1" in err and "KeyError" in err


def test_hanging_function_both_modes(capsys):
    release = threading.Event()

    def sometimes_hangs(completion, *, prompt, answer):
        if completion == "hang":
            release.wait()
        return 1.0

    samples = [("q0", "ok", "ok"), ("q1", "hang", "x"), ("q2", "ok", "ok"), ("q3", "ok", "ok")]
    fns = [("sometimes_hangs", sometimes_hangs, 1.0), ("correct", correct, 10.0)]
    try:
        start = time.monotonic()
        with pytest.raises(RewardError, match="reward 'sometimes_hangs' on sample 1: timed out after 0.3 s"):
            score_completions(fns, samples, timeout_s=0.3, on_error="error")
        result = score_completions(fns, samples, timeout_s=0.3, on_error="zero")
        elapsed = time.monotonic() - start
        # The hung call and the rest of that function's batch are timeouts; the other function is unaffected.
        assert result.per_function == {"sometimes_hangs": [1.0, 0.0, 0.0, 0.0], "correct": [1.0, 0.0, 1.0, 1.0]}
        assert result.timeouts == {"sometimes_hangs": 3} and result.errors == {}
        assert result.total == [11.0, 0.0, 10.0, 10.0]
        assert elapsed < 5, elapsed  # two timeouts of 0.3 s, not a hang
        assert "timed out" in capsys.readouterr().err
    finally:
        release.set()


def test_the_timeout_is_per_call_not_per_batch():
    def slowish(completion, *, prompt, answer):
        time.sleep(0.1)
        return 1.0

    result = score_completions([("slowish", slowish, 1.0)], [("q", "c", None)] * 6, timeout_s=0.35, on_error="zero")
    assert result.total == [1.0] * 6 and result.timeouts == {}  # 0.6 s in all, 0.1 s a call


def test_a_hung_reward_does_not_block_interpreter_exit(tmp_path):
    script = textwrap.dedent('''
        import time
        from optsys.rollout.rewards import score_completions

        def forever(completion, *, prompt, answer):
            time.sleep(10_000)

        r = score_completions([("forever", forever, 1.0)], [("q", "c", None)], timeout_s=0.2, on_error="zero")
        print("scored", r.total, r.timeouts, flush=True)
    ''')
    root = str(REPO_ROOT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    assert "scored [0.0] {'forever': 1}" in out.stdout
    assert time.monotonic() - start < 30


def test_bad_score_completions_arguments():
    with pytest.raises(ValueError, match="on_error must be 'error' or 'zero'"):
        score_completions([("correct", correct, 1.0)], [], timeout_s=1, on_error="skip")
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        score_completions([("correct", correct, 1.0)], [], timeout_s=0)


def test_reward_model_function(tiny_path):
    fn = reward_model_fn(str(tiny_path), "cpu")
    completions = ["1 2 3", "3 1 2", "a much longer and different completion"]
    scores = [fn(c, prompt="sort: 3 1 2", answer=None) for c in completions]
    assert all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert len(set(scores)) == 3  # depends on the completion
    assert fn("1 2 3", prompt="sort: 3 1 2", answer=None) == scores[0]  # deterministic
    assert reward_model_fn(str(tiny_path), "cpu")("1 2 3", prompt="sort: 3 1 2", answer=None) == pytest.approx(
        scores[0], abs=1e-6)  # the same head from the same seed
    assert fn("1 2 3", prompt="sort: 2 1 3", answer=None) != scores[0]  # and on the prompt

    [(name, built, weight)] = build_rewards([f"reward_model:{tiny_path}"], [0.5], "cpu")
    result = score_completions([(name, built, weight)], [("sort: 3 1 2", c, None) for c in completions],
                               timeout_s=30, on_error="error")
    assert result.per_function[name] == pytest.approx(scores, abs=1e-5)  # one packed forward == one by one
    assert result.total == pytest.approx([0.5 * s for s in scores], abs=1e-5)


def test_a_reward_in_a_python_file_is_named_by_its_path(tmp_path, monkeypatch):
    """`./rewards.py:fn` (relative to the working directory) imports the file; a sibling module it imports is
    found. A path without .py, or a file that is not there, is a ConfigError saying how to name it."""
    (tmp_path / "helper_for_file_reward.py").write_text("BONUS = 0.25\n")
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        from helper_for_file_reward import BONUS

        def shout(completion, *, prompt, answer):
            return float(completion.isupper()) + BONUS
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    fn = resolve_reward("./my_rewards.py:shout")
    assert fn("HI", prompt="p", answer=None) == 1.25 and fn("hi", prompt="p", answer=None) == 0.25
    assert resolve_reward(f"{tmp_path / 'my_rewards.py'}:shout") is fn  # one module per file
    check_reward_names(["./my_rewards.py:shout", "format"], [1.0, 0.5])
    for name, words in [("./my_rewards:shout", "looks like a path; name a function in a Python file as "
                                               "'path/to/file.py:function'"),
                        ("./nope.py:shout", f"file './nope.py' does not exist (resolved to {tmp_path / 'nope.py'})"),
                        ("./my_rewards.py:shuot", "has no attribute 'shuot'; did you mean 'shout'")]:
        with pytest.raises(ConfigError) as e:
            resolve_reward(name)
        assert words in str(e.value), (words, str(e.value))
