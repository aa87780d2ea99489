"""A task given as one Python function (used by test_eval_cli.py through its dotted path)."""


def doubles(split: str, n: int, seed: int) -> list[dict]:
    return [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(3)]


_calls = [0]


def flaky_scorer(completion: str, *, prompt: str, answer: str | None) -> float:
    """A scorer that raises on every third call (the eval must score those NaN, count them, never pick them)."""
    _calls[0] += 1
    if _calls[0] % 3 == 0:
        raise RuntimeError("flaky")
    return float(len(completion))
