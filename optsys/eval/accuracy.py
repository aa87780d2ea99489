"""Greedy exact-match accuracy of a model on a built-in task's held-out problems."""

from __future__ import annotations

from optsys.data.tasks import Problem, Task
from optsys.eval.generate import generate_greedy


def task_accuracy(model, tokenizer, task: Task, problems: list[Problem], *, max_new_tokens: int = 16,
                  batch_size: int = 100) -> tuple[float, list[dict]]:
    """Fraction of problems whose greedy completion passes task.check, plus per-sample records."""
    completions = generate_greedy(
        model, tokenizer, [task.messages(p.prompt) for p in problems],
        max_new_tokens=max_new_tokens, batch_size=batch_size,
    )
    records = [
        {"prompt": p.prompt, "answer": p.answer, "completion": c, "correct": task.check(c, p.answer)}
        for p, c in zip(problems, completions)
    ]
    accuracy = sum(r["correct"] for r in records) / max(1, len(records))
    return accuracy, records
