"""Eval tasks from user datasets (optsys/eval/tasks.py): templates, choice labels, the default match rule, and the
held-out questions of a training run's data.eval_dataset (optsys/eval/accuracy.py). No model loads here."""

import json

import pytest

from optsys.config import ConfigError
from optsys.errors import DataError
from optsys.eval.accuracy import dataset_questions
from optsys.eval.tasks import default_match, task_from_spec


def write(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_dataset_with_a_prompt_column_fills_the_template(tmp_path):
    """{prompt} is the spec's prompt field even when the row has its own 'prompt' column (str.format used to get
    'prompt' twice: a raw TypeError); other fields fill their own names."""
    data = write(tmp_path, [{"prompt": "ignored", "question": "2+2?", "context": "sums", "answer": "4"}])
    task = task_from_spec("qa", {"dataset": data, "split": "train", "prompt_template": "{context}: {prompt}"})
    (q,) = task.load("test", 0, 1, 0)
    assert q.messages[-1]["content"] == "sums: 2+2?"
    own = task_from_spec("own", {"dataset": data, "split": "train", "prompt_field": "prompt"})
    assert own.load("test", 0, 1, 0)[0].prompt == "ignored"


@pytest.mark.parametrize("template, words", [("{question", ["not a valid format string", "{{"]),
                                             ("Q: {}", ["positional field {}", "{prompt}"]),
                                             ("Q: {0}", ["positional field {0}"])])
def test_a_template_that_cannot_be_filled_by_name_is_a_config_error(tmp_path, template, words):
    data = write(tmp_path, [{"question": "1+1=", "answer": "2"}])
    with pytest.raises(ConfigError) as e:
        task_from_spec("qa", {"dataset": data, "split": "train", "prompt_template": template}, source="t.yaml")
    assert all(w in str(e.value) for w in ["t.yaml", "task 'qa'", "prompt_template", *words])


def test_a_template_naming_a_missing_field_fails_before_the_model_loads(tmp_path, monkeypatch):
    """A bad template is found when the rows are read, which evaluate() does before it opens the model."""
    from optsys.eval import run
    from optsys.eval.config import EvalRunConfig

    data = write(tmp_path, [{"question": "1+1=", "answer": "2"}])
    tasks = tmp_path / "t.yaml"
    tasks.write_text(f"qa:\n  dataset: {data}\n  split: train\n  prompt_template: '{{question}} ({{hint}})'\n")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was opened before the task's rows were checked")

    monkeypatch.setattr(run, "open_model", no_model)
    cfg = EvalRunConfig(model="unused", tasks=["qa"], task_files=[str(tasks)])
    with pytest.raises(DataError) as e:
        run.evaluate(cfg)
    assert all(w in str(e.value) for w in ["task 'qa'", "row 0", "prompt_template", "'hint'", "['answer', 'question']"])


def test_choice_labels_digit_strings_and_arc_style_choices(tmp_path):
    rows = [
        {"q": "a", "choices": ["x", "y", "z"], "label": "2"},  # HellaSwag: a 0-based index as a string
        {"q": "b", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]}, "label": "B"},  # ARC letters
        {"q": "c", "choices": {"text": ["x", "y", "z", "w"], "label": ["1", "2", "3", "4"]}, "label": "4"},  # ARC 1-4
        {"q": "d", "choices": ["x", "y"], "label": 1},
        {"q": "e", "choices": ["x", "y"], "label": "y"},  # the choice's text
    ]
    task = task_from_spec("mc", {"kind": "choice", "dataset": write(tmp_path, rows), "split": "train",
                                 "prompt_field": "q", "answer_field": "label"})
    items = task.load("test", 0, 1, 0)
    assert [it.answer for it in items] == [2, 1, 3, 1, 1]
    assert items[2].choices == ("x", "y", "z", "w")
    seven = write(tmp_path, [{"q": "a", "choices": ["x", "y"], "label": "7"}], "b.jsonl")
    bad = task_from_spec("mc", {"kind": "choice", "split": "train", "prompt_field": "q", "answer_field": "label",
                                "dataset": seven})
    with pytest.raises(DataError, match="answer '7'.*not a choice index"):
        bad.load("test", 0, 1, 0)
    odd = task_from_spec("mc", {"kind": "choice", "split": "train", "prompt_field": "q", "answer_field": "label",
                                "dataset": write(tmp_path, [{"q": "a", "choices": {"text": ["x", "y"], "label": ["A"]},
                                                             "label": "A"}], "c.jsonl")})
    with pytest.raises(DataError, match="2 texts but labels"):
        odd.load("test", 0, 1, 0)


def test_match_defaults_to_numeric_when_every_reference_is_a_number(tmp_path, capsys):
    from optsys.eval.run import task_match

    assert default_match(["12", "1,234", "-3.5"]) == "numeric"
    assert default_match(["12", "twelve"]) == "exact" and default_match([]) == "exact"
    numbers = task_from_spec("n", {"dataset": write(tmp_path, [{"question": "q", "answer": 7}]), "split": "train"})
    assert numbers.match is None  # not named: decided from the references
    assert task_match(numbers, numbers.load("test", 0, 1, 0)) == ("numeric", "default: every reference is a number")
    assert "task n: match=numeric (every reference is a number" in capsys.readouterr().out
    words = task_from_spec("w", {"dataset": write(tmp_path, [{"question": "q", "answer": "Paris"}], "w.jsonl"),
                                 "split": "train"})
    assert task_match(words, words.load("test", 0, 1, 0))[0] == "exact"
    named = task_from_spec("e", {"dataset": write(tmp_path, [{"question": "q", "answer": 7}], "e.jsonl"),
                                 "split": "train", "match": "exact"})
    assert task_match(named, named.load("test", 0, 1, 0)) == ("exact", "task")


def test_eval_rows_of_every_training_format_give_questions():
    """data.eval_dataset rows for held-out accuracy: an RL / prompt-completion row's prompt, a preference pair's
    prompt messages, an SFT conversation's turns before its answer; rows without 'answer' are counted."""
    rows = [
        {"prompt": "1+1=", "answer": "2"},
        {"prompt": "2+2=", "completion": "4", "answer": 4},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "3+3="}], "chosen": "6",
         "rejected": "7", "answer": "6"},
        {"messages": [{"role": "user", "content": "4+4="}, {"role": "assistant", "content": "8"}], "answer": "8"},
        {"prompt": "5+5=", "chosen": "10", "rejected": "11"},
        {"chosen": [{"role": "user", "content": "6+6="}, {"role": "assistant", "content": "12"}],
         "rejected": [{"role": "user", "content": "6+6="}, {"role": "assistant", "content": "13"}], "answer": 12},
    ]
    questions, missing, match = dataset_questions(rows, "eval.jsonl")
    assert [q.prompt for q in questions] == ["1+1=", "2+2=", "3+3=", "4+4=", "6+6="]
    assert [q.answer for q in questions] == ["2", "4", "6", "8", "12"]
    assert questions[2].messages[0]["role"] == "system" and len(questions[3].messages) == 1
    assert missing == 1 and match == "numeric"
    assert dataset_questions([{"prompt": "capital of France?", "answer": "Paris"}], "x")[2] == "exact"
    with pytest.raises(DataError, match="eval.jsonl: row 0: field 'answer' must be a string or a number"):
        dataset_questions([{"prompt": "q", "answer": ["a"]}], "eval.jsonl")
    with pytest.raises(DataError, match="eval.jsonl: row 0 has an 'answer' but no prompt"):
        dataset_questions([{"text": "q", "answer": "a"}], "eval.jsonl")
