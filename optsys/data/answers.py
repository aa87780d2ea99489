"""Answer extraction and matching: one rule for RL rewards, training-time eval and `python -m optsys.eval`.

    completion --extract_answer--> answer text (after any thinking block; the last marker wins) or None
               --canonical_answer(match)--> the form two answers are compared (and voted) in, or None (unparsed)

`match` is "exact" (whitespace-normalized string equality, Task.check's rule) or "numeric" (the answer is read as
a number: commas, '$' and a trailing '%' dropped; equal within 1e-6 relative). An answer that cannot be read in the
task's match mode is *unparsed*: it counts as wrong and is reported separately (eval/unparsed_rate).
"""

from __future__ import annotations

import math
import re

from optsys.data.tasks import normalize_answer

MATCH_MODES = ("exact", "numeric")

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_ANSWER_LINE = re.compile(r"\banswer\s*(?:is)?\s*:[ \t]*([^\n]*)", re.IGNORECASE)
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
# A number: thousands groups of exactly 3 digits ("1,234,567") or plain digits, optional sign, decimals, '$', '%'.
_NUMBER = re.compile(r"(?<![\w.])[-+]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?(?![\w])|(?<![\w.])[-+]?\$?\.\d+%?")


def _boxed(text: str) -> list[tuple[int, str]]:
    """(start, content) of every balanced `\\boxed{...}`; nested braces allowed, an unbalanced one is skipped."""
    out = []
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append((m.start(), text[m.end(): i - 1]))
    return out


def find_answer(text: str) -> tuple[str | None, bool]:
    """(answer text, whether an answer marker was found); (None, False) when there is no answer.

    Only the text after the last `</think>` counts (a `</think>` without `<think>` is fine: chat templates often
    open the block in the prompt); a `<think>` left open means the model never answered. Of the answer markers
    (`\\boxed{...}`, an `answer:` / `answer is:` line in any case, `####`) the last one in the text wins; without a
    marker the whole remaining text is the answer. An empty answer is None.
    """
    rest = text.rsplit(_THINK_CLOSE, 1)[-1]
    if _THINK_OPEN in rest:
        return None, False
    found = _boxed(rest)
    found += [(m.start(), m.group(1)) for m in _ANSWER_LINE.finditer(rest)]
    found += [(m.start(), m.group(1)) for m in _HASHES.finditer(rest)]
    answer = max(found)[1] if found else rest
    return (answer.strip() or None), bool(found)


def extract_answer(text: str) -> str | None:
    """The answer in a completion, stripped; None if there is none (see find_answer)."""
    return find_answer(text)[0]


def parse_number(text: str | None) -> float | None:
    """A finite number from text like '1,234.5', '$12', '-3', '50%' (commas, '$' and a trailing '%' dropped)."""
    if text is None:
        return None
    s = text.strip().replace(",", "").replace("$", "").removesuffix("%").strip()
    try:
        value = float(s)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _format_number(value: float) -> str:
    """One spelling per value, so equal numbers vote together: '12' for 12.0, '0.5' for .50, '-3' for -3."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(f"{value:.12g}"))


def numeric_answer(text: str) -> float | None:
    """The number a completion answers with, or None.

    The extracted answer read as a number if it is one; else, after a marker ("answer: 42 apples", "#### 1,234
    dollars") the first number that follows it, and without a marker ("so the total is 1,234.") the last number in
    the text (models state the result last)."""
    answer, marked = find_answer(text)
    if answer is None:
        return None
    whole = parse_number(answer)
    if whole is not None:
        return whole
    numbers = _NUMBER.findall(answer)
    if not numbers:
        return None
    return parse_number(numbers[0] if marked else numbers[-1])


def canonical_answer(completion: str, match: str = "exact") -> str | None:
    """The completion's answer in the form answers are compared and voted in; None = unparsed."""
    if match == "exact":
        answer = extract_answer(completion)
        return None if answer is None else normalize_answer(answer)
    if match == "numeric":
        value = numeric_answer(completion)
        return None if value is None else _format_number(value)
    raise ValueError(f"unknown answer match {match!r}; valid: {', '.join(MATCH_MODES)}")


def canonical_reference(answer: str, match: str = "exact") -> str:
    """The reference answer in canonical form (a numeric reference must be a number: the error names it)."""
    if match == "numeric":
        value = parse_number(answer)
        if value is None:
            raise ValueError(f"reference answer {answer!r} is not a number, so match=numeric cannot compare with "
                             "it; use match=exact, or an answer_pattern that picks the number out of the field")
        return _format_number(value)
    return canonical_answer(answer, "exact") or ""


def answers_match(got: str | None, reference: str, match: str = "exact") -> bool:
    """Canonical answer vs canonical reference: equal strings (exact) or numbers within 1e-6 relative (numeric)."""
    if got is None:
        return False
    if match == "numeric":
        return math.isclose(float(got), float(reference), rel_tol=1e-6, abs_tol=0.0)
    return got == reference
