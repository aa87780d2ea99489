"""Built-in synthetic tasks with verifiable answers.

Each task makes problems (prompt, answer) for a fixed split and emits them as SFT rows, preference
pairs (correct vs wrong answer) or RL prompts, and checks a completion. Splits are fixed by a hash
of the problem itself, so the held-out set never leaks into training whatever the seed or size.
`difficulty` is the number of digits (arithmetic), the list length (sorting) or the steps and number sizes
(word_problems, optsys.data.word_problems).

Each task says how its answers are matched (`Task.match`, optsys.data.answers): "numeric" where the answer is a
number, so a model's natural sentence ("59 + 19 = 78." or "The answer is 78.") scores as 78; "exact" only where
the answer's form is the point of the task (reversed digits, a sorted list).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
import re
from dataclasses import dataclass
from typing import Callable, Iterable

from optsys.data.guess import guess_rows, guess_sft_rows
from optsys.data.word_problems import INSTRUCTION, lower_bound_count, make_word_problem, wrong_solution


def normalize_answer(text: str) -> str:
    """The answer-matching rule (Task.check, and the `correct` reward): trim, collapse inner whitespace runs."""
    return re.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    solution: str | None = None  # a worked solution ending in the answer (SFT rows, chosen side); None: the answer


def _split_of(prompt: str) -> str:
    """1 problem in 8 is held out, decided by the problem text alone."""
    h = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=4).digest(), "little")
    return "test" if h % 8 == 0 else "train"


def _addition(rng: random.Random, difficulty: int) -> Problem:
    """Both operands have exactly `difficulty` digits (0-9 for 1), so digit positions line up."""
    lo, hi = (0 if difficulty == 1 else 10 ** (difficulty - 1)), 10**difficulty
    a, b = rng.randrange(lo, hi), rng.randrange(lo, hi)
    return Problem(f"{a}+{b}=", str(a + b))


def _addition_reversed(rng: random.Random, difficulty: int) -> Problem:
    """The sum written least-significant digit first ("47+85=" -> "231" for 132).

    Each output digit then depends only on digits already seen plus a carry, which small models
    learn far faster than most-significant-first (Lee et al. 2023, "Teaching Arithmetic to Small
    Transformers"). With our 3.4M quickstart model, reversed sums went through their learning
    transition after 0.3-0.8M training tokens in our runs (then to ~1.0 held-out accuracy), while
    plain order was still at 0.8-1.2 nats/token after ~0.9M tokens.
    """
    p = _addition(rng, difficulty)
    return Problem(p.prompt, p.answer[::-1])


def _addition_prompts(difficulty: int) -> Iterable[str]:
    lo, hi = (0 if difficulty == 1 else 10 ** (difficulty - 1)), 10**difficulty
    return (f"{a}+{b}=" for a in range(lo, hi) for b in range(lo, hi))


def _addition_count(difficulty: int) -> int:
    return (10 if difficulty == 1 else 9 * 10 ** (difficulty - 1)) ** 2


def _sorting(rng: random.Random, difficulty: int) -> Problem:
    xs = [rng.randrange(100) for _ in range(difficulty)]
    return Problem("sort: " + " ".join(map(str, xs)), " ".join(map(str, sorted(xs))))


def _sorting_prompts(difficulty: int) -> Iterable[str]:
    return ("sort: " + " ".join(map(str, xs)) for xs in itertools.product(range(100), repeat=difficulty))


def _word_problem(rng: random.Random, difficulty: int) -> Problem:
    p = make_word_problem(rng, difficulty)
    return Problem(f"{p.question}\n{INSTRUCTION}", str(p.answer), p.solution)


def _wrong_word_problem(problem: Problem, rng: random.Random) -> str:
    return wrong_solution(problem.solution, int(problem.answer), rng)


def _word_problem_prompts(difficulty: int) -> Iterable[str]:
    raise ValueError("word_problems has too many distinct problems to list; its count is a lower bound")


def _wrong_addition(problem: Problem, rng: random.Random) -> str:
    value = int(problem.answer)
    delta = rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if value + d >= 0])
    return str(value + delta)


def _wrong_addition_reversed(problem: Problem, rng: random.Random) -> str:
    return _wrong_addition(Problem(problem.prompt, problem.answer[::-1]), rng)[::-1]


def _wrong_sorting(problem: Problem, rng: random.Random) -> str:
    xs = problem.answer.split()
    if len(set(xs)) < 2:
        return " ".join(xs + xs[:1])  # all equal: a wrong length is the only way to be wrong
    while True:
        ys = xs[:]
        i, j = rng.sample(range(len(ys)), 2)
        ys[i], ys[j] = ys[j], ys[i]
        if ys != xs:
            return " ".join(ys)


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[[random.Random, int], Problem]
    wrong: Callable[[Problem, random.Random], str]
    prompts: Callable[[int], Iterable[str]]  # every distinct prompt at a difficulty
    count: Callable[[int], int]  # how many there are (a lower bound where they cannot be listed)
    system: str | None = None
    match: str = "exact"  # how answers are compared (optsys.data.answers): "numeric" or "exact"
    about: str = ""  # one line for --list-tasks: what the task is and why it matches as it does

    def split_sizes(self, difficulty: int) -> tuple[int, int] | None:
        """(train, test) distinct problems at `difficulty`, counted exactly up to 200k problems (a few ms
        for 10k); None beyond, where only `count` is known (the split is about 7/8 : 1/8 of it)."""
        return _split_counts(self.name, difficulty) if self.count(difficulty) <= 200_000 else None

    def problems(self, split: str, n: int, *, difficulty: int, seed: int = 0) -> list[Problem]:
        """`n` distinct problems of `split` ("train" or "test"); deterministic for (seed, difficulty)."""
        if split not in ("train", "test"):
            raise ValueError(f"task {self.name}: split must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"{self.name}-{split}-{difficulty}-{seed}")
        seen: set[str] = set()
        out: list[Problem] = []
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise ValueError(
                    f"task {self.name}: only {len(out)} distinct {split} problems exist at difficulty "
                    f"{difficulty}; lower data.num_train/num_eval or raise data.difficulty"
                )
            p = self.make(rng, difficulty)
            if p.prompt in seen or _split_of(p.prompt) != split:
                continue
            seen.add(p.prompt)
            out.append(p)
        return out

    def messages(self, prompt: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": "user", "content": prompt}]

    def sft_rows(self, split: str, n: int, *, difficulty: int, seed: int = 0) -> list[dict]:
        return [
            {"messages": self.messages(p.prompt) + [{"role": "assistant", "content": p.solution or p.answer}]}
            for p in self.problems(split, n, difficulty=difficulty, seed=seed)
        ]

    def preference_pairs(self, split: str, n: int, *, difficulty: int, seed: int = 0) -> list[dict]:
        rng = random.Random(f"{self.name}-pairs-{split}-{seed}")
        return [
            {"prompt": self.messages(p.prompt), "chosen": p.solution or p.answer, "rejected": self.wrong(p, rng)}
            for p in self.problems(split, n, difficulty=difficulty, seed=seed)
        ]

    def rl_prompts(self, split: str, n: int, *, difficulty: int, seed: int = 0) -> list[dict]:
        return [{"prompt": self.messages(p.prompt), "answer": p.answer}
                for p in self.problems(split, n, difficulty=difficulty, seed=seed)]

    @staticmethod
    def check(completion: str, answer: str) -> bool:
        """Exact match after trimming whitespace and collapsing inner runs of spaces (the string rule; held-out
        accuracy uses the task's `match` through optsys.data.answers)."""
        return normalize_answer(completion) == answer


@dataclass(frozen=True)
class EnvironmentTask:
    """A multi-turn task played against an environment (optsys.rollout.environments) rather than checked.

    "guess": find a secret number in 0..n-1 (n = 5 x difficulty, so 10 at the default 2) from "higher" / "lower"
    replies within rl.max_turns guesses. Its SFT rows are transcripts of legal but random play (each guess uniform
    in the interval still possible), so an SFT start knows the format and rules and RL has room to learn to
    search; RL rows hold the secret (optsys.data.guess). Held-out play runs on a rollout engine, above this layer:
    optsys.rollout.games.evaluate_environment(task.environment, ...) gives the success rate (the RL trainer calls
    it)."""

    name: str
    environment: str  # optsys.rollout.environments.ENVIRONMENTS key
    system: str | None = None

    def env_kwargs(self, difficulty: int) -> dict:
        return {"n": 5 * difficulty}

    def split_sizes(self, difficulty: int) -> tuple[int, int] | None:
        return None  # games are keyed by an unbounded counter: any size can be drawn

    def count(self, difficulty: int) -> int:
        return 10**9

    def sft_rows(self, split: str, n: int, *, difficulty: int, seed: int = 0) -> list[dict]:
        return guess_sft_rows(split, n, n=5 * difficulty, seed=seed, strategy="random")

    def rl_prompts(self, split: str, n: int, *, difficulty: int, seed: int = 0) -> list[dict]:
        return guess_rows(split, n, n=5 * difficulty, seed=seed)


TASKS: dict[str, Task | EnvironmentTask] = {
    "arithmetic": Task("arithmetic", _addition, _wrong_addition, _addition_prompts, _addition_count,
                       match="numeric", about="a+b= with difficulty-digit operands; numeric match (the answer is a "
                       "number, so '59 + 19 = 78.' scores as 78)"),
    "arithmetic_reversed": Task("arithmetic_reversed", _addition_reversed, _wrong_addition_reversed,
                                _addition_prompts, _addition_count, match="exact",
                                about="a+b= answered least-significant digit first; exact match: the reversed "
                                "digit string is the point (read as a number, '02' would equal '2')"),
    "sorting": Task("sorting", _sorting, _wrong_sorting, _sorting_prompts, lambda d: 100**d, match="exact",
                    about="sort a list of numbers; exact match: the whole sorted list is the answer"),
    "word_problems": Task("word_problems", _word_problem, _wrong_word_problem, _word_problem_prompts,
                          lower_bound_count, match="numeric",
                          about="GSM8K-style word problems, 1-3 steps (difficulty: steps and number sizes), worked "
                          "solutions for SFT; numeric match of the answer after 'The answer is'"),
    "guess": EnvironmentTask("guess", "guess"),
}


@functools.lru_cache(maxsize=None)
def _split_counts(name: str, difficulty: int) -> tuple[int, int]:
    test = sum(_split_of(p) == "test" for p in TASKS[name].prompts(difficulty))
    return TASKS[name].count(difficulty) - test, test


def get_task(name: str) -> Task | EnvironmentTask:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)}")
    return TASKS[name]
