"""The command lines: config errors stop before any model loads, with the key named."""

import json
import os
import subprocess
import sys

import pytest
from helpers import run_torchrun


def assert_one_paragraph(stderr: str, head: str) -> None:
    """The run ended on one paragraph starting with `head` (no blank line in it), and no traceback anywhere."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(head)]
    assert len(starts) == 1, stderr[-3000:]
    assert all(line.strip() for line in lines[starts[0]:]), stderr[-3000:]


@pytest.mark.parametrize("args, words", [
    (["trainer.lr=abc"], ["config error", "trainer.lr", "abc"]),
    (["--recipe", "nope"], ["config error", "unknown recipe 'nope'"]),
    (["trainer.max_stpes=3"], ["did you mean 'max_steps'"]),
    (["--recipe", "dpo_tiny", "pref.beta=0"], ["config error: pref.beta must be positive"]),
    (["device=tpu"], ["config error: device='tpu'"]),
    (["trainer.min_lr_ratio=5"], ["config error: trainer.min_lr_ratio must be in [0, 1]"]),
    (["data.difficulty=1", "data.num_train=5000"], ["config error: data.task=arithmetic_reversed", "data.num_train"]),
])
def test_train_cli_config_errors(args, words):
    proc = subprocess.run([sys.executable, "-m", "optsys.train", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    for w in words:
        assert w in proc.stderr
    assert "Loading weights" not in proc.stderr  # failed before any model load
    assert_one_paragraph(proc.stderr, "config error: ")


def test_train_cli_model_errors_are_one_paragraph(tmp_path):
    """A folder without safetensors is refused at validation; a hub id that cannot be reached (offline here) at
    load time: both one paragraph naming model.name_or_path, no traceback."""
    folder = tmp_path / "bin-only"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name, words in [(folder, "holds no *.safetensors"), ("nosuchorg/nosuchmodel", "cannot load model")]:
        proc = subprocess.run([sys.executable, "-m", "optsys.train", f"model.name_or_path={name}",
                               f"output_dir={tmp_path / 'run'}", "overwrite=true"],
                              capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode != 0
        assert words in proc.stderr and "model.name_or_path" in proc.stderr
        assert_one_paragraph(proc.stderr, "config error: ")


def test_train_cli_other_ranks_leave_the_message_to_rank_0():
    """A rank other than 0 waits (torchrun stops it once rank 0 has printed and exited); left alone, it prints
    its own error marked with its rank."""
    import time

    from optsys.train import RANK_GRACE_S

    env = {**os.environ, "RANK": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "optsys.train", "device=tpu"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 1 and time.time() - t0 >= RANK_GRACE_S
    assert_one_paragraph(proc.stderr, "rank 1: config error: device='tpu'")


@pytest.mark.parametrize("case", ["bad value", "folder of another run"])
def test_torchrun_input_error_is_printed_once_and_no_rank_dumps_a_traceback(tmp_path, case):
    """Under torchrun every rank meets the error before training (the output folder is checked on each rank, not
    only on rank 0 which creates it), so rank 0 prints one paragraph and no rank dies mid-collective. torchrun's
    own launcher still reports the failed workers after it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("recipe: other\n")
    args = ["trainer.min_lr_ratio=5"] if case == "bad value" else [f"output_dir={run}", "model.name_or_path=tiny:test"]
    proc = run_torchrun(["-m", "optsys.train", *args], timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("config error: ") == 1, proc.stderr[-3000:]
    assert "[rank1]" not in proc.stderr and "[rank0]" not in proc.stderr, proc.stderr[-3000:]


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
    out = tmp_path / "ev"
    proc = subprocess.run([sys.executable, "-m", "optsys.eval", "--model", str(model), "--tasks", "arithmetic",
                           "--difficulty", "1", "--num", "9", "--max-new-tokens", "1", "--engine", "hf",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "results.json").read_text())["results"][0]["tasks"]["arithmetic"]
    assert result["questions"] == 9
    assert result["methods"]["greedy"]["accuracy"] == pytest.approx(right / 9)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and {r["methods"]["greedy"]["completions"][0] for r in rows} == {"8"}
    assert "| arithmetic | greedy |" in proc.stdout


def test_train_cli_data_error_is_one_clear_line(tmp_path, tiny_path):
    missing = tmp_path / "nope.jsonl"
    proc = subprocess.run([sys.executable, "-m", "optsys.train", f"model.name_or_path={tiny_path}",
                           "data.task=null", f"data.dataset={missing}", f"output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "data error: " in proc.stderr and str(missing) in proc.stderr and "data.dataset" in proc.stderr
    assert_one_paragraph(proc.stderr, "data error: ")


def test_train_cli_folders_that_cannot_be_made_are_one_paragraph(tmp_path, monkeypatch):
    """output_dir below a file, and OPTSYS_CACHE_DIR pointing at a file (where tiny: models are built): each was a
    NotADirectoryError traceback from mkdir; now the entry point exits with one config error naming the setting,
    before any model loads (in process: SystemExit carries the paragraph train.main prints)."""
    from optsys.train import main

    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setattr("optsys.train.run", lambda cfg: pytest.fail("the run started"))
    with pytest.raises(SystemExit) as e:
        main([f"output_dir={afile / 'run'}"])
    assert str(e.value.code) == (f"config error: output_dir={afile / 'run'} cannot be created: {afile} is a file, "
                                 "not a folder; pick another output_dir")
    monkeypatch.undo()
    monkeypatch.setenv("OPTSYS_CACHE_DIR", str(afile))
    with pytest.raises(SystemExit) as e:
        main(["model.name_or_path=tiny:test", "eval.before=false", f"output_dir={tmp_path / 'run'}"])
    assert str(e.value.code) == f"config error: OPTSYS_CACHE_DIR={afile} is a file; point it at a folder (it is " \
                                "created if missing)"


def test_two_library_warnings_are_silenced_and_others_still_show():
    """DeepSpeed's "Setting accelerator to CPU" (transformers imports DeepSpeed to save a model) and bitsandbytes'
    "Failed to load CPU gemm_4bit_forward" (peft imports it for LoRA; printed on CPUs with AVX512-BF16) are not
    the user's concern: optsys filters exactly these two messages on the loggers that print them (checked against
    the installed libraries' source, without importing them); the same loggers' other warnings still print."""
    import importlib.util
    import logging
    from pathlib import Path

    import optsys  # noqa: F401 (installs the filters)

    sources = [("deepspeed", "accelerator/real_accelerator.py", "DeepSpeed", "Setting accelerator to CPU. If you"),
               ("bitsandbytes", "backends/cpu/ops.py", "bitsandbytes.backends.cpu.ops",
                "Failed to load CPU gemm_4bit_forward from kernels-community: %s")]
    for package, file, logger_name, message in sources:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin:  # the message is still the library's (a new wording would print)
            assert message.split(":")[0] in (Path(spec.origin).parent / file).read_text(), (package, message)
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logger = logging.getLogger(logger_name)
        logger.addHandler(handler)
        try:
            logger.warning(message, "x") if "%s" in message else logger.warning(message)
            logger.warning("a real warning from %s", package)
        finally:
            logger.removeHandler(handler)
        assert [r.getMessage() for r in records] == [f"a real warning from {package}"], package
