"""Greedy exact-match accuracy of a model on a built-in task's held-out problems."""

from __future__ import annotations

from optsys.data.tasks import Problem, Task
from optsys.eval.generate import generate_greedy
from optsys.parallel.dist import World, all_gather_objects, local_steps, rank_share


def task_accuracy(model, tokenizer, task: Task, problems: list[Problem], *, max_new_tokens: int = 16,
                  batch_size: int = 100, world: World | None = None) -> tuple[float, list[dict]]:
    """Fraction of problems whose greedy completion passes task.check, plus per-sample records.

    Under torchrun each rank generates its round-robin share, and every rank gets all the records in
    order. The ranks make the same number of `generate` calls (a rank one problem short repeats one and
    drops it), with synced_gpus, so FSDP's collectives stay in step while their sequences end at different
    lengths."""
    conversations = [task.messages(p.prompt) for p in problems]
    if world is None or not world.distributed:
        completions = generate_greedy(model, tokenizer, conversations, max_new_tokens=max_new_tokens,
                                      batch_size=batch_size)
    else:
        mine = rank_share(list(range(len(problems))), world)
        longest = local_steps(len(problems), world)
        padded = mine + mine[:1] * (longest - len(mine)) if mine else [0] * longest
        local = generate_greedy(model, tokenizer, [conversations[i] for i in padded],
                                max_new_tokens=max_new_tokens, batch_size=batch_size, synced_gpus=True)
        completions = [""] * len(problems)
        for share in all_gather_objects(list(zip(mine, local)), world):  # zip drops the repeated fillers
            for i, completion in share:
                completions[i] = completion
    records = [
        {"prompt": p.prompt, "answer": p.answer, "completion": c, "correct": task.check(c, p.answer)}
        for p, c in zip(problems, completions)
    ]
    accuracy = sum(r["correct"] for r in records) / max(1, len(records))
    return accuracy, records
