"""Metrics of the eval harness against exact combinatorics and brute-force enumeration of k-subsets."""

import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest

from optsys.eval.metrics import (
    accuracy_interval,
    best_of_n,
    best_of_n_at_k,
    maj_at_k,
    majority_vote,
    mcnemar,
    paired_interval,
    pass_at_k,
)


def _subsets_mean(n: int, k: int, value) -> float:
    """Mean of value(subset) over all k-subsets of range(n)."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(value(s) for s in subsets) / len(subsets)


# pass@k

@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 3), (5, 2, 4), (10, 3, 5), (20, 1, 19),
                                   (7, 7, 7)])
def test_pass_at_k_matches_comb_and_enumeration(n, c, k):
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-15)
    # brute force: samples 0..c-1 are correct
    assert pass_at_k(n, c, k) == pytest.approx(_subsets_mean(n, k, lambda s: any(i < c for i in s)), abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(2000, 7, 100), (2000, 1, 1), (2000, 1500, 3), (100000, 3, 10), (500, 499, 1)])
def test_pass_at_k_large_n_exact(n, c, k):
    exact = float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))
    got = pass_at_k(n, c, k)
    assert got == pytest.approx(exact, rel=1e-12, abs=1e-15)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 8, 3) == 1.0  # n - c = 2 < k
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)
    assert pass_at_k(np.int64(10), np.int64(1), 1) == pytest.approx(0.1)


@pytest.mark.parametrize("args,words", [
    ((0, 0, 1), "n must be >= 1, got 0"), ((5, -1, 1), "c must be >= 0, got -1"), ((5, 6, 1), "c=6"),
    ((5, 1, 0), "k must be >= 1, got 0"), ((5, 1, 6), "k=6"), ((5.0, 1, 1), "n must be an integer, got 5.0"),
    ((5, True, 1), "c must be an integer, got True"), ((5, 1, 2.5), "k must be an integer, got 2.5"),
])
def test_pass_at_k_refuses_impossible_arguments(args, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        pass_at_k(*args)


# majority vote and maj@k

def test_majority_vote_rule():
    assert majority_vote(["b", "a", "b", None, None, None]) == "b"
    assert majority_vote(["b", "a"]) == "a"  # tie: smallest string
    assert majority_vote(["b", "a", "c", "c", "b"]) == "b"
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None
    # independent of sample order
    pool = ["7", "3", "7", "3", None, "5"]
    assert {majority_vote(list(p)) for p in itertools.permutations(pool)} == {"3"}


def _brute_maj(answers, correct, k):
    right = {a: ok for a, ok in zip(answers, correct) if a is not None}

    def value(subset):
        vote = majority_vote([answers[i] for i in subset])
        return vote is not None and right[vote]

    return _subsets_mean(len(answers), k, value)


def _random_pool(rng: random.Random, n: int):
    vocab = rng.sample(["1", "2", "10", "a", "b", "zz"], rng.randint(1, 4))
    answers = [None if rng.random() < 0.2 else rng.choice(vocab) for _ in range(n)]
    truth = {v: rng.random() < 0.5 for v in vocab}
    correct = [False if a is None else truth[a] for a in answers]
    return answers, correct


def test_maj_at_k_equals_brute_force_on_random_pools():
    rng = random.Random(0)
    checked = 0
    for _ in range(150):
        n = rng.randint(1, 10)
        answers, correct = _random_pool(rng, n)
        for k in range(1, n + 1):
            assert maj_at_k(answers, correct, k) == pytest.approx(_brute_maj(answers, correct, k), abs=1e-12), \
                (answers, correct, k)
            checked += 1
        # k = n: the vote of the whole pool
        vote = majority_vote(answers)
        assert maj_at_k(answers, correct, n) == float(vote is not None and correct[answers.index(vote)])
        # k = 1: the fraction of correct samples
        assert maj_at_k(answers, correct, 1) == pytest.approx(sum(correct) / n, abs=1e-12)
    assert checked > 500


def test_maj_at_k_ties_and_unparsed():
    # "a" beats "b" on ties: with k=2 from [a, b], the vote is always "a"
    assert maj_at_k(["b", "a"], [False, True], 2) == 1.0
    assert maj_at_k(["b", "a"], [True, False], 2) == 0.0
    assert maj_at_k([None, None, None], [False, False, False], 2) == 0.0
    # unparsed samples' own correctness is ignored; a subset of only unparsed ones is wrong
    answers, correct = [None, "x", None, "x"], [True, True, False, True]
    assert maj_at_k(answers, correct, 2) == pytest.approx(5 / 6)
    assert maj_at_k(answers, correct, 2) == pytest.approx(_brute_maj(answers, correct, 2))


def test_maj_at_k_many_samples_matches_monte_carlo():
    rng = random.Random(1)
    answers = [rng.choice(["4", "4", "5", "6", None]) for _ in range(60)]
    correct = [a == "4" for a in answers]
    exact = maj_at_k(answers, correct, 15)
    draws = 4000
    hits = 0
    for _ in range(draws):
        vote = majority_vote(rng.sample(answers, 15))
        hits += vote == "4"
    assert abs(exact - hits / draws) < 4 * math.sqrt(0.25 / draws)
    # and 256 samples at k = 128 stay cheap (exact ints, polynomial time)
    big = [rng.choice(["4", "5", "6", None]) for _ in range(256)]
    assert 0.0 <= maj_at_k(big, [a == "4" for a in big], 128) <= 1.0


def test_maj_at_k_errors():
    with pytest.raises(ValueError, match="answer 'x' is marked both correct and incorrect"):
        maj_at_k(["x", "y", "x"], [True, False, False], 1)
    with pytest.raises(ValueError, match="answers has 2 entries but correct has 1"):
        maj_at_k(["x", "y"], [True], 1)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        maj_at_k(["x"], [True], 0)
    with pytest.raises(ValueError, match="k=3 is more than the n=2"):
        maj_at_k(["x", "y"], [True, False], 3)


# best-of-N

def test_best_of_n_rule():
    assert best_of_n([0.1, 0.9, 0.3]) == 1
    assert best_of_n([0.5, 0.9, 0.9]) == 1  # tie: lowest index
    assert best_of_n([math.nan, 0.2, math.nan, 0.2]) == 1  # NaN is never chosen
    assert best_of_n([math.nan, -math.inf]) == 1
    assert best_of_n([math.nan, math.nan]) == 0
    with pytest.raises(ValueError, match="scores is empty"):
        best_of_n([])


def test_best_of_n_at_k_equals_brute_force():
    rng = random.Random(2)
    for _ in range(150):
        n = rng.randint(1, 9)
        scores = [rng.choice([0.0, 0.5, 1.0, math.nan, rng.random()]) for _ in range(n)]
        correct = [rng.random() < 0.5 for _ in range(n)]
        for k in range(1, n + 1):
            def value(subset, scores=scores, correct=correct):
                return correct[subset[best_of_n([scores[i] for i in subset])]]

            assert best_of_n_at_k(scores, correct, k) == pytest.approx(_subsets_mean(n, k, value), abs=1e-12), \
                (scores, correct, k)
        assert best_of_n_at_k(scores, correct, 1) == pytest.approx(sum(correct) / n, abs=1e-12)


def test_best_of_n_at_k_errors():
    with pytest.raises(ValueError, match="scores has 2 entries but correct has 3"):
        best_of_n_at_k([0.1, 0.2], [True, False, True], 1)
    with pytest.raises(ValueError, match="k=3 is more than the n=2"):
        best_of_n_at_k([0.1, 0.2], [True, False], 3)


# bootstrap intervals

def test_accuracy_interval_mean_and_determinism():
    per_question = [[1, 0, 1], [0], [1, 1], [0, 0, 0, 1]]
    mean, low, high = accuracy_interval(per_question)
    assert mean == pytest.approx((2 / 3 + 0 + 1 + 1 / 4) / 4)
    assert low <= mean <= high
    assert accuracy_interval(per_question) == (mean, low, high)
    scores = np.random.default_rng(0).random((30, 3)).tolist()
    assert accuracy_interval(scores, seed=7) == accuracy_interval(scores, seed=7)
    assert accuracy_interval(scores, seed=7)[1:] != accuracy_interval(scores, seed=8)[1:]
    _, low90, high90 = accuracy_interval(per_question, level=0.5)
    assert low <= low90 <= high90 <= high


def test_accuracy_interval_width_shrinks_as_one_over_sqrt_questions():
    rng = np.random.default_rng(0)
    widths = {}
    for q in (100, 400):
        per_question = (rng.random((q, 4)) < 0.6).astype(float).tolist()
        mean, low, high = accuracy_interval(per_question)
        assert low < mean < high
        widths[q] = high - low
    assert 1.6 < widths[100] / widths[400] < 2.5


def test_accuracy_interval_coverage():
    rng = np.random.default_rng(3)
    covered = 0
    for i in range(200):
        data = (rng.random((100, 1)) < 0.6).astype(float).tolist()
        _, low, high = accuracy_interval(data, resamples=1000, seed=i)
        covered += low <= 0.6 <= high
    assert 180 <= covered <= 198


def test_accuracy_interval_resamples_questions_not_samples():
    rng = np.random.default_rng(4)
    single = (rng.random(50) < 0.5).astype(float)
    one = accuracy_interval([[s] for s in single])
    eight = accuracy_interval([[s] * 8 for s in single])
    assert eight == one  # repeats of one question add no information about other questions
    assert one[2] - one[1] > 0.1


def test_accuracy_interval_edges_and_errors():
    mean, low, high = accuracy_interval([[1.0, 0.0]])
    assert mean == 0.5 and math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError, match="per_question has no questions"):
        accuracy_interval([])
    with pytest.raises(ValueError, match=r"per_question\[1\] must be a non-empty list"):
        accuracy_interval([[1.0], []])
    with pytest.raises(ValueError, match=r"per_question\[0\] holds a non-finite score"):
        accuracy_interval([[math.nan], [1.0]])
    with pytest.raises(ValueError, match="level must be in"):
        accuracy_interval([[1.0], [0.0]], level=95)
    with pytest.raises(ValueError, match="resamples must be >= 1"):
        accuracy_interval([[1.0], [0.0]], resamples=0)


def test_paired_interval_is_narrower_than_unpaired_on_correlated_models():
    rng = np.random.default_rng(5)
    q = 200
    difficulty = rng.random(q)
    a = (rng.random((q, 16)) < np.clip(difficulty + 0.05, 0, 1)[:, None]).astype(float)
    b = (rng.random((q, 16)) < difficulty[:, None]).astype(float)
    diff, low, high = paired_interval(a.tolist(), b.tolist())
    assert diff == pytest.approx(a.mean(axis=1).mean() - b.mean(axis=1).mean())
    assert low <= diff <= high
    # unpaired: independent question resamples for each model
    ma, mb = a.mean(axis=1), b.mean(axis=1)
    boot = np.random.default_rng(0)
    unpaired = ma[boot.integers(0, q, (2000, q))].mean(axis=1) - mb[boot.integers(0, q, (2000, q))].mean(axis=1)
    u_low, u_high = np.quantile(unpaired, [0.025, 0.975])
    assert (high - low) < 0.5 * (u_high - u_low)


def test_paired_interval_identical_and_errors():
    data = [[1.0, 0.0], [1.0], [0.0, 0.0, 1.0]]
    assert paired_interval(data, data) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="a has 3 questions but b has 2"):
        paired_interval(data, data[:2])


# McNemar

def _exact_mcnemar_p(b10: int, b01: int) -> float:
    m = b10 + b01
    tail = Fraction(sum(math.comb(m, i) for i in range(min(b10, b01) + 1)), 2**m)
    return float(min(Fraction(1), 2 * tail))


def test_mcnemar_exact_values():
    # 10 questions only a gets right, 2 only b, 5 both, 3 neither
    a = [True] * 10 + [False] * 2 + [True] * 5 + [False] * 3
    b = [False] * 10 + [True] * 2 + [True] * 5 + [False] * 3
    result = mcnemar(a, b)
    assert result["a_only"] == 10 and result["b_only"] == 2 and result["n"] == 20
    assert result["p_value"] == pytest.approx(2 * (1 + 12 + 66) / 4096, abs=1e-15)  # 0.0385742...
    assert result["p_value"] == pytest.approx(0.03857421875)
    assert mcnemar(b, a)["p_value"] == result["p_value"]
    for b10, b01 in [(0, 1), (3, 3), (1, 6), (40, 25), (0, 0)]:
        a = [True] * b10 + [False] * b01 + [True]
        b = [False] * b10 + [True] * b01 + [True]
        assert mcnemar(a, b)["p_value"] == pytest.approx(_exact_mcnemar_p(b10, b01), abs=1e-15)


def test_mcnemar_edges():
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0
    assert mcnemar([], [])["p_value"] == 1.0
    assert mcnemar([True, True, True], [True, True, True])["n"] == 3
    with pytest.raises(ValueError, match="a has 2 questions but b has 1"):
        mcnemar([True, False], [True])
