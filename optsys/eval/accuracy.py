"""Greedy accuracy of a model on held-out questions: the trainers' before/after/periodic eval.

It is `python -m optsys.eval`'s greedy method (optsys.eval.scaling.greedy: same rendering, same answer rule) on
the HF engine around the trainer's own model, so a training run's eval/accuracy_after and an eval of its final/
agree. The questions are a built-in task's held-out problems (`task_accuracy`, matched by the task's rule) or a
user's `data.eval_dataset` rows with an `answer` field (`dataset_questions`).
"""

from __future__ import annotations

from optsys.data.tasks import Problem, Task
from optsys.errors import DataError
from optsys.eval.tasks import Question, default_match
from optsys.parallel.dist import World, all_gather_objects, local_steps, rank_share
from optsys.telemetry.progress import progress_items


def task_accuracy(model, tokenizer, task: Task, problems: list[Problem], *, max_new_tokens: int = 16,
                  batch_size: int = 100, world: World | None = None, show: bool = False) -> tuple[float, list[dict]]:
    """Fraction of a built-in task's problems whose greedy completion is right by the task's match rule."""
    questions = [Question(f"{task.name}-{i}", tuple(task.messages(p.prompt)), p.answer) for i, p in enumerate(problems)]
    return questions_accuracy(model, tokenizer, questions, match=task.match, name=task.name,
                              max_new_tokens=max_new_tokens, batch_size=batch_size, world=world, show=show)


def questions_accuracy(model, tokenizer, questions: list[Question], *, match: str, name: str = "eval",
                       max_new_tokens: int = 16, batch_size: int = 100, world: World | None = None,
                       show: bool = False) -> tuple[float, list[dict]]:
    """Fraction of questions whose greedy completion is right (`match`: optsys.data.answers), plus per-sample
    records.

    Under torchrun each rank generates its round-robin share, and every rank gets all the records in
    order. The ranks make the same number of `generate` calls (a rank one question short repeats one and
    drops it), with synced_gpus, so FSDP's collectives stay in step while their sequences end at different
    lengths. `show`: a progress bar over the batches of `batch_size` problems (every rank runs as many)."""
    from optsys.eval.generate import stop_token_ids
    from optsys.eval.scaling import MethodSettings, greedy
    from optsys.rollout.hf_engine import HFEngine

    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template, so chat prompts cannot be rendered; set "
                         "tokenizer.chat_template (or use a model whose tokenizer_config.json carries one)")
    distributed = world is not None and world.distributed
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    engine = HFEngine(model, pad_token_id=pad, synced_gpus=distributed, greedy_batch=batch_size)
    settings = MethodSettings(max_new_tokens=max_new_tokens, stop_token_ids=tuple(stop_token_ids(model, tokenizer)),
                              max_model_len=10**9)

    def run(qs):
        chunks = [qs[i:i + batch_size] for i in range(0, len(qs), batch_size)]
        out = []
        for chunk in progress_items(chunks, f"eval/accuracy ({len(qs)} questions)", enabled=show):
            samples, _, _ = greedy(engine, tokenizer, name, chunk, settings, match)
            out += [(x[0].text, x[0].correct) for x in samples]
        return out

    if not distributed:
        scored = run(questions)
    else:
        mine = rank_share(list(range(len(questions))), world)
        longest = local_steps(len(questions), world)
        padded = mine + mine[:1] * (longest - len(mine)) if mine else [0] * longest
        local = run([questions[i] for i in padded])
        scored = [("", False)] * len(questions)
        for share in all_gather_objects(list(zip(mine, local)), world):  # zip drops the repeated fillers
            for i, item in share:
                scored[i] = item
    records = [{"prompt": q.prompt, "answer": q.answer, "completion": text, "correct": ok}
               for q, (text, ok) in zip(questions, scored)]
    accuracy = sum(r["correct"] for r in records) / max(1, len(records))
    return accuracy, records


def _prompt_messages(row: dict) -> tuple | None:
    """The conversation a row asks the model to answer: its `prompt` (a string, or messages ending with a user
    turn: RL, preference and prompt/completion rows) or, for `messages` rows (and pairs whose `chosen` is a whole
    conversation), the turns before the last assistant turn; None when the row has none of these."""
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        return ({"role": "user", "content": prompt},)
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "user":
        return tuple(prompt)
    for key in ("messages", "chosen"):  # an SFT conversation; a preference pair written as whole conversations
        messages = row.get(key)
        if not isinstance(messages, list):
            continue
        last = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"),
                   default=len(messages))
        head = messages[:last]
        if head and isinstance(head[-1], dict) and head[-1].get("role") == "user":
            return tuple(head)
    return None


def dataset_questions(rows: list[dict], source: str) -> tuple[list[Question], int, str]:
    """(questions, rows without an answer, match) from a user's eval rows: each row with an `answer` (a string or
    a number) and a prompt (see _prompt_messages) is a question; rows without an `answer` are counted, not
    questions. `match` is "numeric" when every answer is a number, else "exact" (optsys.eval.tasks.default_match).
    A row with an answer but no prompt, or an answer that is not a string or number, is a DataError."""
    questions, missing = [], 0
    for i, row in enumerate(rows):
        answer = row.get("answer")
        if answer is None:
            missing += 1
            continue
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(f"{source}: row {i}: field 'answer' must be a string or a number (the reference held-out "
                            f"accuracy compares with), got {type(answer).__name__} {str(answer)[:80]!r}")
        messages = _prompt_messages(row)
        if messages is None:
            raise DataError(f"{source}: row {i} has an 'answer' but no prompt to ask: give it 'prompt' (a string or "
                            "messages ending with a user turn) or 'messages' with a user turn before the answer; "
                            f"its fields are {sorted(row)}")
        questions.append(Question(f"eval-{i}", messages, str(answer)))
    return questions, missing, default_match([q.answer for q in questions])
