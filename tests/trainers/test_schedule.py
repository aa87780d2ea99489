"""Schedules every trainer shares: trainer.eval_every fires on its own steps, whatever trainer.log_every is."""

import json

import pytest

from optsys.trainers import preference, reward, sft
from optsys.trainers.run import eval_due
from optsys.validation import load_config


def eval_steps(out, key):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if key in r]


def test_eval_due():
    tc = load_config(overrides=["trainer.eval_every=4", "trainer.max_steps=12"]).trainer
    assert [s for s in range(1, 13) if eval_due(tc, s)] == [4, 8]  # step 12: the trainers' final eval
    off = load_config(overrides=["trainer.eval_every=0"]).trainer
    assert not any(eval_due(off, s) for s in range(1, 400))


COMMON = ["trainer.max_steps=12", "trainer.log_every=3", "trainer.eval_every=4", "trainer.warmup_steps=1",
          "trainer.progress=false", "eval.before=false", "eval.after=false", "data.num_eval=20"]


@pytest.mark.parametrize("method", ["sft", "orpo", "rm"])
def test_eval_every_does_not_wait_for_log_every(tmp_path, tiny_path, method):
    """log_every 3, eval_every 4: held-out evals at steps 4 and 8 and the final one at 12 (before the fix,
    the loop evaluated only on logging steps, so only at 12)."""
    recipe, trainer, key = {"sft": ("quickstart", sft, "eval/loss"), "orpo": ("orpo_tiny", preference, "eval/loss"),
                            "rm": ("rm_tiny", reward, "eval/accuracy")}[method]
    out = tmp_path / method
    cfg = load_config(recipe, overrides=[f"model.name_or_path={tiny_path}", f"output_dir={out}",
                                         "data.num_train=100", "data.max_tokens=256", "trainer.batch_tokens=256",
                                         *COMMON])
    trainer.train(cfg)
    assert eval_steps(out, key) == [4, 8, 12]


class Row:
    """A stand-in packed micro-batch: what describe_batches reads."""

    def __init__(self, num_tokens: int, num_pairs: int):
        self.num_tokens, self.num_pairs = num_tokens, num_pairs


@pytest.mark.parametrize("recipe", ["dpo_llama3_8b", "rm_llama3_8b"])
def test_8b_recipes_batch_arithmetic_on_8_ranks(recipe, capsys):
    """The 8B recipes on 8 ranks, with pairs of ~2k tokens packed two to a 4096-token row: ~128 pairs and
    8 micro-batches per rank per step, no fillers (the recipe comments say so, and before the fix they said
    'per GPU' of a global 32768-token step: 1 micro-batch per rank, 16 pairs)."""
    import torch

    from optsys.parallel.dist import World
    from optsys.trainers.common import StepStream, describe_batches

    cfg = load_config(recipe, overrides=["data.dataset=pairs.jsonl"])
    world = World(0, 8, 0, torch.device("cpu"))

    def plan(row_tokens):
        stream = StepStream(lambda epoch: [Row(row_tokens, 2)] * (64 * 65), cfg.trainer.batch_tokens)
        return describe_batches(stream, world, unit="pairs", count=lambda b: b.num_pairs,
                                batch_tokens=cfg.trainer.batch_tokens, max_tokens=cfg.data.max_tokens)

    full = plan(4096)
    assert full["batch/micro_batches_per_rank_per_step"] == 8 and full["batch/filler_fraction"] == 0
    assert full["batch/pairs_per_step"] == 128 and full["batch/tokens_per_rank_per_step"] == 32768
    assert "over all 8 rank(s)" in capsys.readouterr().out
    # Rows a little short of data.max_tokens: a step takes 65 rows, so 7 of the 8 ranks run one filler (9.7% of
    # the slots). The step is cut by tokens so that it is the same for any world size (exact 1-vs-N equality).
    short = plan(4000)
    assert short["batch/micro_batches_per_step"] == 65 and short["batch/filler_fraction"] == pytest.approx(7 / 72)


def test_mostly_filler_steps_warn(capsys):
    import torch

    from optsys.parallel.dist import World
    from optsys.trainers.common import StepStream, describe_batches

    stream = StepStream(lambda epoch: [Row(1000, 1)] * 40, 2000)  # 2 micro-batches a step for 8 ranks
    plan = describe_batches(stream, World(0, 8, 0, torch.device("cpu")), unit="pairs", count=lambda b: b.num_pairs,
                            batch_tokens=2000, max_tokens=1024)
    assert plan["batch/filler_fraction"] == 0.75
    out = capsys.readouterr().out
    assert "75% of the ranks' micro-batch slots are zero-weight fillers" in out and "at least 8192" in out


@pytest.mark.parametrize("recipe", ["grpo_qwen2_5_7b", "grpo_qwen2_5_7b_lora", "dapo_qwen2_5_7b", "gspo_qwen2_5_7b"])
def test_7b_rl_recipes_validate_on_8_ranks(recipe, monkeypatch, tmp_path):
    """The 8-GPU RL examples load as their headers say (torchrun, 8 ranks, a prompts file): every rank gets an
    equal share of every mini-batch's prompt groups."""
    from optsys.validation import load_config

    monkeypatch.setenv("WORLD_SIZE", "8")
    prompts = tmp_path / "gsm8k_rl.jsonl"
    prompts.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    cfg = load_config(recipe, overrides=[f"data.dataset={prompts}"])
    rl = cfg.rl
    assert rl.prompts_per_step % (rl.updates_per_batch * 8) == 0
    assert cfg.trainer.precision == "bf16" and cfg.model.dtype == "bfloat16"
