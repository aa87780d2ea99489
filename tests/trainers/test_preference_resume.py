"""Preference and reward trainers: a run that crashes and resumes equals an uninterrupted one, bit for bit;
under torchrun (2 processes, FSDP2 on gloo) they follow the 1-process run on the same global steps."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import run_torchrun, worker_env
from safetensors.torch import load_file

from optsys.checkpoint import latest_checkpoint
from optsys.trainers import preference, reward
from optsys.validation import load_config

COMMON = ["data.num_train=60", "data.num_eval=24", "data.max_tokens=256", "trainer.batch_tokens=600",
          "trainer.max_steps=6", "trainer.warmup_steps=1", "trainer.log_every=1", "trainer.eval_every=3",
          "trainer.progress=false", "trainer.plots=false", "trainer.lr=1e-3", "eval.batch_size=24",
          "eval.max_new_tokens=4"]
CASES = {  # name -> (trainer module, recipe, overrides)
    "dpo": (preference, "dpo_tiny", []),
    "dpo-copy": (preference, "dpo_tiny", ["pref.reference=copy"]),
    "dpo-lora": (preference, "dpo_tiny", ["model.lora.r=8", "pref.reference=adapters_off"]),
    "kto": (preference, "kto_tiny", []),
    "rm": (reward, "rm_tiny", ["data.task=sorting", "data.difficulty=3"]),
}


def cfg_for(case, out, model_path, *extra):
    _, recipe, case_overrides = CASES[case]
    return load_config(recipe, overrides=[f"model.name_or_path={model_path}", f"output_dir={out}", *COMMON,
                                          *case_overrides, *extra])


def final_weights(out):
    """The final folder's weights: the full model, or the peft adapter for LoRA."""
    full = out / "final" / "model.safetensors"
    return load_file(full if full.exists() else out / "final" / "adapter_model.safetensors")


def metric_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class Crash(Exception):
    pass


@pytest.mark.parametrize("case", list(CASES))
def test_crash_and_resume_equals_uninterrupted(case, tmp_path, tiny_path, monkeypatch):
    trainer = CASES[case][0]
    full = trainer.train(cfg_for(case, tmp_path / "full", tiny_path, "trainer.save_every=2"))

    # The same run, crashed inside optimizer step 5 (after the step-4 checkpoint), then resumed.
    real_step, calls = trainer.clip_and_step, []

    def crashing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise Crash("injected")
        return real_step(*args, **kwargs)

    killed = tmp_path / "killed"
    monkeypatch.setattr(trainer, "clip_and_step", crashing_step)
    with pytest.raises(Crash):
        trainer.train(cfg_for(case, killed, tiny_path, "trainer.save_every=2"))
    monkeypatch.setattr(trainer, "clip_and_step", real_step)
    assert latest_checkpoint(killed).name == "step-00000004" and not (killed / "summary.json").exists()
    resumed = trainer.train(cfg_for(case, killed, tiny_path, "trainer.save_every=2", "resume=true"))

    a, b = metric_rows(tmp_path / "full"), metric_rows(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b]  # rows of the crashed attempt after step 4: rewound
    timing = ("throughput/tokens_per_s", "time_s")  # wall-clock fields differ run to run
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in timing} == {k: v for k, v in rb.items() if k not in timing}
    for key in ("train/loss", "train/tokens", "eval/accuracy" if case == "rm" else "eval/reward_accuracy"):
        assert full[key] == resumed[key], key
    assert any(k.endswith("_before") for k in resumed)  # kept from the first attempt, not re-measured
    wa, wb = final_weights(tmp_path / "full"), final_weights(killed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_with_changed_data_is_refused(tmp_path, tiny_path):
    out = tmp_path / "run"
    preference.train(cfg_for("dpo", out, tiny_path, "trainer.max_steps=2", "trainer.save_every=2"))
    from optsys.config import ConfigError

    with pytest.raises(ConfigError, match="data.num_train: 60 -> 50"):
        preference.train(cfg_for("dpo", out, tiny_path, "trainer.max_steps=2", "trainer.save_every=2",
                                 "data.num_train=50", "resume=true"))


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=worker_env())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["dpo", "dpo-copy", "dpo-lora", "kto", "rm"])
def test_two_ranks_match_one_process(case, tmp_path, tiny_path):
    _, recipe, case_overrides = CASES[case]
    # max_tokens 256 with batch_tokens 600: steps of 2-4 rows, so the ranks' shares are uneven and the
    # zero-weighted filler runs; the eval split (24 pairs) too.
    args = ["--recipe", recipe, f"model.name_or_path={tiny_path}", *COMMON, *case_overrides,
            "trainer.save_every=3"]
    one = _run([sys.executable, "-m", "optsys.train", *args, f"output_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_torchrun(["-m", "optsys.train", *args, f"output_dir={tmp_path / 'two'}"], timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = metric_rows(tmp_path / "one"), metric_rows(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    diffs = {k: max(abs(ra[k] - rb[k]) for ra, rb in zip(a, b) if k in ra)
             for k in {k for r in a for k in r} if k.startswith(("train/", "eval/")) and k != "train/grad_norm"}
    print(f"{case}: 1 vs 2 processes, max |diff| per metric: " + ", ".join(f"{k} {v:.2g}" for k, v in
                                                                          sorted(diffs.items())))
    assert max(diffs.values()) < 1e-4, diffs
    w1, w2 = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)
    if case == "dpo":  # the reference cache, scored by ranks in shares under FSDP2, equals the 1-process one
        r1, r2 = load_file(tmp_path / "one" / "ref_logps.safetensors"), \
            load_file(tmp_path / "two" / "ref_logps.safetensors")
        for k in r1:
            torch.testing.assert_close(r1[k], r2[k], rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["parallel/world_size"] == 2
