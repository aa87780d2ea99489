"""Evaluation tasks: one registry, three kinds, added by a YAML entry or one Python function.

    kind=generate    questions (chat messages + reference answer) -> completions -> extracted answer -> match
    kind=choice      (context, choices, answer index) -> log-likelihood of each choice (optsys.eval.loglik)
    kind=perplexity  texts -> token log-likelihood -> perplexity, bits per byte

Built in (no download): the synthetic tasks of optsys.data.tasks (`arithmetic`, `arithmetic_reversed`, `sorting`,
`word_problems`), each matched by its task's rule (numeric where the answer is a number), their multiple-choice
forms (`<task>_mc`: the right answer among wrong ones) and `corpus` (perplexity on held-out text).
A YAML entry (eval.task_files) reads any local or hub dataset, naming its fields:

    gsm8k:
      kind: generate
      dataset: data/gsm8k_test.jsonl    # a .jsonl/.json/.parquet file, a save_to_disk folder or a hub id
      prompt_field: question
      answer_field: answer
      answer_pattern: "####\\s*(.+)"    # optional: the reference is this regex's group 1 of the answer field
      match: numeric                    # optional: numeric when every reference is a number, else exact
      max_new_tokens: 256

A Python function is named by its dotted path (`--tasks mypkg.tasks:hard_sums`): it takes (split, n, seed) and
returns rows {"prompt": str | messages, "answer": str}, or it is an EvalTask itself.

A task without a `match` (YAML entries and functions) matches numerically when every reference answer is a
number and exactly otherwise (`default_match`); the run says which in its log and results.json.
"""

from __future__ import annotations

import importlib
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from optsys.config import ConfigError, merge_into, read_yaml
from optsys.data.answers import MATCH_MODES, parse_number
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
    # generate: exact | numeric | math (optsys.data.answers); None: numeric when every reference is a number,
    # else exact
    match: str | None = None
    max_new_tokens: int = 16
    description: str = ""


EVAL_TASKS: dict[str, EvalTask] = {}


def register_task(task: EvalTask) -> EvalTask:
    if task.kind not in KINDS:
        raise ValueError(f"task {task.name!r}: kind {task.kind!r} is not one of {', '.join(KINDS)}")
    if task.match is not None and task.match not in MATCH_MODES:
        raise ValueError(f"task {task.name!r}: match {task.match!r} is not one of {', '.join(MATCH_MODES)}")
    EVAL_TASKS[task.name] = task
    return task


def default_match(answers: list[str]) -> str:
    """The match rule for references that do not name one: "numeric" when every reference reads as a number
    (so "The answer is 78." and "59 + 19 = 78" score against "78"), else "exact"."""
    return "numeric" if answers and all(parse_number(a) is not None for a in answers) else "exact"


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


def _register_builtins() -> None:
    from optsys.data.tasks import TASKS

    for name in ("arithmetic", "arithmetic_reversed", "sorting", "word_problems"):
        task = TASKS[name]
        # word problems are answered with worked steps before "The answer is N."
        tokens = 256 if name == "word_problems" else 16
        register_task(EvalTask(name, "generate", _builtin_questions(name), match=task.match, max_new_tokens=tokens,
                               description=f"built-in: {task.about}"))
        if name != "word_problems":  # its wrong answers are whole solutions, not choices to compare
            register_task(EvalTask(f"{name}_mc", "choice", _builtin_choices(name), description=f"{name} as "
                                   "multiple choice: the answer among wrong ones, by log-likelihood"))


_register_builtins()
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
    # the user turn: {prompt} is the prompt field (even when the row has its own 'prompt' column), {<field>} any
    # other field of the row; filled for every row when the rows are read, before any model loads
    prompt_template: str = "{prompt}"
    system: str | None = None
    chat: bool = True  # choice: render the context with the chat template (False: plain text)
    choices_field: str = "choices"  # choice: a list of texts, or ARC's {"text": [...], "label": [...]}
    text_field: str = "text"  # perplexity
    match: str | None = None  # generate: exact | numeric | math; unset: numeric when every reference is a number
    max_new_tokens: int = 64


def _show(row: dict) -> str:
    text = repr(row)
    return text if len(text) <= 300 else text[:300] + "...}"


def _field(row: dict, key: str, field: str, where: str):
    if key not in row:
        raise DataError(f"{where}: the row has no field {key!r} (task spec key {field}); its fields are "
                        f"{sorted(row)}. Set {field} to the right field name. The row: {_show(row)}")
    return row[key]


def _template_fields(template: str, where: str) -> list[str]:
    """The field names a prompt_template uses; a ConfigError for a template str.format cannot fill from named
    fields (unbalanced braces, positional `{}` / `{0}`)."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ConfigError(f"{where}: prompt_template {template!r} is not a valid format string ({e}); write fields "
                          "as {prompt} or {field_name}, and a literal brace as {{ or }}") from None
    for name in names:
        if not name or name.split(".")[0].split("[")[0].isdigit():
            raise ConfigError(f"{where}: prompt_template {template!r} has a positional field {{{name}}}; name the "
                              "field instead: {prompt} or {field_name}")
    return names


def _fill(template: str, prompt, row: dict, where: str) -> str:
    """The template filled from the row, {prompt} being the spec's prompt field; a DataError naming the field."""
    try:
        return template.format(**{**row, "prompt": prompt})
    except KeyError as e:
        raise DataError(f"{where}: prompt_template {template!r} names field {e} that the row does not have; its "
                        f"fields are {sorted(row)}. The row: {_show(row)}") from None
    except (IndexError, AttributeError, ValueError, TypeError) as e:
        raise DataError(f"{where}: prompt_template {template!r} cannot be filled from the row "
                        f"({type(e).__name__}: {e}). The row: {_show(row)}") from None


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
                content = _fill(spec.prompt_template, prompt, row, where)
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
            choices, labels = _choice_list(choices, spec.choices_field, where, row)
            answer = _choice_index(label, choices, labels)
            if not 0 <= answer < len(choices):
                raise DataError(f"{where}: answer {label!r} (field {spec.answer_field!r}) is not a choice index, "
                                f"letter, label{f' of {labels}' if labels else ''} or choice text of {len(choices)} "
                                f"choices. The row: {_show(row)}")
            content = _fill(spec.prompt_template, prompt, row, where)
            if spec.chat:
                head = [{"role": "system", "content": spec.system}] if spec.system else []
                context = head + [{"role": "user", "content": content}]
            else:
                context = content
            items.append(ChoiceItem(context, tuple(choices), answer))
        return items
    return load


def _choice_list(choices, key: str, where: str, row: dict) -> tuple[list[str], list[str] | None]:
    """(choice texts, their labels or None): a list of choices, or ARC's {"text": [...], "label": [...]}."""
    labels = None
    if isinstance(choices, dict) and isinstance(choices.get("text"), list):
        labels = choices.get("label")
        if labels is not None and (not isinstance(labels, list) or len(labels) != len(choices["text"])):
            raise DataError(f"{where}: field {key!r} has {len(choices['text'])} texts but labels {labels!r}; "
                            f"give one label per text. The row: {_show(row)}")
        choices = choices["text"]
    if not isinstance(choices, list) or len(choices) < 2:
        raise DataError(f"{where}: field {key!r} must be a list of at least 2 choices (or {{'text': [...], 'label': "
                        f"[...]}}), got {choices!r}. The row: {_show(row)}")
    return [str(c) for c in choices], None if labels is None else [str(x) for x in labels]


def _choice_index(label, choices: list[str], labels: list[str] | None) -> int:
    """The right choice's index from a label: one of `labels` ("A", "1"), a choice's text, a letter (A = 0), a
    digit string or an integer (0-based, as HellaSwag writes "2"); -1 when it is none of these."""
    if isinstance(label, bool):
        return -1
    if labels is not None and str(label) in labels:
        return labels.index(str(label))
    if isinstance(label, str):
        text = label.strip()
        if text in choices:
            return choices.index(text)
        if len(text) == 1 and text.isalpha():
            return ord(text.upper()) - ord("A")
        if text.isascii() and text.isdigit():
            return int(text)
        return -1
    return label if isinstance(label, int) else -1


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
    if spec.match is not None and spec.match not in MATCH_MODES:
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
    _template_fields(spec.prompt_template, where)
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

    return EvalTask(name, "generate", load, match=getattr(obj, "match", None),
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

