"""Greedy accuracy of a model on a built-in task's held-out problems: the trainers' before/after/periodic eval.

It is `python -m optsys.eval`'s greedy method (optsys.eval.scaling.greedy: same rendering, same answer rule) on
the HF engine around the trainer's own model, so a training run's eval/accuracy_after and an eval of its final/
agree."""

from __future__ import annotations

from optsys.data.tasks import Problem, Task
from optsys.parallel.dist import World, all_gather_objects, local_steps, rank_share
from optsys.telemetry.progress import progress_items


def task_accuracy(model, tokenizer, task: Task, problems: list[Problem], *, max_new_tokens: int = 16,
                  batch_size: int = 100, world: World | None = None, show: bool = False
                  ) -> tuple[float, list[dict]]:
    """Fraction of problems whose greedy completion is right, plus per-sample records.

    Under torchrun each rank generates its round-robin share, and every rank gets all the records in
    order. The ranks make the same number of `generate` calls (a rank one problem short repeats one and
    drops it), with synced_gpus, so FSDP's collectives stay in step while their sequences end at different
    lengths. `show`: a progress bar over the batches of `batch_size` problems (every rank runs as many)."""
    from optsys.eval.generate import stop_token_ids
    from optsys.eval.scaling import MethodSettings, greedy
    from optsys.eval.tasks import Question
    from optsys.rollout.hf_engine import HFEngine

    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template, so chat prompts cannot be rendered; set "
                         "tokenizer.chat_template (or use a model whose tokenizer_config.json carries one)")
    distributed = world is not None and world.distributed
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    engine = HFEngine(model, pad_token_id=pad, synced_gpus=distributed, greedy_batch=batch_size)
    settings = MethodSettings(max_new_tokens=max_new_tokens, stop_token_ids=tuple(stop_token_ids(model, tokenizer)),
                              max_model_len=10**9)
    questions = [Question(f"{task.name}-{i}", tuple(task.messages(p.prompt)), p.answer) for i, p in enumerate(problems)]

    def run(qs):
        chunks = [qs[i:i + batch_size] for i in range(0, len(qs), batch_size)]
        out = []
        for chunk in progress_items(chunks, f"eval/accuracy ({len(qs)} problems)", enabled=show):
            samples, _, _ = greedy(engine, tokenizer, task.name, chunk, settings, "exact")
            out += [(x[0].text, x[0].correct) for x in samples]
        return out

    if not distributed:
        scored = run(questions)
    else:
        mine = rank_share(list(range(len(problems))), world)
        longest = local_steps(len(problems), world)
        padded = mine + mine[:1] * (longest - len(mine)) if mine else [0] * longest
        local = run([questions[i] for i in padded])
        scored = [("", False)] * len(problems)
        for share in all_gather_objects(list(zip(mine, local)), world):  # zip drops the repeated fillers
            for i, item in share:
                scored[i] = item
    records = [{"prompt": p.prompt, "answer": p.answer, "completion": text, "correct": ok}
               for p, (text, ok) in zip(problems, scored)]
    accuracy = sum(r["correct"] for r in records) / max(1, len(records))
    return accuracy, records
