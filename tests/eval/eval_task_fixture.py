"""A task given as one Python function (used by test_eval_cli.py through its dotted path)."""


def doubles(split: str, n: int, seed: int) -> list[dict]:
    return [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(3)]
