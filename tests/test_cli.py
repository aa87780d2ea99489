"""The command lines: config errors stop before any model loads, with the key named."""

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("args, words", [
    (["trainer.lr=abc"], ["config error", "trainer.lr", "abc"]),
    (["--recipe", "nope"], ["config error", "unknown recipe 'nope'"]),
    (["trainer.max_stpes=3"], ["did you mean 'max_steps'"]),
])
def test_train_cli_config_errors(args, words):
    proc = subprocess.run([sys.executable, "-m", "optsys.train", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    for w in words:
        assert w in proc.stderr
    assert "Loading weights" not in proc.stderr  # failed before any model load


def constant_answer_model(tiny_path, out, text: str):
    """The tiny model rewired to emit the single token `text` after any prompt: every embedding row is the
    same vector and the layers add nothing (o_proj, down_proj = 0), so the final hidden state is the same
    everywhere; lm_head scores `text` above every other token."""
    import torch
    from transformers import AutoModelForCausalLM

    from optsys.models.load import load_tokenizer

    tok = load_tokenizer(str(tiny_path))
    (token,) = tok(text, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[token] = 1.0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_eval_cli_scores_right_and_wrong_answers(tmp_path, tiny_path):
    """A model that always answers "8" on 1-digit sums: the CLI must count exactly the problems whose sum is 8
    as right (so the checker says yes to a right answer and no to a wrong one)."""
    from optsys.data.tasks import get_task

    model = constant_answer_model(tiny_path, tmp_path / "eight", "8")
    problems = get_task("arithmetic").problems("test", 9, difficulty=1)
    right = sum(p.answer == "8" for p in problems)
    assert 0 < right < len(problems)
    proc = subprocess.run([sys.executable, "-m", "optsys.eval", "--model", str(model), "--difficulty", "1",
                           "--num", "9", "--max-new-tokens", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert out["eval/num_samples"] == 9
    assert out["eval/accuracy"] == pytest.approx(right / 9)
    assert {e["completion"] for e in out["examples"]} == {"8"}


def test_train_cli_data_error_is_one_clear_line(tmp_path, tiny_path):
    missing = tmp_path / "nope.jsonl"
    proc = subprocess.run([sys.executable, "-m", "optsys.train", f"model.name_or_path={tiny_path}",
                           "data.task=null", f"data.dataset={missing}", f"output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "DataError" in proc.stderr and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr
