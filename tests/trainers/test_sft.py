"""SFT trainer: a short real run, its outputs, the grad-accumulation math, and bad input."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from optsys.config import ConfigError
from optsys.data.packing import packed_batches
from optsys.data.tasks import get_task
from optsys.data.tokenize import tokenize_rows
from optsys.models.load import load_tokenizer
from optsys.models.packed import attach_forward_methods
from optsys.trainers import sft
from optsys.validation import load_config


def tiny_cfg(tmp_path, tiny_path, *extra):
    return load_config("quickstart", overrides=[
        f"model.name_or_path={tiny_path}", f"output_dir={tmp_path / 'run'}", "data.num_train=300",
        "data.num_eval=40", "data.max_tokens=256", "trainer.batch_tokens=512", "trainer.max_steps=12",
        "trainer.warmup_steps=2", "trainer.log_every=3", "trainer.progress=false", "eval.batch_size=40",
        *extra])


def test_short_run_writes_config_metrics_summary_and_final_model(tmp_path, tiny_path):
    cfg = tiny_cfg(tmp_path, tiny_path, "trainer.eval_every=6")
    summary = sft.train(cfg)
    out = tmp_path / "run"
    assert (out / "config.yaml").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]  # 12 steps, logged every 3; it learns
    assert all("throughput/tokens_per_s" in r for r in rows if "train/loss" in r)
    assert any("eval/loss" in r for r in rows)
    saved = json.loads((out / "summary.json").read_text())
    for key in ("eval/accuracy_before", "eval/accuracy_after", "eval/loss", "train/loss",
                "throughput/tokens_per_s", "memory/peak_mb", "time/total_s", "data/packing_efficiency"):
        assert key in saved, key
    assert saved["train/loss"] == pytest.approx(summary["train/loss"])
    assert 0.5 < saved["data/packing_efficiency"] <= 1.0
    model = AutoModelForCausalLM.from_pretrained(out / "final")  # a plain HF folder
    assert (out / "final" / "model.safetensors").exists() and (out / "final" / "tokenizer.json").exists()
    assert model.config.vocab_size == 512


def test_existing_run_folder_is_refused(tmp_path, tiny_path):
    cfg = tiny_cfg(tmp_path, tiny_path, "trainer.max_steps=1", "eval.before=false", "eval.after=false")
    sft.train(cfg)
    again = tiny_cfg(tmp_path, tiny_path, "trainer.max_steps=2")
    with pytest.raises(ConfigError, match="already holds a different run.*overwrite=true"):
        sft.train(again)
    forced = tiny_cfg(tmp_path, tiny_path, "trainer.max_steps=2", "overwrite=true", "eval.before=false",
                      "eval.after=false")
    sft.train(forced)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) >= 2


def test_packed_and_padded_losses_match(tiny_path):
    """The padded baseline sees the same sequences as the packed row: same loss sum."""
    tok = load_tokenizer(str(tiny_path))
    model = attach_forward_methods(AutoModelForCausalLM.from_pretrained(tiny_path))
    rows = get_task("sorting").sft_rows("train", 9, difficulty=5)
    examples, _ = tokenize_rows(rows, tok, max_tokens=512)
    batch = packed_batches(examples, 512, shuffle_seed=None)[0]
    kw = dict(pad_id=tok.pad_token_id, backend="torch", device=torch.device("cpu"))
    with torch.no_grad():
        packed = sft.micro_batch_loss_sum(model, batch, packing=True, **kw)
        padded = sft.micro_batch_loss_sum(model, batch, packing=False, **kw)
    assert batch.num_target_tokens > 0
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-4)


def test_step_groups_respect_batch_tokens(tiny_path):
    tok = load_tokenizer(str(tiny_path))
    examples, _ = tokenize_rows(get_task("arithmetic").sft_rows("train", 200, difficulty=2), tok, max_tokens=64)
    groups = sft.step_groups(examples, max_tokens=64, batch_tokens=200, seed=0)
    seen_epoch0 = 0
    for _ in range(30):
        epoch, group = next(groups)
        assert 1 <= len(group) and sum(b.num_tokens for b in group) <= 200
        seen_epoch0 += sum(len(b.seq_lens) for b in group) if epoch == 0 else 0
    assert seen_epoch0 == len(examples)  # the first epoch covers every example exactly once


def test_gradient_accumulation_equals_one_big_batch(tiny_path):
    """Sum-then-divide by the step's target count: two micro-batches give the one-batch gradient."""
    tok = load_tokenizer(str(tiny_path))
    examples, _ = tokenize_rows(get_task("arithmetic").sft_rows("train", 12, difficulty=2), tok, max_tokens=512)
    kw = dict(packing=True, pad_id=tok.pad_token_id, backend="torch", device=torch.device("cpu"))

    def grads(batches):
        model = attach_forward_methods(AutoModelForCausalLM.from_pretrained(tiny_path))
        n = sum(b.num_target_tokens for b in batches)
        for b in batches:
            (sft.micro_batch_loss_sum(model, b, **kw) / n).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    one = grads(packed_batches(examples, 512, shuffle_seed=None))
    two = grads(packed_batches(examples[:5], 512, shuffle_seed=None) + packed_batches(examples[5:], 512,
                                                                                      shuffle_seed=None))
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-6)


def test_missing_dataset_file_is_a_clear_error(tmp_path, tiny_path):
    from optsys.errors import DataError

    cfg = tiny_cfg(tmp_path, tiny_path, "data.task=null", f"data.dataset={tmp_path / 'nope.jsonl'}")
    with pytest.raises(DataError, match="nope.jsonl"):
        sft.train(cfg)


def test_dataset_file_run(tmp_path, tiny_path, capsys):
    """A dataset run measures held-out accuracy on the data.eval_dataset rows that carry an 'answer' (numeric
    match: every answer is a number) and says how many rows had none."""
    rows = get_task("arithmetic").sft_rows("train", 50, difficulty=2)
    for r in rows[:30]:
        r["answer"] = r["messages"][-1]["content"]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = tiny_cfg(tmp_path, tiny_path, "data.task=null", f"data.dataset={path}", f"data.eval_dataset={path}",
                   "trainer.max_steps=2")
    summary = sft.train(cfg)
    assert summary["data/kept"] == 50 and "eval/loss" in summary
    assert summary["eval/accuracy_questions"] == 30 and summary["eval/match"] == "numeric"
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 <= saved["eval/accuracy_before"] <= 1 and 0 <= saved["eval/accuracy_after"] <= 1
    assert "20 of 50 rows of" in capsys.readouterr().out


@pytest.mark.slow
def test_quickstart_learns_addition(quickstart_run):
    """The default job: held-out accuracy from ~0 to >= 0.8, and a final model vLLM/HF can load."""
    summary, out = quickstart_run
    print({k: v for k, v in summary.items() if k.startswith(("eval/", "time/"))})
    assert summary["eval/accuracy_before"] < 0.1
    assert summary["eval/accuracy_after"] >= 0.8
    assert (out / "final" / "model.safetensors").exists()


def test_held_out_questions_follow_the_task_rule_or_the_eval_rows(tmp_path, capsys):
    """What eval/accuracy_* is measured on, for every trainer: a built-in task's held-out problems by the task's
    match rule, or the data.eval_dataset rows with an 'answer'; otherwise nothing, said once."""
    from types import SimpleNamespace

    from optsys.trainers.common import held_out_questions

    world = SimpleNamespace(is_main=True)
    for task, match in (("arithmetic", "numeric"), ("arithmetic_reversed", "exact"), ("word_problems", "numeric")):
        held = held_out_questions(load_config("quickstart", overrides=[f"data.task={task}", "data.num_eval=7"]), world)
        assert (held.source, held.match, len(held.questions)) == (f"task:{task}/test", match, 7)
    guess = load_config("guess_sft", overrides=["output_dir=/tmp/x"])
    assert held_out_questions(guess, world) is None and "multi-turn" in capsys.readouterr().out
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    no_eval = load_config("quickstart", overrides=["data.task=null", f"data.dataset={rows}"])
    assert held_out_questions(no_eval, world) is None and "no data.eval_dataset" in capsys.readouterr().out
    no_answers = load_config("quickstart", overrides=["data.task=null", f"data.dataset={rows}",
                                                      f"data.eval_dataset={rows}"])
    assert held_out_questions(no_answers, world) is None
    assert "no row of data.eval_dataset" in capsys.readouterr().out
