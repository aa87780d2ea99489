"""The command lines: config errors stop before any model loads, with the key named."""

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


def test_eval_cli_scores_a_model(tiny_path):
    proc = subprocess.run([sys.executable, "-m", "optsys.eval", "--model", str(tiny_path), "--num", "8",
                           "--max-new-tokens", "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert '"eval/accuracy": 0.0' in proc.stdout  # an untrained model gets none right
    assert '"eval/num_samples": 8' in proc.stdout


def test_train_cli_data_error_is_one_clear_line(tmp_path, tiny_path):
    missing = tmp_path / "nope.jsonl"
    proc = subprocess.run([sys.executable, "-m", "optsys.train", f"model.name_or_path={tiny_path}",
                           "data.task=null", f"data.dataset={missing}", f"output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "DataError" in proc.stderr and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr
