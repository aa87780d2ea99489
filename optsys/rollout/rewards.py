"""Rewards for RL rollouts: answer extraction, verifiable reward functions, user functions, a reward model, and
scoring that survives functions which raise, return junk or hang.

Every reward function is called as `fn(completion, *, prompt=..., answer=...) -> float`: `completion` is the
generated text, `prompt` the prompt's text as written in the data (the user turn, not the chat-rendered string)
and `answer` the row's reference answer (None when the row has none).

Names, as a config gives them (`check_reward_names` at validation, `build_rewards` when the trainer starts):
  - a registry name: correct, numeric, format, digits (REWARD_FUNCTIONS);
  - "package.module.function" or "package.module:function": a user function, imported with importlib;
  - "path/to/file.py:function": a user function in a Python file (relative to the working directory);
  - "reward_model:<model folder | tiny:preset>": a reward model trained by optsys.trainers.reward.
"""

from __future__ import annotations

import concurrent.futures
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from optsys.config import ConfigError
from optsys.data.answers import (  # noqa: F401 (extract_answer, numeric_answer, parse_number re-exported)
    answers_match,
    canonical_answer,
    canonical_reference,
    extract_answer,
    numeric_answer,
    parse_number,
)
from optsys.data.tasks import normalize_answer as _normalize  # Task.check's rule, shared
from optsys.errors import RewardError
from optsys.models.sources import check_local_source, local_source

REWARD_MODEL_PREFIX = "reward_model:"
RewardFn = Callable[..., float]


# ---------------------------------------------------------------------------- built-in reward functions


def _reference(name: str, answer: str | None) -> str:
    if answer is None:
        raise ValueError(f"reward {name!r} needs a reference answer and this sample has none; give the rows an "
                         f"'answer' field or use a reward that does not need one (format, a reward model)")
    return answer


def correct(completion: str, *, prompt: str, answer: str | None) -> float:
    """1.0 if the extracted answer equals the reference after whitespace normalization (Task.check's rule)."""
    reference = _normalize(_reference("correct", answer))
    got = extract_answer(completion)
    return float(got is not None and _normalize(got) == reference)


def numeric(completion: str, *, prompt: str, answer: str | None) -> float:
    """1.0 if the completion's number equals the reference (optsys.data.answers, match="numeric": an integer
    reference exactly, another within 1e-6 relative); 0.0 otherwise, including a reference that is not a number
    and an answer the rule cannot read for sure (`3/4`, `2^{10}`)."""
    reference = _reference("numeric", answer)
    try:
        want = canonical_reference(reference, "numeric")
    except ValueError:
        return 0.0
    return float(answers_match(canonical_answer(completion, "numeric"), want, "numeric"))


def format_reward(completion: str, *, prompt: str, answer: str | None) -> float:
    """1.0 if the completion has an answer at all: non-empty, any thinking block it opens is closed, and
    extract_answer finds something after it. It does not look at whether the answer is right."""
    return float(extract_answer(completion) is not None)


def digits(completion: str, *, prompt: str, answer: str | None) -> float:
    """Partial credit, a denser signal than `correct` for small models on the arithmetic tasks.

    Both strings whitespace-normalized; 0.0 without an answer or when the lengths differ by more than 1.
    Otherwise the fraction of the max(len) positions whose characters match, with the two strings aligned at
    the start or at the end, whichever matches more (a missing or extra leading digit still gets credit in
    plain-order sums, a trailing one in reversed sums). 1.0 exactly when the answer is correct.
    """
    reference = _normalize(_reference("digits", answer))
    got = extract_answer(completion)
    if got is None:
        return 0.0
    got = _normalize(got)
    if abs(len(got) - len(reference)) > 1 or not reference:
        return float(got == reference)
    n = max(len(got), len(reference))
    left = sum(a == b for a, b in zip(got, reference))
    right = sum(a == b for a, b in zip(reversed(got), reversed(reference)))
    return max(left, right) / n


REWARD_FUNCTIONS: dict[str, RewardFn] = {"correct": correct, "numeric": numeric, "format": format_reward,
                                         "digits": digits}

# The built-in rewards that compare a completion with the reference answer: as an eval scorer or verifier they
# would be oracles, and optsys.eval.config refuses them there.
REFERENCE_REWARDS = ("correct", "numeric", "digits")

# Functions marked _optsys_inline run on the caller's thread: they are ours and cannot hang (bounded string
# work, or a bounded model forward). Everything else runs in a worker thread with a timeout.
for _fn in REWARD_FUNCTIONS.values():
    _fn._optsys_inline = True


# ---------------------------------------------------------------------------- names -> functions


def _check_signature(name: str, fn) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # some builtins have no signature to read; the call itself will tell
    try:
        sig.bind("", prompt="", answer=None)
    except TypeError as e:
        raise ConfigError(f"reward {name!r}: {getattr(fn, '__name__', fn)!s}{sig} cannot be called as "
                          f"fn(completion, prompt=..., answer=...) ({e}); define it as "
                          f"def fn(completion, *, prompt, answer, **kwargs) -> float") from None


def resolve_reward(name: str) -> RewardFn:
    """A registry name, or a user function "package.module.function" / "package.module:function"; checked for
    a usable signature. Raises ConfigError naming the string and what is wrong."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"reward {name!r}: expected a registry name ({', '.join(REWARD_FUNCTIONS)}) or a "
                          f"dotted path 'package.module.function' (or 'path/to/file.py:function')")
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if name.startswith(REWARD_MODEL_PREFIX):
        raise ConfigError(f"reward {name!r} is a reward model; it needs a device, so build it with "
                          f"build_rewards(...) or reward_model_fn(path, device)")
    if ":" in name:
        module_name, attr = name.split(":", 1)
    elif "." in name:
        module_name, attr = name.rsplit(".", 1)
    else:
        close = difflib.get_close_matches(name, list(REWARD_FUNCTIONS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"reward {name!r} is not a built-in reward ({', '.join(REWARD_FUNCTIONS)}); {hint}a user "
                          f"function is named by its dotted path, 'package.module.function', or as "
                          f"'path/to/file.py:function'")
    if not module_name or not attr:
        raise ConfigError(f"reward {name!r}: write a user function as 'package.module.function', "
                          f"'package.module:function' or 'path/to/file.py:function'")
    is_file = module_name.endswith(".py")
    if not is_file and ("/" in module_name or module_name.startswith((".", "~"))):
        raise ConfigError(f"reward {name!r}: {module_name!r} looks like a path; name a function in a Python file as "
                          f"'path/to/file.py:function', or in a module on PYTHONPATH as 'package.module.function'")
    if is_file and not os.path.isfile(os.path.expanduser(module_name)):
        raise ConfigError(f"reward {name!r}: file {module_name!r} does not exist (resolved to "
                          f"{os.path.abspath(os.path.expanduser(module_name))}); paths are relative to the working "
                          "directory")
    try:
        obj = _import_file(module_name) if is_file else importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"reward {name!r}: cannot import module {module_name!r} ({e}); install it or put its "
                          f"folder on PYTHONPATH") from None
    except Exception as e:  # the module itself is broken: a SyntaxError, or code at its top that raises
        raise ConfigError(f"reward {name!r}: importing module {module_name!r} raised "
                          f"{type(e).__name__}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            options = [k for k, v in vars(obj).items() if callable(v) and not k.startswith("_")]
            close = difflib.get_close_matches(part, options, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"its callables: {', '.join(sorted(options)) or 'none'}"
            raise ConfigError(f"reward {name!r}: {module_name!r} has no attribute {part!r}; {hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"reward {name!r} is a {type(obj).__name__}, not a function; name a function "
                          f"fn(completion, *, prompt, answer) -> float")
    _check_signature(name, obj)
    return obj


def _import_file(path: str):
    """The module of a Python file named by its path (`./rewards.py:fn`), imported once per process under a name
    made from its absolute path; its own folder goes on sys.path so that its sibling imports work."""
    file = Path(path).expanduser().resolve()
    name = f"optsys_user_{file.stem}_{hashlib.sha1(str(file).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    if str(file.parent) not in sys.path:
        sys.path.append(str(file.parent))
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def check_reward_names(names: list[str], weights: list[float] | None) -> None:
    """Validate reward names and weights without loading any model (config validation): each name resolves (user
    modules are imported), reward model paths exist, weights (None = all 1.0) match the names and are finite."""
    if not names:
        raise ConfigError("no reward functions given; name at least one, e.g. correct")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"reward {dupes[0]!r} is listed twice; each reward is named once (weight it instead)")
    for name in names:
        if isinstance(name, str) and name.startswith(REWARD_MODEL_PREFIX):
            path = name[len(REWARD_MODEL_PREFIX):]
            if not path:
                raise ConfigError(f"reward {name!r}: give the reward model folder, 'reward_model:<path>'")
            check_local_source(f"reward {name!r}", path)
        else:
            resolve_reward(name)
    if weights is None:
        return
    if len(weights) != len(names):
        raise ConfigError(f"{len(weights)} reward weights {list(weights)} for {len(names)} rewards {list(names)}; "
                          f"give one weight per reward, in the same order (or none: all 1.0)")
    for name, w in zip(names, weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"reward {name!r}: weight {w!r} must be a finite number")


def reward_model_fn(path: str, device, resolve=local_source) -> RewardFn:
    """A reward function scoring (prompt, completion) with a reward model from optsys.trainers.reward.

    Scored as the reward trainer trained it on string prompts: a conversation [user: prompt, assistant:
    completion] when the tokenizer has a chat template, else the text prompt + completion + eos. The returned
    function also has `.score_batch(completions, prompts)` (one packed forward for a batch), which
    score_completions uses; it runs inline (a bounded forward cannot hang).
    """
    import torch

    from optsys.config import ModelConfig
    from optsys.models.reward import load_reward_model, score

    model, tokenizer = load_reward_model(ModelConfig(name_or_path=path), torch.device(device), resolve=resolve)
    model.eval()

    def item(prompt: str, completion: str):
        if tokenizer.chat_template is not None:
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return prompt + completion + (tokenizer.eos_token or "")

    def score_batch(completions: list[str], prompts: list[str]) -> list[float]:
        return score(model, tokenizer, [item(p, c) for p, c in zip(prompts, completions)]).tolist()

    def reward_model(completion: str, *, prompt: str, answer: str | None = None) -> float:
        return score_batch([completion], [prompt])[0]

    reward_model.score_batch = score_batch
    reward_model._optsys_inline = True
    return reward_model


def build_rewards(names: list[str], weights: list[float] | None, device,
                  resolve=local_source) -> list[tuple[str, RewardFn, float]]:
    """(name, function, weight) for score_completions; loads the reward models named 'reward_model:<path>'."""
    check_reward_names(names, weights)
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    return [(n, reward_model_fn(n[len(REWARD_MODEL_PREFIX):], device, resolve) if n.startswith(REWARD_MODEL_PREFIX)
             else resolve_reward(n), w) for n, w in zip(names, weights)]


# ---------------------------------------------------------------------------- scoring with containment


@dataclass
class RewardResult:
    total: list[float]  # per sample: sum over functions of weight * score
    per_function: dict[str, list[float]]  # name -> per-sample scores (unweighted; 0.0 where it failed)
    errors: dict[str, int] = field(default_factory=dict)  # name -> calls that raised or returned a non-number
    timeouts: dict[str, int] = field(default_factory=dict)  # name -> calls scored 0.0 because of a timeout
    failed: dict[str, list[int]] = field(default_factory=dict)  # name -> indices of the samples it failed on


_warned: set[str] = set()  # functions already warned about in this process (on_error="zero")


def _as_score(value) -> float:
    """A finite float from a function's return value (bool is 0/1), else TypeError saying what came back."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) or (hasattr(value, "item") and getattr(value, "ndim", 1) == 0):
        number = float(value.item() if hasattr(value, "item") else value)
        if math.isfinite(number):
            return number
    shown = repr(value)
    shown = shown if len(shown) <= 200 else shown[:200] + "..."
    raise TypeError(f"returned {shown} ({type(value).__name__}), expected a finite float")


def _describe(name: str, i: int, sample, problem: str) -> str:
    prompt, completion = sample[0], sample[1]
    return (f"reward {name!r} on sample {i}: {problem}\n  prompt: {prompt[:200]!r}\n  completion: "
            f"{completion[:200]!r}")


class _Worker:
    """One function's calls over a batch, in order, in a daemon thread (never joined, so a hung call cannot
    block interpreter exit); one Future per call, with the time each call started."""

    def __init__(self, fn, samples):
        self.futures = [concurrent.futures.Future() for _ in samples]
        self.started: list[float | None] = [None] * len(samples)
        self.fn, self.samples = fn, samples
        threading.Thread(target=self._run, daemon=True, name=f"reward-{getattr(fn, '__name__', 'fn')}").start()

    def _run(self):
        for i, (prompt, completion, answer) in enumerate(self.samples):
            self.started[i] = time.monotonic()
            try:
                self.futures[i].set_result(self.fn(completion, prompt=prompt, answer=answer))
            except BaseException as e:  # noqa: BLE001 - contained: reported by the caller
                self.futures[i].set_exception(e)

    def result(self, i: int, timeout_s: float):
        """Call i's return value (or its exception raised here); TimeoutError once it has run timeout_s."""
        while True:
            start = self.started[i] or time.monotonic()
            try:
                return self.futures[i].result(timeout=max(0.0, start + timeout_s - time.monotonic()))
            except concurrent.futures.TimeoutError:
                if self.started[i] is not None and time.monotonic() >= self.started[i] + timeout_s:
                    raise


def score_completions(fns: list[tuple[str, RewardFn, float]], samples: list[tuple[str, str, str | None]], *,
                      timeout_s: float, on_error: str = "error") -> RewardResult:
    """Score (prompt, completion, answer) samples with weighted reward functions; `total` is the weighted sum.

    A call that raises, returns a non-number (None, str, nan, inf, a list; bool counts as 0/1) or runs past
    timeout_s fails: on_error="error" raises RewardError naming the function, the sample, its prompt and
    completion; "zero" scores it 0.0, counts it in `errors` / `timeouts` and warns once per function.

    The timeout is per call. User functions run in a worker thread each (the functions run concurrently with one
    another, each one's calls in order); built-ins and reward models run inline. A hung call cannot be stopped:
    its thread is abandoned, and that call and the function's remaining calls in this batch are timeouts, so a
    function that always hangs costs timeout_s per batch, not per sample.
    """
    if on_error not in ("error", "zero"):
        raise ValueError(f"score_completions: on_error must be 'error' or 'zero', got {on_error!r}")
    if not (timeout_s > 0):
        raise ValueError(f"score_completions: timeout_s must be > 0, got {timeout_s!r}")
    n = len(samples)
    workers = {name: _Worker(fn, samples) for name, fn, _ in fns if not getattr(fn, "_optsys_inline", False) and n}
    per_function: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    timeouts: dict[str, int] = {}
    failed: dict[str, list[int]] = {}

    def fail(name: str, i: int, problem: str, counts: dict, cause: BaseException | None):
        detail = _describe(name, i, samples[i], problem)
        if on_error == "error":
            raise RewardError(detail + "\n  set rl.on_reward_error=zero to score such calls 0.0 and count them "
                              "(reward/errors_<name>), or fix the function") from cause
        counts[name] = counts.get(name, 0) + 1
        failed.setdefault(name, []).append(i)
        if name not in _warned:
            _warned.add(name)
            print(f"warning: {detail}\n  scored 0.0 and counted (reported once per function)", file=sys.stderr,
                  flush=True)

    for name, fn, _ in fns:
        scores = [0.0] * n
        per_function[name] = scores
        batch = getattr(fn, "score_batch", None) if name not in workers else None
        if batch is not None and n:
            try:
                values = list(batch([s[1] for s in samples], [s[0] for s in samples]))
                if len(values) != n:
                    raise ValueError(f"score_batch returned {len(values)} scores for {n} samples")
            except Exception as e:
                for j in range(n):
                    fail(name, j, f"scoring the batch of {n} raised {type(e).__name__}: {e}", errors, e)
                continue
            calls = [(lambda v=v: v) for v in values]
        else:
            calls = [(lambda s=s, fn=fn: fn(s[1], prompt=s[0], answer=s[2])) for s in samples]
        for i in range(n):
            try:
                value = workers[name].result(i, timeout_s) if name in workers else calls[i]()
            except concurrent.futures.TimeoutError:
                for j in range(i, n):  # the worker is stuck on call i: the rest of this batch cannot run
                    fail(name, j, f"timed out after {timeout_s:g} s (timeout_s)", timeouts, None)
                break
            except Exception as e:
                fail(name, i, f"raised {type(e).__name__}: {e}", errors, e)
                continue
            try:
                scores[i] = _as_score(value)
            except TypeError as e:
                fail(name, i, str(e), errors, None)
    total = [sum(w * per_function[name][i] for name, _, w in fns) for i in range(n)]
    return RewardResult(total, per_function, errors, timeouts, failed)
