"""Evaluation tasks: one registry, three kinds, added by a YAML entry or one Python function.

    kind=generate    questions (chat messages + reference answer) -> completions -> extracted answer -> match
    kind=choice      (context, choices, answer index) -> log-likelihood of each choice (optsys.eval.loglik)
    kind=perplexity  texts -> token log-likelihood -> perplexity, bits per byte

Built in (no download): the synthetic tasks of optsys.data.tasks (`arithmetic`, `arithmetic_reversed`, `sorting`),
their multiple-choice forms (`<task>_mc`: the right answer among wrong ones) and `corpus` (perplexity on held-out
text). A YAML entry (eval.task_files) reads any local or hub dataset, naming its fields:

    gsm8k:
      kind: generate
      dataset: data/gsm8k_test.jsonl    # a .jsonl/.json/.parquet file, a save_to_disk folder or a hub id
      prompt_field: question
      answer_field: answer
      answer_pattern: "####\\s*(.+)"    # optional: the reference is this regex's group 1 of the answer field
      match: numeric
      max_new_tokens: 256

A Python function is named by its dotted path (`--tasks mypkg.tasks:hard_sums`): it takes (split, n, seed) and
returns rows {"prompt": str | messages, "answer": str}, or it is an EvalTask itself.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from optsys.config import ConfigError, merge_into, read_yaml
from optsys.data.answers import MATCH_MODES
from optsys.errors import DataError, did_you_mean

KINDS = ("generate", "choice", "perplexity")


@dataclass(frozen=True)
class Question:
    """One generation question: the chat messages the model sees and the reference answer."""
    id: str
    messages: tuple  # ({role, content}, ...)
    answer: str

    @property
    def prompt(self) -> str:
        """The last user turn as written: what reward functions and records call the prompt."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


@dataclass(frozen=True)
class EvalTask:
    name: str
    kind: str  # generate | choice | perplexity
    # (split, n, difficulty, seed) -> [Question] (generate), [loglik.ChoiceItem] (choice), [str] (perplexity);
    # n = 0 means every item the source has
    load: Callable[[str, int, int, int], list]
    match: str = "exact"  # generate: exact | numeric | math (optsys.data.answers)
    max_new_tokens: int = 16
    description: str = ""


EVAL_TASKS: dict[str, EvalTask] = {}


def register_task(task: EvalTask) -> EvalTask:
    if task.kind not in KINDS:
        raise ValueError(f"task {task.name!r}: kind {task.kind!r} is not one of {', '.join(KINDS)}")
    if task.match not in MATCH_MODES:
        raise ValueError(f"task {task.name!r}: match {task.match!r} is not one of {', '.join(MATCH_MODES)}")
    EVAL_TASKS[task.name] = task
    return task


def _builtin_questions(name: str):
    def load(split: str, n: int, difficulty: int, seed: int) -> list[Question]:
        from optsys.data.tasks import get_task

        task = get_task(name)
        count = n or 200  # the synthetic tasks have no natural size: 0 = the default 200
        return [Question(f"{name}-{split}-{i}", tuple(task.messages(p.prompt)), p.answer)
                for i, p in enumerate(task.problems(split, count, difficulty=difficulty, seed=seed))]
    return load


def _builtin_choices(name: str):
    def load(split: str, n: int, difficulty: int, seed: int):
        from optsys.eval.loglik import task_choice_items

        return task_choice_items(name, split, n or 200, difficulty=difficulty, seed=seed)
    return load


def _corpus(split: str, n: int, difficulty: int, seed: int) -> list[str]:
    from optsys.eval.loglik import corpus_texts

    return corpus_texts(split, n or 64, seed=seed)


for _name in ("arithmetic", "arithmetic_reversed", "sorting"):
    register_task(EvalTask(_name, "generate", _builtin_questions(_name), max_new_tokens=16,
                           description=f"built-in {_name} (optsys.data.tasks), exact match"))
    register_task(EvalTask(f"{_name}_mc", "choice", _builtin_choices(_name),
                           description=f"{_name} as multiple choice: the answer among wrong ones, by log-likelihood"))
register_task(EvalTask("corpus", "perplexity", _corpus, description="perplexity on held-out built-in text"))


# ---------------------------------------------------------------------------- YAML entries


@dataclass
class TaskSpec:
    """One YAML task entry (keys checked strictly, like every config)."""
    kind: str = "generate"
    dataset: str = ""  # file, save_to_disk folder or hub id (optsys.data.sources.load_rows)
    split: str = "test"  # the dataset split to read
    prompt_field: str = "question"  # generate / choice: the question text (or chat messages)
    answer_field: str = "answer"  # generate: the reference; choice: the right choice (index, letter or its text)
    answer_pattern: str | None = None  # generate: a regex; the reference is its group 1 in the answer field
    prompt_template: str = "{prompt}"  # the user turn; {prompt} is the prompt field, {<field>} any other field
    system: str | None = None
    chat: bool = True  # choice: render the context with the chat template (False: plain text)
    choices_field: str = "choices"  # choice
    text_field: str = "text"  # perplexity
    match: str = "exact"
    max_new_tokens: int = 64


def _show(row: dict) -> str:
    text = repr(row)
    return text if len(text) <= 300 else text[:300] + "...}"


def _field(row: dict, key: str, field: str, where: str):
    if key not in row:
        raise DataError(f"{where}: the row has no field {key!r} (task spec key {field}); its fields are "
                        f"{sorted(row)}. Set {field} to the right field name. The row: {_show(row)}")
    return row[key]


def _rows_of(spec: TaskSpec, n: int) -> list[dict]:
    """The dataset's rows of the spec's split (the eval split is the spec's, not the built-in tasks' hash split);
    the first n (0 = all): a fixed set, the same for every model compared on it."""
    from optsys.data.sources import load_rows

    rows = load_rows(spec.dataset, split=spec.split)
    return rows[:n] if n else rows


def _spec_questions(spec: TaskSpec, name: str):
    pattern = re.compile(spec.answer_pattern) if spec.answer_pattern else None

    def load(split: str, n: int, difficulty: int, seed: int) -> list[Question]:
        out = []
        for i, row in enumerate(_rows_of(spec, n)):
            where = f"task {name!r}, dataset {spec.dataset}, row {i}"
            prompt = _field(row, spec.prompt_field, "prompt_field", where)
            answer = str(_field(row, spec.answer_field, "answer_field", where))
            if pattern is not None:
                m = pattern.search(answer)
                if m is None:
                    raise DataError(f"{where}: answer_pattern {spec.answer_pattern!r} does not match the "
                                    f"{spec.answer_field!r} field {answer[-200:]!r}. The row: {_show(row)}")
                answer = (m.group(1) if m.groups() else m.group(0)).strip()
            if isinstance(prompt, list):  # already a conversation
                messages = tuple(prompt)
            else:
                try:
                    content = spec.prompt_template.format(prompt=prompt, **row)
                except KeyError as e:
                    raise DataError(f"{where}: prompt_template {spec.prompt_template!r} names field {e} that the "
                                    f"row does not have. The row: {_show(row)}") from None
                head = ({"role": "system", "content": spec.system},) if spec.system else ()
                messages = head + ({"role": "user", "content": content},)
            out.append(Question(f"{name}-{i}", messages, answer))
        return out
    return load


def _spec_choices(spec: TaskSpec, name: str):
    def load(split: str, n: int, difficulty: int, seed: int):
        from optsys.eval.loglik import ChoiceItem

        items = []
        for i, row in enumerate(_rows_of(spec, n)):
            where = f"task {name!r}, dataset {spec.dataset}, row {i}"
            prompt = _field(row, spec.prompt_field, "prompt_field", where)
            choices = _field(row, spec.choices_field, "choices_field", where)
            label = _field(row, spec.answer_field, "answer_field", where)
            if not isinstance(choices, list) or len(choices) < 2:
                raise DataError(f"{where}: field {spec.choices_field!r} must be a list of at least 2 choices, got "
                                f"{choices!r}. The row: {_show(row)}")
            choices = [str(c) for c in choices]
            if isinstance(label, str) and label in choices:
                answer = choices.index(label)
            elif isinstance(label, str) and len(label) == 1 and label.isalpha():
                answer = ord(label.upper()) - ord("A")
            elif isinstance(label, int) and not isinstance(label, bool):
                answer = label
            else:
                answer = -1
            if not 0 <= answer < len(choices):
                raise DataError(f"{where}: answer {label!r} (field {spec.answer_field!r}) is not a choice index, "
                                f"letter or choice text of {len(choices)} choices. The row: {_show(row)}")
            content = spec.prompt_template.format(prompt=prompt, **row)
            if spec.chat:
                head = [{"role": "system", "content": spec.system}] if spec.system else []
                context = head + [{"role": "user", "content": content}]
            else:
                context = content
            items.append(ChoiceItem(context, tuple(choices), answer))
        return items
    return load


def _spec_texts(spec: TaskSpec, name: str):
    def load(split: str, n: int, difficulty: int, seed: int) -> list[str]:
        rows = _rows_of(spec, n)
        return [str(_field(r, spec.text_field, "text_field", f"task {name!r}, dataset {spec.dataset}, row {i}"))
                for i, r in enumerate(rows)]
    return load


def task_from_spec(name: str, data: dict, source: str = "") -> EvalTask:
    """An EvalTask from a YAML entry; unknown keys and bad values are ConfigErrors naming the task and key."""
    spec = TaskSpec()
    merge_into(spec, data, prefix=f"{source + ': ' if source else ''}task {name}.")
    where = f"{source + ': ' if source else ''}task {name!r}"
    if spec.kind not in KINDS:
        raise ConfigError(f"{where}: kind {spec.kind!r} is not one of {', '.join(KINDS)}")
    if spec.match not in MATCH_MODES:
        raise ConfigError(f"{where}: match {spec.match!r} is not one of {', '.join(MATCH_MODES)}")
    if not spec.dataset:
        raise ConfigError(f"{where}: set `dataset:` (a .jsonl/.json/.parquet file, a folder or a hub id)")
    if spec.max_new_tokens < 1:
        raise ConfigError(f"{where}: max_new_tokens must be >= 1, got {spec.max_new_tokens}")
    if spec.answer_pattern:
        try:
            re.compile(spec.answer_pattern)
        except re.error as e:
            raise ConfigError(f"{where}: answer_pattern {spec.answer_pattern!r} is not a valid regex ({e})") from None
    load = {"generate": _spec_questions, "choice": _spec_choices, "perplexity": _spec_texts}[spec.kind](spec, name)
    return EvalTask(name, spec.kind, load, match=spec.match, max_new_tokens=spec.max_new_tokens,
                    description=f"{spec.kind} task on {spec.dataset}")


def read_task_file(path: str) -> dict[str, EvalTask]:
    """The tasks of one YAML file: a mapping name -> entry."""
    data = read_yaml(Path(path))
    out = {}
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: task {name!r} must be a mapping of keys (kind, dataset, ...), got {entry!r}")
        out[name] = task_from_spec(str(name), entry, source=str(path))
    return out


# ---------------------------------------------------------------------------- lookup


def _rows_to_questions(name: str, rows) -> list[Question]:
    if not isinstance(rows, list):
        raise DataError(f"task function {name!r} returned {type(rows).__name__}; it must return a list of rows "
                        "{'prompt': str | messages, 'answer': str}")
    out = []
    for i, row in enumerate(rows):
        where = f"task function {name!r}, row {i}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a dict with 'prompt' and 'answer', got {_show(row)}")
        prompt = _field(row, "prompt", "prompt", where)
        answer = str(_field(row, "answer", "answer", where))
        messages = tuple(prompt) if isinstance(prompt, list) else ({"role": "user", "content": str(prompt)},)
        out.append(Question(f"{name}-{i}", messages, answer))
    return out


def _task_from_path(name: str) -> EvalTask:
    module_name, _, attr = name.partition(":") if ":" in name else name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"task {name!r}: cannot import module {module_name!r} ({e})") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise ConfigError(f"task {name!r}: module {module_name!r} has no {attr!r}")
    if isinstance(obj, EvalTask):
        return obj
    if not callable(obj):
        raise ConfigError(f"task {name!r} is a {type(obj).__name__}; give a function (split, n, seed) -> rows "
                          "or an EvalTask")

    def load(split: str, n: int, difficulty: int, seed: int) -> list[Question]:
        return _rows_to_questions(name, obj(split=split, n=n, seed=seed))

    return EvalTask(name, "generate", load, match=getattr(obj, "match", "exact"),
                    max_new_tokens=getattr(obj, "max_new_tokens", 64), description=f"function {name}")


def resolve_tasks(names: list[str], task_files: list[str] = ()) -> list[EvalTask]:
    """The EvalTasks for names: registry entries, entries of the task files, or dotted paths to functions."""
    extra: dict[str, EvalTask] = {}
    for path in task_files:
        extra.update(read_task_file(path))
    known = {**EVAL_TASKS, **extra}
    out = []
    for name in names:
        if name in known:
            out.append(known[name])
        elif ":" in name or ("." in name and not name.startswith(".")):
            out.append(_task_from_path(name))
        else:
            hint = did_you_mean(name, known)
            if name == "guess":
                hint = ("; guess is a multi-turn task scored by playing it: the RL trainer reports "
                        "eval/success_rate (recipe guess_tiny)")
            raise ConfigError(f"unknown eval task {name!r}{hint}. Registered: {', '.join(sorted(known))}; or add "
                              "one with eval task_files (YAML) or a dotted path to a function")
    return out

