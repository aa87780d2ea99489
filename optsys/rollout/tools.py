"""Tool calls in the Qwen2 / Hermes format: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in the
model's text. ToolUse wraps an environment (optsys.rollout.environments), runs the calls (TOOLS) and replies with a
"tool" message. The tiny ChatML template renders any role by name, so a tool result becomes
`<|im_start|>tool\\n...<|im_end|>`; with a template that rejects or drops the "tool" role, TurnRenderer makes it a
user turn wrapped in <tool_response> tags.

Built in: "calculator", an exact integer calculator (+ - * / and parentheses) parsed by recursive descent, not eval().
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Sequence


class ToolError(ValueError):
    """A tool refused its input; the message goes back to the model as the tool's error."""


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[[dict], str]  # arguments -> result text
    description: str


_CALC_TOKEN = re.compile(r"\s*(?:(\d+)|(.))")
_CALC_MAX_CHARS, _CALC_MAX_DEPTH, _CALC_MAX_DIGITS = 200, 32, 60


def calculate(expression: str) -> Fraction:
    """Exact value of an integer expression with + - * / (exact division), unary minus and parentheses.

    A recursive-descent parser, not eval(): anything else (names, **, %, floats, calls) is refused with a
    ToolError, as are division by zero, more than 200 characters, nesting deeper than 32, and values over
    60 digits."""
    if not isinstance(expression, str):
        raise ToolError(f"expression must be a string, got {type(expression).__name__}")
    if len(expression) > _CALC_MAX_CHARS:
        raise ToolError(f"expression longer than {_CALC_MAX_CHARS} characters")
    tokens: list[str] = []
    for m in _CALC_TOKEN.finditer(expression):
        if m.group(1) is not None:
            tokens.append(m.group(1))
        elif m.group(2) is not None:
            if m.group(2) not in "+-*/()":
                raise ToolError(f"unsupported character {m.group(2)!r}; only integers, + - * / and parentheses")
            tokens.append(m.group(2))
    if not tokens:
        raise ToolError("empty expression")
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def check(x: Fraction) -> Fraction:
        if max(abs(x.numerator), x.denominator) >= 10**_CALC_MAX_DIGITS:
            raise ToolError(f"value too large (over {_CALC_MAX_DIGITS} digits)")
        return x

    def expr(depth: int) -> Fraction:
        value = term(depth)
        while peek() in ("+", "-"):
            value = check(value + term(depth) if take() == "+" else value - term(depth))
        return value

    def term(depth: int) -> Fraction:
        value = factor(depth)
        while peek() in ("*", "/"):
            op, rhs = take(), factor(depth)
            if op == "/" and rhs == 0:
                raise ToolError("division by zero")
            value = check(value * rhs if op == "*" else value / rhs)
        return value

    def factor(depth: int) -> Fraction:
        if depth > _CALC_MAX_DEPTH:
            raise ToolError(f"nesting deeper than {_CALC_MAX_DEPTH}")
        tok = peek()
        if tok is None:
            raise ToolError("unexpected end of expression")
        take()
        if tok == "-":
            return -factor(depth + 1)
        if tok == "+":
            return factor(depth + 1)
        if tok == "(":
            value = expr(depth + 1)
            if peek() != ")":
                raise ToolError("missing ')'")
            take()
            return value
        if tok.isdigit():
            if len(tok) > _CALC_MAX_DIGITS:
                raise ToolError(f"number longer than {_CALC_MAX_DIGITS} digits")
            return Fraction(int(tok))
        raise ToolError(f"unexpected {tok!r}")

    value = expr(0)
    if pos != len(tokens):
        raise ToolError(f"unexpected {tokens[pos]!r}")
    return value


def format_number(x: Fraction) -> str:
    """An integer as itself; otherwise a decimal with 12 significant digits."""
    return str(x.numerator) if x.denominator == 1 else format(float(x), ".12g")


def _calculator(arguments: dict) -> str:
    if set(arguments) != {"expression"}:
        raise ToolError(f"calculator takes one argument, 'expression'; got {sorted(arguments)}")
    return format_number(calculate(arguments["expression"]))


TOOLS: dict[str, Tool] = {
    "calculator": Tool("calculator", _calculator,
                       'evaluate + - * / and parentheses on integers: {"expression": "12*(3+4)"}'),
}

_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str | None
    arguments: dict
    error: str | None = None  # set for a malformed call


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in text; a malformed one (bad JSON, a missing
    name, arguments that are not an object, an unclosed tag) comes back with `error` set instead of raising."""
    calls = []
    for m in _TOOL_CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError as e:
            calls.append(ToolCall(None, {}, f"malformed tool call: invalid JSON ({e.msg})"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append(ToolCall(None, {}, 'malformed tool call: expected {"name": ..., "arguments": {...}}'))
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if not isinstance(args, dict):
            calls.append(ToolCall(obj["name"], {}, "malformed tool call: 'arguments' must be an object"))
            continue
        calls.append(ToolCall(obj["name"], args))
    rest = _TOOL_CALL.sub("", text)
    if "<tool_call>" in rest:
        calls.append(ToolCall(None, {}, "malformed tool call: <tool_call> without </tool_call>"))
    return calls


def run_tool_call(call: ToolCall, tools: dict[str, Tool]) -> tuple[str, bool]:
    """(result JSON text, ok). Errors, a tool's refusal included, are results the model sees, never raised."""
    if call.error is not None:
        return json.dumps({"error": call.error}), False
    if call.name not in tools:
        return json.dumps({"name": call.name, "error": f"unknown tool {call.name!r}; tools: {sorted(tools)}"}), False
    try:
        return json.dumps({"name": call.name, "result": tools[call.name].fn(call.arguments)}), True
    except ToolError as e:
        return json.dumps({"name": call.name, "error": str(e)}), False


class ToolUse:
    """Wrap an environment with tools: a model turn with tool calls gets the results as one "tool" message
    (reward 0, not done; it still counts as a turn); a turn without one goes to the wrapped environment."""

    def __init__(self, env, tools: Sequence[str] = ("calculator",)):
        unknown = [t for t in tools if t not in TOOLS]
        if unknown:
            raise ValueError(f"unknown tools {unknown}; registered: {sorted(TOOLS)}")
        self.env = env
        self.tools = {t: TOOLS[t] for t in tools}
        self.calls = 0
        self.errors = 0

    @property
    def system(self) -> str | None:
        return getattr(self.env, "system", None)

    def reset(self, row: dict) -> str:
        return self.env.reset(row)

    def step(self, completion_text: str):
        calls = parse_tool_calls(completion_text)
        if not calls:
            return self.env.step(completion_text)
        results = []
        for call in calls:
            text, ok = run_tool_call(call, self.tools)
            self.calls += 1
            self.errors += not ok
            results.append(text)
        return {"role": "tool", "content": "\n".join(results)}, 0.0, False

