"""Evaluation metrics over N samples per question: pass@k, unbiased maj@k and best-of-N@k, bootstrap
intervals and McNemar's test.

Every @k estimator here is the exact expectation, over uniformly random k-subsets of the n samples drawn,
of the rule applied at test time to k samples (Chen et al. 2021's argument for pass@k). Reporting the rule
on the first k samples instead (lm-eval-harness's maj@k) is unbiased too but has far more variance, and
makes the curve depend on sample order. The sums run in exact integers, so they are exact for any n.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

_BOOTSTRAP_ELEMENTS = 1 << 22  # resample indices drawn per chunk: bounds the bootstrap's memory (~32 MiB)


def _count(name: str, value, *, low: int = 0) -> int:
    """value as a Python int >= low, or a ValueError naming the argument (bool is refused: True is not a count)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _check_k(k, n: int) -> int:
    k = _count("k", k, low=1)
    if k > n:
        raise ValueError(f"k={k} is more than the n={n} samples drawn: draw at least k samples per question")
    return k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, eq. 1).

    C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i); the product is summed in log space (fsum of log1p)
    and 1 - exp(.) taken with expm1, so small pass@k keeps its relative precision and large n cannot
    overflow a float as C(n, k) would."""
    n = _count("n", n, low=1)
    c = _count("c", c)
    if c > n:
        raise ValueError(f"c={c} correct samples is more than n={n} samples")
    k = _check_k(k, n)
    if c == 0:
        return 0.0
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return -math.expm1(math.fsum(math.log1p(-k / i) for i in range(n - c + 1, n + 1)))


def majority_vote(answers: list[str | None]) -> str | None:
    """Self-consistency's answer: the most frequent parsed answer (None entries are unparsed and skipped).

    None when nothing parsed. A tie goes to the smallest string (Python `min`), not to the answer seen first:
    the winner then depends only on the multiset of answers, never on sample order, so `maj_at_k`'s average
    over k-subsets is exactly the expectation of this very rule (a first-seen rule would make the winner of a
    subset depend on an order that the subset does not have)."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return min(a for a, count in counts.items() if count == top)


def _truncated_product(factors: list[list[int]], degree: int) -> list[int]:
    """Coefficients 0..degree of the product of polynomials (coefficient lists), in exact integers."""
    out = [1] + [0] * degree
    for poly in factors:
        new = [0] * (degree + 1)
        for i, a in enumerate(out):
            if a:
                for j, b in enumerate(poly[: degree + 1 - i]):
                    new[i + j] += a * b
        out = new
    return out


def maj_at_k(answers: list[str | None], correct: list[bool], k: int) -> float:
    """Unbiased maj@k: the expected correctness of `majority_vote` on a uniformly random k-subset of the n samples.

    answers[i] is sample i's canonical answer (None: unparsed) and correct[i] whether it is right; samples with
    the same answer must agree on correctness. A subset with no parsed answer counts as wrong (and an unparsed
    sample's own `correct` is ignored).

    Exact, in polynomial time: answer v with count c_v wins a subset holding j of its copies when every answer w
    sorting before v (which would win a tie) holds at most j-1 copies, every answer after v at most j, and the
    unparsed samples any number. The number of such k-subsets is C(c_v, j) times the x^(k-j) coefficient of
    prod_w (sum_{i <= limit_w} C(c_w, i) x^i) * (1 + x)^unparsed. An answer whose count is within its limit
    contributes an untruncated (1 + x)^c_w, so those merge with the unparsed ones into one binomial row.
    Only right answers are summed: O(c_v * k * n) big-int products each."""
    if len(answers) != len(correct):
        raise ValueError(f"answers has {len(answers)} entries but correct has {len(correct)}: give one per sample")
    n = len(answers)
    if n == 0:
        raise ValueError("answers is empty: maj@k needs at least k samples")
    k = _check_k(k, n)
    counts: Counter[str] = Counter()
    right: dict[str, bool] = {}
    for answer, ok in zip(answers, correct):
        if answer is None:
            continue
        counts[answer] += 1
        if right.setdefault(answer, bool(ok)) != bool(ok):
            raise ValueError(f"answer {answer!r} is marked both correct and incorrect: correctness must be a "
                             "function of the canonical answer")
    unparsed = n - sum(counts.values())
    order = sorted(counts)
    wins = 0  # number of k-subsets whose vote is right
    for rank, v in enumerate(order):
        if not right[v]:
            continue
        c_v = counts[v]
        for j in range(1, min(c_v, k) + 1):
            rest = k - j
            free = unparsed  # samples that may appear any number of times
            factors = []
            for other_rank, w in enumerate(order):
                if w == v:
                    continue
                limit = j - 1 if other_rank < rank else j
                if counts[w] <= limit:
                    free += counts[w]
                else:
                    factors.append([math.comb(counts[w], i) for i in range(limit + 1)])
            factors.append([math.comb(free, i) for i in range(min(free, rest) + 1)])
            wins += math.comb(c_v, j) * _truncated_product(factors, rest)[rest]
    return wins / math.comb(n, k)  # int / int is correctly rounded in Python


def _nan_last_order(scores: list[float]) -> list[int]:
    """Sample indices in `best_of_n`'s preference order: score descending, NaN last, ties by index."""
    values = [float(s) for s in scores]

    def key(i: int) -> tuple[bool, float, int]:
        nan = math.isnan(values[i])
        return nan, 0.0 if nan else -values[i], i

    return sorted(range(len(values)), key=key)


def best_of_n(scores: list[float]) -> int:
    """Index of the best-scored sample; ties go to the lowest index; NaN is never chosen unless all are NaN (then 0)."""
    if len(scores) == 0:
        raise ValueError("scores is empty: best_of_n needs at least one scored sample")
    return _nan_last_order(scores)[0]


def best_of_n_at_k(scores: list[float], correct: list[bool], k: int) -> float:
    """Unbiased best-of-N@k: the expected correctness of `best_of_n` on a uniformly random k-subset of n samples.

    `best_of_n` picks, in any subset, the member that comes first in one fixed order (score descending, NaN last,
    index ascending), so the sample at rank r of that order is picked exactly when it is in the subset and the
    r samples ranked above it are not: C(n-1-r, k-1) of the C(n, k) subsets."""
    if len(scores) != len(correct):
        raise ValueError(f"scores has {len(scores)} entries but correct has {len(correct)}: give one per sample")
    n = len(scores)
    if n == 0:
        raise ValueError("scores is empty: best-of-N@k needs at least k samples")
    k = _check_k(k, n)
    order = _nan_last_order(scores)
    wins = sum(math.comb(n - 1 - r, k - 1) for r, i in enumerate(order) if correct[i])
    return wins / math.comb(n, k)


def _question_means(per_question: list[list[float]], name: str) -> np.ndarray:
    if len(per_question) == 0:
        raise ValueError(f"{name} has no questions")
    means = np.empty(len(per_question))
    for q, scores in enumerate(per_question):
        values = np.asarray(scores, dtype=float)
        if values.ndim != 1 or values.size == 0:
            raise ValueError(f"{name}[{q}] must be a non-empty list of sample scores, got {scores!r}")
        if not np.isfinite(values).all():
            raise ValueError(f"{name}[{q}] holds a non-finite score: {scores!r}")
        means[q] = values.mean()
    return means


def _bootstrap(values: np.ndarray, level: float, resamples: int, seed: int) -> tuple[float, float, float]:
    """(mean, low, high): the mean of values and its percentile-bootstrap interval, resampling the entries.

    With one entry there is nothing to resample from (every bootstrap mean equals the mean, a zero width that
    would claim certainty), so low and high are NaN: an interval needs at least two questions."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    resamples = _count("resamples", resamples, low=1)
    mean = float(values.mean())
    m = values.size
    if m < 2:
        return mean, math.nan, math.nan
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_ELEMENTS // m)
    boot = np.concatenate([values[rng.integers(0, m, size=(min(chunk, resamples - start), m))].mean(axis=1)
                           for start in range(0, resamples, chunk)])
    low, high = np.quantile(boot, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return mean, float(low), float(high)


def accuracy_interval(per_question: list[list[float]], *, level: float = 0.95, resamples: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): mean over questions of each question's mean score, with a percentile-bootstrap interval.

    The bootstrap resamples questions with replacement, a question's samples staying together: repeats of one
    question are correlated, so resampling samples would understate the uncertainty that comes from which
    questions the benchmark holds. Questions may have different numbers of samples. One question: (mean, nan,
    nan), since there is no spread between questions to resample."""
    return _bootstrap(_question_means(per_question, "per_question"), level, resamples, seed)


def paired_interval(a: list[list[float]], b: list[list[float]], *, level: float = 0.95, resamples: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
    """(diff, low, high): mean(a) - mean(b) over the same questions, with a paired bootstrap interval.

    a[i] and b[i] are two models' sample scores on question i; one resample of question indices serves both, so
    what the models share (a question's difficulty) cancels and the interval is that of the difference alone."""
    if len(a) != len(b):
        raise ValueError(f"a has {len(a)} questions but b has {len(b)}: a paired interval needs the same questions")
    diff = _question_means(a, "a") - _question_means(b, "b")
    return _bootstrap(diff, level, resamples, seed)


def mcnemar(a: list[bool], b: list[bool]) -> dict:
    """McNemar's exact test of two models' single-sample correctness on the same questions.

    a_only: questions a got right and b wrong; b_only: the reverse. Under the null each discordant question is
    a fair coin, so p = min(1, 2 * P[X <= min(a_only, b_only)]) with X ~ Bin(a_only + b_only, 1/2), computed in
    exact integers; 1.0 when no question is discordant."""
    if len(a) != len(b):
        raise ValueError(f"a has {len(a)} questions but b has {len(b)}: McNemar's test needs the same questions")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    discordant = a_only + b_only
    tail = sum(math.comb(discordant, i) for i in range(min(a_only, b_only) + 1))
    p_value = min(1.0, 2 * tail / 2**discordant)
    return {"a_only": a_only, "b_only": b_only, "p_value": p_value, "n": len(a)}
