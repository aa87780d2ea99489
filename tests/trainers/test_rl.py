"""The RL trainer end to end on CPU: generate (vLLM in process, or HF generate), reward, update, sync, canary.

Fast runs use the random-init tiny:test model; besides the task rewards (all 0 for a random model) they reward
completion length through a user function given by dotted path (test_rl.length_reward), so advantages are not all
zero and the updates move the weights. The learning check is the grpo_tiny recipe (tests/test_recipes.py).
"""

import json

import pytest
import torch

from optsys.config import ConfigError
from optsys.methods import RL_ALGORITHMS
from optsys.validation import load_config

BASE = [
    "model.name_or_path=tiny:test", "data.task=arithmetic_reversed", "data.num_train=64", "data.num_eval=8",
    "data.max_tokens=64", "trainer.max_steps=2", "trainer.lr=1e-3", "trainer.warmup_steps=0", "trainer.log_every=1",
    "trainer.progress=false", "trainer.plots=false", "rl.prompts_per_step=4", "rl.group_size=4", "rl.max_new_tokens=5",
    "rl.rewards=[digits,format,test_rl.length_reward]", "eval.max_new_tokens=5",
]


def length_reward(completion: str, *, prompt: str, answer: str | None) -> float:
    return len(completion) / 10


def rl_config(*overrides):
    """BASE on top of the defaults (not the quickstart recipe, whose SFT batch settings RL refuses)."""
    import tempfile
    from pathlib import Path

    base = Path(tempfile.mkdtemp()) / "rl_base.yaml"
    base.write_text("recipe: rl_test\n")
    return load_config(config_file=str(base), overrides=list(overrides))


def run(tmp_path, method="grpo", *extra, name="run"):
    from optsys.trainers import rl

    out = tmp_path / name
    cfg = rl_config(f"method={method}", *BASE, f"output_dir={out}", *extra)
    return rl.train(cfg), out


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_step_with_vllm_generates_rewards_updates_syncs_and_checks(tmp_path):
    pytest.importorskip("vllm")
    summary, out = run(tmp_path, "grpo", "rl.engine=vllm", "rl.top_p=0.95", "rl.temperature=0.9")
    assert summary["rollout/engine"] == "vllm"
    assert summary["sync/canary_error_start"] < 1e-4  # the engine loaded what the trainer holds
    logged = rows(out)
    steps = [r for r in logged if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        for key in ("time/generate_s", "time/reward_s", "time/ref_logprobs_s", "time/update_s", "time/sync_s",
                    "reward/digits", "reward/format", "train/entropy", "train/logp_gap_mean", "train/clip_fraction",
                    "train/is_truncated_fraction", "train/response_length", "train/loss", "sync/canary_error"):
            assert key in r, key
        assert r["sync/canary_error"] < 1e-4  # every sync checked, within the fp32 tolerance
        # sampler (vLLM, top-p truncated) vs trainer log-probs: the truncation shows as a gap, but a small one
        assert 0 < r["train/logp_gap_mean"] < 1.0
    assert (out / "final" / "model.safetensors").exists()
    from transformers import AutoModelForCausalLM

    from optsys.models.sources import local_source

    before = AutoModelForCausalLM.from_pretrained(local_source("tiny:test"))
    after = AutoModelForCausalLM.from_pretrained(out / "final")
    moved = [not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters())]
    assert sum(moved) > len(moved) // 2  # the updates changed the policy


@pytest.mark.parametrize("lora_sync", ["adapter", "merged"])
def test_lora_grpo_syncs_the_adapter_or_merged_weights_into_vllm(tmp_path, lora_sync):
    """LoRA RL with vLLM: after every step the engine runs the trained adapter (in place, in memory) or the merged
    weights, checked by the canary; the adapter sync moves a small fraction of the merged sync's bytes."""
    pytest.importorskip("vllm")
    summary, out = run(tmp_path, "grpo", "rl.engine=vllm", "model.lora.r=8", f"rl.lora_sync={lora_sync}",
                       "trainer.lr=1e-2")
    steps = [r for r in rows(out) if "sync/canary_error" in r]
    assert steps and all(r["sync/canary_error"] < 1e-4 for r in steps)
    moved = steps[-1]["sync/mb"]
    full_mb = summary["model/parameters"] * 4 / 2**20
    if lora_sync == "adapter":
        assert moved < 0.2 * full_mb
    else:
        assert moved > 0.5 * full_mb
    assert (out / "final" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("method", sorted(RL_ALGORITHMS))
def test_every_rl_method_trains_with_the_hf_engine(tmp_path, method):
    extra = ["rl.engine=hf", "rl.updates_per_batch=2"]
    if method == "dapo":
        extra += ["rl.overlong_buffer=2"]
    if method == "distill":  # another architecture with the same tokenizer: allowed
        extra += ["rl.teacher=tiny:test-llama"]
    summary, out = run(tmp_path, method, *extra)
    assert summary["rollout/engine"] == "hf"
    last = [r for r in rows(out) if "train/loss" in r][-1]
    assert torch.isfinite(torch.tensor(last["train/loss"]))
    assert last["sync/canary_error"] < 1e-5  # the HF engine is the trainer's model
    if method == "dapo":
        assert "train/informative_fraction" in last and "reward/overlong_penalty" in last
    if method == "distill":
        assert last["train/teacher_kl"] != 0
    if method == "ppo":  # the critic learns: its loss is logged and its weights are checkpointed beside the policy
        assert last["train/value_loss"] > 0 and "train/critic_grad_norm" in last
        from safetensors import safe_open

        (ckpt,) = sorted((out / "checkpoints").glob("step-*"))[-1:]
        with safe_open(ckpt / "model.safetensors", "pt") as f:
            keys = list(f.keys())
        assert any(k.startswith("critic.value_head") for k in keys) and any(k.startswith("policy.") for k in keys)


def test_distill_refuses_a_teacher_with_another_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optsys.models.sources import local_source

    path = local_source("tiny:test")
    teacher = tmp_path / "teacher"
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(teacher)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens(["<an-extra-token>"])
    tok.save_pretrained(teacher)
    with pytest.raises(ConfigError, match="another tokenizer"):
        run(tmp_path, "distill", "rl.engine=hf", f"rl.teacher={teacher}")


def test_kl_to_reference_and_sampler_corrections(tmp_path):
    summary, out = run(tmp_path, "grpo", "rl.engine=hf", "rl.kl_coef=0.05", "rl.sampler_correction=mis_seq")
    last = rows(out)[-1 if "train/kl" in rows(out)[-1] else -2]
    assert "train/kl" in last and last["train/kl"] >= 0
    assert "train/is_masked_fraction" in last


def test_a_sync_that_skips_a_parameter_stops_the_run(tmp_path, monkeypatch):
    """The canary inside the trainer: a sync made to miss a trained parameter is caught at the first step."""
    pytest.importorskip("vllm")
    from optsys.rollout import sync
    from optsys.trainers import rl

    real = sync.sync_weights

    def broken(engine, model, **kw):
        return real(engine, model, **kw, skip={"model.layers.0.mlp.down_proj.weight"})

    monkeypatch.setattr(rl, "sync_weights", broken)
    with pytest.raises(sync.SyncError, match="not generating with the trained weights"):
        run(tmp_path, "grpo", "rl.engine=vllm", "trainer.lr=1e-2", "trainer.max_steps=1")


@pytest.mark.parametrize("overrides, match", [
    (["rl.group_size=1"], "rl.group_size must be >= 2"),
    (["rl.prompts_per_step=6", "rl.updates_per_batch=4"], "mini-batches of whole prompt groups"),
    (["rl.reward_weights=[1.0]"], "one weight per reward"),
    (["rl.rewards=[corect]"], "corect"),
    (["rl.kl_estimator=k1"], "rl.kl_coef"),
    (["rl.kl_coef=0.1", "rl.kl_estimator=k1"], "expected gradient is 0"),  # a loss term
    (["rl.kl_coef=0.1", "rl.kl_estimator=k3", "method=ppo"], "only k1"),  # the KL is in ppo's reward
    (["rl.kl_coef=0.1", "rl.kl_estimator=k2", "method=reinforce_pp"], "only k1"),
    (["rl.max_new_tokens=64"], "data.max_tokens"),
    (["trainer.batch_tokens=8192"], "trainer.batch_tokens"),
    (["rl.top_p=0"], "rl.top_p"),
    (["model.lora.r=8", "model.lora.quantize=nf4", "rl.engine=vllm"], "QLoRA"),
    (["rl.lora_sync=adapter"], "rl.lora_sync applies to LoRA"),
    (["pref.beta=0.5"], "pref"),
    (["rl.clip_eps=0.3", "method=cispo"], "rl.clip_eps"),
    (["rl.teacher=tiny:test"], "rl.teacher"),
    (["method=distill"], "needs rl.teacher"),
    (["method=distill", "rl.teacher=tiny:nope"], "no tiny preset"),
    (["rl.log_completions=-1"], r"rl.log_completions must be >= 0 \(0 writes no completions.jsonl\)"),
])
def test_bad_rl_settings_are_refused_before_anything_loads(overrides, match):
    with pytest.raises(ConfigError, match=match):
        rl_config("method=grpo", *BASE, *overrides)


@pytest.mark.parametrize("overrides, world, match", [
    (["data.task=guess", "rl.rewards=[digits]"], "1", "its environment gives the rewards"),
    (["rl.max_turns=3"], "1", "applies to multi-turn tasks"),
    (["data.task=guess", "rl.rewards=[correct]", "rl.engine=hf"], "2", "needs the vLLM engine"),
])
def test_multi_turn_settings_are_checked(overrides, world, match, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(ConfigError, match=match):
        rl_config("method=grpo", *BASE, *overrides)


@pytest.mark.parametrize("overrides, world, match", [
    (["rl.engine_tensor_parallel=2"], "1", "a world size it divides"),
    (["rl.engine_tensor_parallel=2", "rl.engine=hf"], "2", "needs the vLLM engine"),
    (["rl.engine_tensor_parallel=0"], "1", "rl.engine_tensor_parallel"),
    (["rl.engine_tensor_parallel=2", "data.task=guess", "rl.rewards=[correct]"], "2", "lock step"),
    (["rl.engine_tensor_parallel=2", "model.lora.r=8", "rl.lora_sync=adapter"], "2", "rl.lora_sync=merged"),
])
def test_tensor_parallel_engine_settings_are_checked(overrides, world, match, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(ConfigError, match=match):
        rl_config("method=grpo", *BASE, *overrides)


def test_rl_settings_are_refused_for_other_methods():
    with pytest.raises(ConfigError, match="rl.group_size"):
        rl_config("rl.group_size=4")


def test_a_prompt_longer_than_the_context_is_a_data_error(tmp_path):
    from optsys.errors import DataError

    with pytest.raises(DataError, match="row 0: the prompt has"):
        run(tmp_path, "grpo", "rl.engine=hf", "data.max_tokens=12", "rl.max_new_tokens=4")


def runs_on_ranks(tmp_path, shapes, method, *extra):
    """{(ranks, tensor_parallel): {step: metrics row}} of the BASE run with `extra`, 3 steps, one per shape: one
    process for (1, 1), else torchrun on gloo with FSDP2."""
    import os
    import subprocess
    import sys

    from helpers import run_torchrun, worker_env

    base = tmp_path / "base.yaml"
    base.write_text("recipe: rl_test\n")
    args = [f"--config={base}", f"method={method}", *BASE, "trainer.max_steps=3", "eval.before=false",
            "eval.after=false", "rl.updates_per_batch=2", *extra]
    here = os.path.dirname(__file__)  # test_rl.length_reward is imported by dotted path in the workers
    env = {"PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    outs = {}
    for n, tp in shapes:
        out = tmp_path / f"n{n}-tp{tp}"
        train = ["-m", "optsys.train", *args, *([f"rl.engine_tensor_parallel={tp}"] if tp > 1 else []),
                 f"output_dir={out}"]
        if n > 1:
            proc = run_torchrun(train, nproc=n, env=env, timeout=600)
        else:
            proc = subprocess.run([sys.executable, *train], capture_output=True, text=True, timeout=600,
                                  env=worker_env(**env))
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[n, tp] = {r["step"]: r for r in rows(out) if "train/loss" in r}
        assert sorted(outs[n, tp]) == [1, 2, 3], (n, tp)
        if "rl.engine=vllm" in extra:  # what vLLM reports it runs
            assert json.loads((out / "summary.json").read_text())["rollout/tensor_parallel"] == tp
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_grpo_on_two_ranks_matches_one_process(tmp_path, engine):
    """torchrun, 2 ranks on gloo, FSDP2, an engine per rank on its share of the prompts (vLLM: external_launcher,
    one engine per rank in the trainer's process group): the same samples (seeded per prompt), rewards and loss as
    one process, since every aggregate is over all ranks' tokens; every rank's engine passes the canary. vLLM
    also as one engine split over both ranks (rl.engine_tensor_parallel=2): the same again."""
    if engine == "vllm":
        pytest.importorskip("vllm")
    shapes = ((1, 1), (2, 1), (2, 2)) if engine == "vllm" else ((1, 1), (2, 1))
    outs = runs_on_ranks(tmp_path, shapes, "grpo", f"rl.engine={engine}", "rl.canary_every=1")  # every sync checked
    one = outs.pop((1, 1))
    for (n, tp), many in outs.items():
        for step in (1, 2, 3):
            a, b = one[step], many[step]
            assert a["reward/mean"] == pytest.approx(b["reward/mean"], abs=1e-6), (n, tp)  # same samples
            assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-4), (n, tp)
            assert b["sync/canary_error"] < 1e-4, (n, tp)


@pytest.mark.slow
def test_reinforce_pp_with_a_kl_on_two_ranks_matches_one_process(tmp_path):
    """REINFORCE++ whitens its returns over every rank's tokens, and its KL (k1 in the reward) goes to a reference
    sharded like the policy: 2 ranks log the rewards, KL and gradient norm of one process."""
    outs = runs_on_ranks(tmp_path, ((1, 1), (2, 1)), "reinforce_pp", "rl.engine=hf", "rl.kl_coef=0.05")
    one, two = outs[1, 1], outs[2, 1]
    for step in (1, 2, 3):
        a, b = one[step], two[step]
        assert a["reward/mean"] == pytest.approx(b["reward/mean"], abs=1e-6), step
        for key in ("train/loss", "train/kl"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (step, key)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-3), step


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_killed_rl_run_resumes_and_logs_what_an_uninterrupted_run_logs(tmp_path, method):
    """SIGKILL after a mid-window checkpoint, resume=true: the same prompts, samples (seeded by step and group),
    rewards, losses and final weights as an uninterrupted run (PPO: the critic and its optimizer state too).
    Time metrics aside, every logged value matches."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    base = tmp_path / "base.yaml"
    base.write_text("recipe: rl_test\n")
    here = os.path.dirname(__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}

    def cli(out, *extra):
        return [sys.executable, "-m", "optsys.train", f"--config={base}", f"method={method}", *BASE, "rl.engine=hf",
                "trainer.max_steps=6", "trainer.save_every=3", "trainer.log_every=2", "eval.before=false",
                "eval.after=false", f"output_dir={out}", *extra]

    full, killed = tmp_path / "full", tmp_path / "killed"
    done = subprocess.run(cli(full), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen(cli(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list((killed / "checkpoints").glob("step-00000003")) if (killed / "checkpoints").exists() else []:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended on its own (rc {proc.returncode}) before the kill"
    with open(killed / "completions.jsonl", "a") as f:  # what a run killed after logging step 4 had written
        f.write(json.dumps({"step": 4, "completion": "written after the step-3 checkpoint"}) + "\n")
    resumed = subprocess.run(cli(killed, "resume=true"), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def logged(out):
        return {r["step"]: {k: v for k, v in r.items() if not k.startswith("time") and k != "time_s"}
                for r in rows(out) if "train/loss" in r}

    a, b = logged(full), logged(killed)
    assert sorted(a) == sorted(b) == [2, 4, 6]  # step 4's window spans the kill (steps 3 and 4)
    for step in a:
        assert a[step].keys() == b[step].keys()
        for k in a[step]:
            assert b[step][k] == pytest.approx(a[step][k], rel=1e-6, abs=1e-7), (step, k)
    wa, wb = load_file(full / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # completions.jsonl is rewound to the checkpoint like metrics.jsonl: no row twice, the same rows
    assert (killed / "completions.jsonl").read_text() == (full / "completions.jsonl").read_text()


def test_multi_turn_guessing_game_trains_on_model_tokens_only(tmp_path):
    """data.task=guess: episodes against the environment, its replies in the sequence but masked out of the loss
    (targets -100, no aggregation weight); env/* metrics and the held-out success rate before and after."""
    from optsys.trainers import rl

    seen = []
    real = rl.micro_batches

    def spy(rollouts, *args, **kw):
        seen.extend(rollouts)
        return real(rollouts, *args, **kw)

    import unittest.mock

    with unittest.mock.patch.object(rl, "micro_batches", spy):
        summary, out = run(tmp_path, "grpo", "rl.engine=hf", "data.task=guess", "data.max_tokens=128",
                           "rl.max_new_tokens=3", "rl.max_turns=3", "rl.rewards=[correct]")
    assert "eval/success_rate_before" in summary and "eval/success_rate_after" in summary
    last = rows(out)[-1 if "env/mean_turns" in rows(out)[-1] else -2]
    assert 1 <= last["env/mean_turns"] <= 3
    multi = [r for r in seen if r.episode is not None and r.episode.turns > 1]
    assert multi, "no episode had a second turn: the environment path did not run"
    for r in multi:
        ex = r.example()
        n = len(r.prompt.ids)
        masked_env = [t for t, m in zip(ex.targets[n - 1 :], r.loss_mask) if not m]
        assert masked_env and all(t == -100 for t in masked_env)  # environment tokens are never targets
        assert r.n_trained == sum(t != -100 for t in ex.targets) < len(r.token_ids)


def test_held_out_accuracy_every_eval_every_steps(tmp_path):
    """trainer.eval_every in RL: greedy held-out accuracy (eval/accuracy) at steps 2 and 4 of 5, on the policy
    of that step, with eval.before and eval.after off; a multi-turn task plays its held-out games instead. (The
    setting was accepted and ignored by the RL trainer before.)"""
    common = ["rl.engine=hf", "trainer.max_steps=5", "trainer.eval_every=2", "eval.before=false", "eval.after=false"]
    summary, out = run(tmp_path, "grpo", *common)
    assert [r["step"] for r in rows(out) if "eval/accuracy" in r] == [2, 4]
    assert all(0 <= r["eval/accuracy"] <= 1 for r in rows(out) if "eval/accuracy" in r)
    assert "eval/accuracy_before" not in summary and "eval/accuracy_after" not in summary  # curve points only
    summary, out = run(tmp_path, "grpo", *common, "data.task=guess", "data.max_tokens=128", "rl.max_new_tokens=3",
                       "rl.max_turns=2", "rl.rewards=[correct]", "trainer.max_steps=3", name="guess")
    assert [r["step"] for r in rows(out) if "eval/success_rate" in r] == [2]
    assert [r["step"] for r in rows(out) if "eval/sampled_success_rate" in r] == [2]


def test_a_tokenizer_without_a_chat_template_is_a_data_error(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optsys.errors import DataError
    from optsys.models.sources import local_source

    path = local_source("tiny:test")
    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(bare)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = None
    tok.save_pretrained(bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(DataError, match="no chat template"):
        run(tmp_path, "grpo", "rl.engine=hf", f"model.name_or_path={bare}")


def test_rl_on_a_dataset_of_prompts_and_bad_rows(tmp_path):
    """data.dataset with rows {prompt, answer}: string prompts or chat messages; a row without a usable prompt is a
    data error naming the file and row. Held-out accuracy is measured on data.eval_dataset before and after, as on
    a built-in task (numeric match: every answer is a number), and completions.jsonl holds rl.log_completions
    completions per logged step with their rewards and advantages."""
    import json as _json

    from optsys.errors import DataError

    good = tmp_path / "prompts.jsonl"
    rows_ = [{"prompt": f"{a}+{b}=", "answer": str(a + b)[::-1]} for a, b in [(12, 34), (56, 7), (40, 40), (9, 91)]]
    rows_.append({"prompt": [{"role": "user", "content": "1+2="}], "answer": 3})
    good.write_text("\n".join(_json.dumps(r) for r in rows_ * 2) + "\n")
    summary, out = run(tmp_path, "grpo", "rl.engine=hf", "data.task=null", f"data.dataset={good}",
                       f"data.eval_dataset={good}", "rl.log_completions=3", name="ds")
    logged = rows(out)
    assert any("reward/digits" in r for r in logged)
    assert summary["eval/accuracy_questions"] == 10 and summary["eval/match"] == "numeric"
    for tag in ("before", "after"):
        assert 0.0 <= summary[f"eval/accuracy_{tag}"] <= 1.0
        assert any(f"eval/accuracy_{tag}" in r for r in logged)
    saved = _json.loads((out / "summary.json").read_text())
    assert "eval/accuracy_before" in saved and "eval/accuracy_after" in saved
    completions = [_json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [c["step"] for c in completions] == [1, 1, 1, 2, 2, 2]  # trainer.log_every=1, 3 a step
    prompts = {r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"] for r in rows_}
    for c in completions:
        assert c["prompt"] in prompts and isinstance(c["completion"], str)
        assert set(c["rewards"]) == {"digits", "format", "test_rl.length_reward"}
        assert c["reward"] == pytest.approx(sum(c["rewards"].values()))  # weights 1
        assert c["rewards"]["test_rl.length_reward"] == pytest.approx(len(c["completion"]) / 10)
        assert isinstance(c["advantage"], float)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n" + _json.dumps({"question": "x"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl row 1: RL rows need a 'prompt'"):
        run(tmp_path, "grpo", "rl.engine=hf", "data.task=null", f"data.dataset={bad}", name="bad")


def test_on_policy_old_logprobs_skip_the_extra_pass_and_change_nothing(tmp_path, monkeypatch):
    """With one update per rollout step the update's own forward gives the old log-probs: the logged loss,
    clip/IS fractions, entropy and sampler gap equal those of the run with the separate no-grad pass."""
    from optsys.trainers import rl

    calls = []
    real_score = rl.score_old_and_ref
    def spy(model, *args, **kw):
        calls.append(model)
        return real_score(model, *args, **kw)

    monkeypatch.setattr(rl, "score_old_and_ref", spy)
    fused, out_a = run(tmp_path, "grpo", "rl.engine=hf", name="fused")
    assert calls == []  # no reference, no critic: the no-grad pass does not run at all
    monkeypatch.setattr(rl, "on_policy_old", lambda *args: False)
    separate, out_b = run(tmp_path, "grpo", "rl.engine=hf", name="separate")
    a = [r for r in rows(out_a) if "train/loss" in r]
    b = [r for r in rows(out_b) if "train/loss" in r]
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for key in ("train/loss", "reward/mean", "train/entropy", "train/logp_gap_mean", "train/clip_fraction",
                    "train/grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), key


def test_the_engine_sleeps_through_the_update_and_wakes_for_the_sync(tmp_path, monkeypatch):
    """Per step: generate, sleep discarding the weights (GPU: vLLM level 2; the sync rewrites them all), the update,
    wake the weights, the sync into them, wake the KV cache, then the canary (token_logprobs). The engine's
    side of it (vLLM's calls, empty_cache, the bytes measured) is tests/rollout/test_rollout.py::
    test_vllm_sleep_discards_the_weights_and_wakes_weights_then_kv_cache."""
    from optsys.rollout import hf_engine

    calls = []
    for name in ("generate", "sleep", "wake", "load_weights", "token_logprobs"):
        real = getattr(hf_engine.HFEngine, name)

        def spy(self, *args, _real=real, _name=name, **kw):
            shown = {"sleep": lambda: f"sleep(discard_weights={kw['discard_weights']})",
                     "wake": lambda: f"wake{tuple(args[0])}"}.get(_name, lambda: _name)()
            calls.append(shown)
            return _real(self, *args, **kw)

        monkeypatch.setattr(hf_engine.HFEngine, name, spy)
    run(tmp_path, "grpo", "rl.engine=hf", "eval.before=false", "eval.after=false")
    sync = ["load_weights", "wake('kv_cache',)", "token_logprobs"]
    per_step = ["generate", "sleep(discard_weights=True)", "wake('weights',)", *sync]
    assert calls == sync + per_step * 2  # the first sync checks the engine before any rollout


def test_old_and_reference_logprobs_are_scored_in_eval_mode(tiny_path):
    """With dropout (LoRA's, p=0.5, on trained adapters) a train-mode forward is random. The old log-probs and the
    reference's are scored in eval mode: the policy's own, the same on every pass, and the model is back in train
    mode after. The update's fused old log-probs (a train-mode forward) are off with dropout."""
    from types import SimpleNamespace

    from optsys.config import LoraConfig, ModelConfig
    from optsys.models.load import load_model_and_tokenizer
    from optsys.models.packed import attach_forward_methods
    from optsys.trainers import rl
    from optsys.trainers.rl_batch import Prompt, Rollout, micro_batches

    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_path), lora=LoraConfig(r=4, dropout=0.5)),
                                        torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained adapters (lora_B starts at 0, where dropout would change nothing)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    model = attach_forward_methods(model).train()
    world = SimpleNamespace(size=1, rank=0, distributed=False)
    rollouts = [Rollout(Prompt([11, 12, 13, 14], "q", None), 0, [21, 22, 23, 24, 25], [0.0] * 5, "stop")
                for _ in range(2)]
    mbs = micro_batches(rollouts, 64, "token_mean", 5, world, filler=[])
    fwd = rl.Forward(torch.device("cpu"), "fp32", 1.0, "torch")
    passes = []
    for _ in range(2):
        rl.score_old_and_ref(model, model, mbs, fwd)  # the policy as its own reference too
        passes.append([torch.cat([getattr(r, k) for r in rollouts]) for k in ("old_logp", "ref_logp")])
        assert model.training
    with torch.no_grad():
        want = fwd.logps(model.eval(), mbs[0])[0].float()
    for old, ref in passes:
        torch.testing.assert_close(old, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(ref, want, rtol=0, atol=1e-6)
    assert rl.has_dropout(model) and not rl.on_policy_old(1, "grpo", rl.has_dropout(model))


def test_a_lora_policy_s_reference_is_its_base_with_the_adapters_off(tiny_path, monkeypatch):
    """With LoRA the KL reference is the policy with its adapters disabled: no second model is built (a deepcopy
    would be one), and its log-probs equal those of a separately loaded base model, while the policy's (trained
    adapters) differ."""
    from types import SimpleNamespace

    from optsys.config import LoraConfig, ModelConfig
    from optsys.models.load import load_model_and_tokenizer
    from optsys.models.packed import attach_forward_methods
    from optsys.trainers import rl
    from optsys.trainers.precision import resolve_precision
    from optsys.trainers.rl_batch import Prompt, Rollout, micro_batches

    cpu = torch.device("cpu")
    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_path), lora=LoraConfig(r=4)), cpu)
    world = SimpleNamespace(size=1, rank=0, distributed=False)

    def no_copy(*args, **kw):
        raise AssertionError("the reference of a LoRA policy must not copy the model")

    monkeypatch.setattr(rl, "copy", SimpleNamespace(deepcopy=no_copy))  # rl.py's copy module only
    ref = rl.build_reference(model, world, resolve_precision("fp32", "float32", cpu))
    assert isinstance(ref, rl.AdaptersOff) and ref.model is model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained adapters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    model = attach_forward_methods(model).train()
    rollouts = [Rollout(Prompt([11, 12, 13, 14], "q", None), 0, [21, 22, 23, 24, 25], [0.0] * 5, "stop")]
    (mb,) = micro_batches(rollouts, 64, "token_mean", 5, world, filler=[])
    fwd = rl.Forward(cpu, "fp32", 1.0, "torch")
    rl.score_old_and_ref(model, ref, [mb], fwd)
    base, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_path)), cpu)
    with torch.no_grad():
        want = fwd.logps(attach_forward_methods(base).eval(), mb)[0].float()
    torch.testing.assert_close(rollouts[0].ref_logp, want, rtol=0, atol=1e-6)
    assert float((rollouts[0].old_logp - want).abs().max()) > 1e-3


def test_a_lora_rl_run_saves_its_merged_model(tmp_path, tiny_path):
    """model.lora.save_merged in RL (it was refused): final/ is the adapter, final-merged/ a plain model whose
    logits equal the base with that adapter applied, the folder optsys.eval --compare and optsys.serve take."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary, out = run(tmp_path, "grpo", "rl.engine=hf", "model.lora.r=4", "model.lora.save_merged=true",
                       "trainer.lr=5e-2", "eval.before=false", "eval.after=false")
    assert (out / "final" / "adapter_config.json").exists()
    assert not (out / "final-merged" / "adapter_config.json").exists()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out / "final-merged", dtype=torch.float32)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
        plain = base(ids).logits
        adapted = PeftModel.from_pretrained(base, out / "final")(ids).logits
    assert (adapted - plain).abs().max() > 1e-4  # the updates moved the adapter
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-4)


def test_host_floats_reads_back_what_float_of_each_value_gives():
    """The update's metrics are read back in one transfer after its micro-batches; each value must be exactly what
    float() of it gave (float32 and float64 tensors, bools, Python numbers, in order)."""
    from optsys.trainers.rl import host_floats

    g = torch.Generator().manual_seed(0)
    values = [torch.randn((), generator=g), 0.1, torch.randn((), generator=g, dtype=torch.float64),
              torch.tensor(True), 3, torch.randn((1,), generator=g) * 1e-30, torch.tensor(float("nan"))]
    got = host_floats(values)
    want = [float(v) for v in values]
    assert got[:-1] == want[:-1] and all(type(x) is float for x in got)
    assert got[-1] != got[-1]  # NaN stays NaN
    assert host_floats([]) == [] and host_floats([1.5]) == [1.5]


def test_canary_checks_the_start_the_first_update_every_nth_and_the_last_sync(tmp_path):
    from optsys.trainers.rl import canary_due

    assert [n for n in range(26) if canary_due(n, 10, 25)] == [0, 1, 10, 20, 25]
    assert [n for n in range(8) if canary_due(n, 3, 7)] == [0, 1, 3, 6, 7]
    assert all(canary_due(n, 1, 5) for n in range(6)) and not any(canary_due(n, 0, 5) for n in range(6))
    # in the trainer: the steps whose metrics carry the check (log_every=1), and the start's in the summary
    summary, out = run(tmp_path, "grpo", "rl.engine=hf", "trainer.max_steps=4", "rl.canary_every=3")
    assert [r["step"] for r in rows(out) if "sync/canary_error" in r] == [1, 3, 4]
    assert summary["sync/canary_error_start"] < 1e-5
