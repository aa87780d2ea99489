"""Answer extraction and matching (optsys.data.answers): the one rule for rewards, trainer eval and optsys.eval."""

import pytest

from optsys.data.answers import answers_match, canonical_answer, canonical_reference, extract_answer, numeric_answer

# (completion, match, canonical answer or None = unparsed)
TRICKY = [
    ("132", "exact", "132"),
    ("  1 2  3 ", "exact", "1 2 3"),
    ("<think>maybe 7</think>42", "exact", "42"),  # the thinking block is not the answer
    ("reasoning without opening</think> 42", "exact", "42"),  # the template opened the block in the prompt
    ("<think>still thinking, 7 then 9", "exact", None),  # never closed: no answer
    ("<think>a</think>b<think>c", "exact", None),  # reopened after closing: no answer
    ("", "exact", None),
    ("   ", "exact", None),
    ("so \\boxed{17} or rather \\boxed{18}", "exact", "18"),  # the last marker wins
    ("\\boxed{\\frac{1}{2}}", "exact", "\\frac{1}{2}"),  # nested braces
    ("Answer: 12\nanswer: 13", "exact", "13"),
    ("#### 5\nthen \\boxed{6}", "exact", "6"),
    ("\\boxed{6}\n#### 5", "exact", "5"),
    ("1,234", "numeric", "1234"),
    ("The total is 1,234.", "numeric", "1234"),  # no marker: the last number in the text
    ("-3", "numeric", "-3"),
    ("answer: -3 degrees, not 5", "numeric", "-3"),  # after a marker: the first number after it
    ("#### $1,000,000", "numeric", "1000000"),
    ("it is 50%", "numeric", "50"),
    ("0.50", "numeric", "0.5"),
    ("12.0", "numeric", "12"),
    ("3, 4 and 5", "numeric", "5"),  # a list: '3, 4' is not a thousands group
    ("<think>the sum is 99</think>the answer is: 100", "numeric", "100"),
    ("no digits here", "numeric", None),
    ("<think>41", "numeric", None),
    ("x2y", "numeric", None),  # digits glued to words are not a number
]


@pytest.mark.parametrize("completion,match,expected", TRICKY)
def test_canonical_answer_on_tricky_strings(completion, match, expected):
    assert canonical_answer(completion, match) == expected


def test_match_modes_and_references():
    assert answers_match(canonical_answer("1,234", "numeric"), canonical_reference("1234", "numeric"), "numeric")
    assert answers_match(canonical_answer("0.3333333", "numeric"), canonical_reference("0.33333333", "numeric"),
                         "numeric")  # 1e-6 relative
    assert not answers_match(canonical_answer("0.33", "numeric"), canonical_reference("0.333", "numeric"), "numeric")
    assert not answers_match(None, "1", "exact")
    assert answers_match(canonical_answer(" 1  2 ", "exact"), canonical_reference("1 2"), "exact")
    with pytest.raises(ValueError, match="not a number"):
        canonical_reference("twelve", "numeric")
    with pytest.raises(ValueError, match="unknown answer match"):
        canonical_answer("1", "fuzzy")


def test_extract_answer_is_the_rewards_rule():
    from optsys.rollout import rewards

    assert rewards.extract_answer is extract_answer
    assert rewards.numeric("answer: 42 apples", prompt="", answer="42") == 1.0
    assert numeric_answer("answer: 42 apples") == 42.0
