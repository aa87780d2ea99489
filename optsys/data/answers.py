"""Answer extraction and matching: one rule for RL rewards, training-time eval and `python -m optsys.eval`.

    completion --extract_answer--> answer text (after any thinking block; the last marker wins) or None
               --canonical_answer(match)--> the form two answers are compared (and voted) in, or None (unparsed)

`match` is one of MATCH_MODES:
  - "exact": whitespace-normalized string equality (Task.check's rule);
  - "numeric": the answer is read as a number ('$', a trailing '%' and thousands commas "1,234" dropped); an
    integer reference must be met exactly, a non-integer one within 1e-6 relative. A number the rule cannot read
    for sure (part of an expression such as `\\frac{1}{2}`, `2^{10}`, `3/4`, or a comma that is not a thousands
    group, "2,50") is not guessed at: the answer is unparsed;
  - "math": symbolic equivalence through math-verify (fractions, LaTeX, powers, intervals, sets): `\\frac{1}{2}`,
    `1/2` and `0.5` are equal.
An answer that cannot be read in the task's match mode is *unparsed*: it counts as wrong and is reported
separately (eval/unparsed_rate).
"""

from __future__ import annotations

import functools
import math
import re
import threading
from decimal import Decimal, InvalidOperation

from optsys.data.tasks import normalize_answer

MATCH_MODES = ("exact", "numeric", "math")

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
# "answer: 42", "Answer is: 42", "The answer is 42." (GSM8K-CoT's strict match and the Qwen math graders read the
# last form); the rest of the line is the answer.
_ANSWER_LINE = re.compile(r"\banswer\s*(?:is\s*:?|:)[ \t]*([^\n]*)", re.IGNORECASE)
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
# A number: thousands groups of exactly 3 digits ("1,234,567") or plain digits, optional sign, decimals, '$', '%'.
_NUMBER = re.compile(r"(?<![\w.])[-+]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?(?![\w])|(?<![\w.])[-+]?\$?\.\d+%?")
_PLAIN = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[-+]?\.\d+")  # what parse_number reads, whole
# A number glued to one of these is part of an expression (2^{10}, 3/4, \frac{1}{2}, 5-3, 2\pi), not the answer.
_EXPRESSION = set("/^{}_\\*+-")
_OPERATORS, _OPERAND_END, _OPERAND_START = set("/^*+-×÷"), set("0123456789)}"), set("0123456789({\\")


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


def _line_answer(text: str) -> str:
    """A marker's line up to the end of its first sentence ("The answer is 42. 17 is less." -> "42")."""
    text = re.split(r"\.\s", text.strip(), maxsplit=1)[0]
    return text[:-1] if text.endswith(".") and not text.endswith("..") else text


def find_answer(text: str) -> tuple[str | None, bool]:
    """(answer text, whether an answer marker was found); (None, False) when there is no answer.

    Only the text after the last `</think>` counts (a `</think>` without `<think>` is fine: chat templates often
    open the block in the prompt); a `<think>` left open means the model never answered. Of the answer markers
    (`\\boxed{...}`, an `answer:` / `answer is:` / `answer is` line in any case, `####`) the last one in the text
    wins; without a marker the whole remaining text is the answer. An empty answer is None.
    """
    rest = text.rsplit(_THINK_CLOSE, 1)[-1]
    if _THINK_OPEN in rest:
        return None, False
    found = _boxed(rest)
    found += [(m.start(), _line_answer(m.group(1))) for m in _ANSWER_LINE.finditer(rest)]
    found += [(m.start(), m.group(1)) for m in _HASHES.finditer(rest)]
    answer = max(found)[1] if found else rest
    return (answer.strip() or None), bool(found)


def extract_answer(text: str) -> str | None:
    """The answer in a completion, stripped; None if there is none (see find_answer)."""
    return find_answer(text)[0]


def _clean(text: str) -> str:
    """LaTeX spellings of plain numbers: `1{,}234` -> 1,234, `\\$` -> $, `\\%` -> %, `$...$` math delimiters off."""
    text = text.replace("{,}", ",").replace("\\$", "$").replace("\\%", "%").strip()
    if len(text) > 1 and text.startswith("$") and text.endswith("$") and text.count("$") == 2:
        text = text[1:-1].strip()  # "$12$" is math mode around 12; "$12" is twelve dollars
    return text


def _parse_decimal(text: str | None) -> Decimal | None:
    """The number a whole string spells ('1,234.5', '$12', '-3', '50%', '42.'), exactly, or None."""
    if text is None:
        return None
    s = _clean(text)
    sign = s[:1] if s[:1] in "+-" else ""
    s = s[len(sign):].strip().removeprefix("$").removesuffix("%").strip()
    if not _PLAIN.fullmatch(s):
        return None  # "2,50", "1e5", "1_000", "inf": not read as numbers
    try:
        return Decimal(sign + s.replace(",", ""))
    except InvalidOperation:
        return None


def parse_number(text: str | None) -> float | None:
    """A finite number from text like '1,234.5', '$12', '-3', '50%' ('$', '%' and thousands commas dropped);
    None for anything else, including a comma that is not a thousands group ('2,50')."""
    value = _parse_decimal(text)
    return None if value is None else float(value)


def _glued(text: str, start: int, end: int) -> bool:
    """Whether text[start:end] (a number) is part of a larger expression: 3/4, 2^{10}, \\frac{1}{2}, 2,50, 5-3."""
    before = text[start - 1] if start > 0 else " "
    after = text[end] if end < len(text) else " "
    if text[start] in "+-" and start > 0 and text[start - 1] not in " \t(=:":
        return True
    if before in _EXPRESSION or after in _EXPRESSION:
        return True
    if before in ",." and start > 1 and text[start - 2].isdigit():  # the "50" of "2,50"
        return True
    if after in ",." and end + 1 < len(text) and text[end + 1].isdigit():  # "2,50", "1.2.3"
        return True
    # spaced operators: "3 / 4", "5 - 3", "2 ^ 10" (an operand on the other side), not "42 - that is all"
    left, right = text[:start].rstrip(), text[end:].lstrip()
    if left[-1:] in _OPERATORS and left[:-1].rstrip()[-1:] in _OPERAND_END:
        return True
    return right[:1] in _OPERATORS and right[1:].lstrip()[:1] in _OPERAND_START


def _numeric(text: str) -> Decimal | None:
    answer, marked = find_answer(text)
    if answer is None:
        return None
    answer = _clean(answer)
    whole = _parse_decimal(answer)
    if whole is not None:
        return whole
    numbers = list(_NUMBER.finditer(answer))
    if not numbers:
        return None
    m = numbers[0] if marked else numbers[-1]
    return None if _glued(answer, m.start(), m.end()) else _parse_decimal(m.group())


def numeric_answer(text: str) -> float | None:
    """The number a completion answers with, or None when it has none or the rule cannot read it for sure.

    The extracted answer read as a number if it is one; else, after a marker ("answer: 42 apples", "#### 1,234
    dollars") the first number that follows it, and without a marker ("so the total is 1,234.") the last number in
    the text (models state the result last). That number must stand alone: one glued to an operator or brace
    (`\\boxed{\\frac{1}{2}}`, `2^{10}`, `answer: 3/4`) or followed by a comma and digits that are no thousands
    group (`2,50`) gives None, never a guess such as its first digit. Use match="math" for such answers."""
    value = _numeric(text)
    return None if value is None else float(value)


def _format_number(value: Decimal) -> str:
    """One spelling per value, so equal numbers vote together: '12' for 12.0, '0.5' for .50, '-3' for -3."""
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


# ---------------------------------------------------------------------------- match="math" (math-verify)


_LATEX_COMMAND = re.compile(r"\\text\s*\{[^{}]*\}|\\[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{3,}")  # prose ("no idea", "we get 17"): math-verify extracts from it unwrapped


def _math_parse(text: str):
    """math-verify's parse of an answer (a LaTeX / plain expression; `$...$` added when it has none). Its timeouts
    use SIGALRM, which only the main thread may set, so other threads parse without one."""
    return _math_parse_cached(text, threading.current_thread() is threading.main_thread())


@functools.lru_cache(maxsize=65536)
def _math_parse_cached(text: str, main_thread: bool):
    from math_verify import parse  # lazy: sympy and the LaTeX grammar take ~0.5 s to import

    timeout = 5 if main_thread else None
    if "$" not in text and not _WORD.search(_LATEX_COMMAND.sub(" ", text)):
        parsed = parse(f"${text}$", parsing_timeout=timeout)
        if parsed:
            return tuple(parsed)
    return tuple(parse(text, parsing_timeout=timeout))


def _math_canonical(answer: str | None) -> str | None:
    """The LaTeX spelling math-verify read from the answer (so `\\frac12` and `\\dfrac{1}{2}` vote together), or
    None when it reads nothing."""
    if answer is None:
        return None
    parsed = _math_parse(normalize_answer(answer.replace("\\$", "").replace("\\%", "")))
    return parsed[-1] if parsed else None


# ---------------------------------------------------------------------------- canonical forms and matching


def canonical_answer(completion: str, match: str = "exact") -> str | None:
    """The completion's answer in the form answers are compared and voted in; None = unparsed."""
    if match == "exact":
        answer = extract_answer(completion)
        return None if answer is None else normalize_answer(answer)
    if match == "numeric":
        value = _numeric(completion)
        return None if value is None else _format_number(value)
    if match == "math":
        return _math_canonical(extract_answer(completion))
    raise ValueError(f"unknown answer match {match!r}; valid: {', '.join(MATCH_MODES)}")


def canonical_reference(answer: str, match: str = "exact") -> str:
    """The reference answer in canonical form (a numeric or math reference must be readable: the error names it)."""
    if match == "numeric":
        value = _parse_decimal(answer)
        if value is None:
            raise ValueError(f"reference answer {answer!r} is not a number, so match=numeric cannot compare with "
                             "it; use match=exact or match=math, or an answer_pattern that picks the number out of "
                             "the field")
        return _format_number(value)
    if match == "math":
        canonical = _math_canonical(answer)
        if canonical is None:
            raise ValueError(f"reference answer {answer!r} is not an expression math-verify can read, so match=math "
                             "cannot compare with it; use match=exact, or an answer_pattern that picks the "
                             "expression out of the field")
        return canonical
    return canonical_answer(answer, "exact") or ""


def answers_match(got: str | None, reference: str, match: str = "exact") -> bool:
    """Canonical answer vs canonical reference: equal strings (exact); equal numbers (numeric: exactly for an
    integer reference, within 1e-6 relative otherwise); math-verify's equivalence (math)."""
    if got is None:
        return False
    if match == "numeric":
        got_value, want = Decimal(got), Decimal(reference)
        if want == want.to_integral_value():
            return got_value == want  # 1000001 is not 1000000, whatever a relative tolerance says
        return math.isclose(float(got_value), float(want), rel_tol=1e-6, abs_tol=0.0)
    if match == "math":
        return _math_equal(got, reference)
    return got == reference


@functools.lru_cache(maxsize=65536)
def _math_equal(got: str, reference: str) -> bool:
    from math_verify import verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    return bool(verify(list(_math_parse(reference)), list(_math_parse(got)), timeout_seconds=timeout))
