"""Reward model training (method rm): Bradley-Terry on packed (chosen, rejected) pairs, the loop.

The model is the causal LM's backbone with a scalar head (optsys.models.reward): one packed forward
per row of whole pairs, the head on each sequence's pooled token (its rightmost non-pad token, Hugging
Face's rule, so the exported model scores what was trained: optsys.models.reward), loss
-log sigma(r_c - r_r - margin) + rm.center_coef * (r_c + r_r)^2, mean over the step's pairs.
Held-out pair accuracy is `eval/accuracy`. The final folder is a Hugging Face sequence-classification
model (AutoModelForSequenceClassification reloads it); `score` scores texts or conversations.
Like SFT: FSDP2 under torchrun (ranks share each step's rows), checkpoints every trainer.save_every
steps, and resume=true continues bit for bit (optsys/checkpoint.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from optsys.checkpoint import run_fingerprint
from optsys.config import ConfigError, TrainConfig
from optsys.data.preference import PairBatch, PreferencePair, build_preference_data, packed_pair_batches, pairs_sha256
from optsys.losses.reward import bradley_terry
from optsys.models.lora import is_peft, merged_model
from optsys.models.reward import load_reward_model, packed_rewards
from optsys.models.reward import score as score  # re-exported: `from optsys.trainers.reward import score`
from optsys.models.sources import local_source
from optsys.parallel.dist import (
    World,
    all_reduce_sum,
    shared_batches,
    torchrun_world,
)
from optsys.telemetry.nvtx import phase, step_phase, telemetry
from optsys.telemetry.progress import StepProgress
from optsys.trainers.common import (
    MetricWindow,
    autocast_context,
    backward_share,
    build_optimizer,
    clip_and_step,
    describe_batches,
    pair_steps,
    ready_for_training,
    save_gathered,
    warmup_cosine,
)
from optsys.trainers.precision import Precision
from optsys.trainers.run import (
    checkpoint_due,
    eval_due,
    finish_run,
    resume_loop,
    run_summary,
    save_training_checkpoint,
    start_run,
    stop_if_not_finite,
    train_metrics,
)

KEYS = ("loss", "accuracy", "rewards_chosen", "rewards_rejected", "margin")


def batch_loss(model, batch: PairBatch, cfg: TrainConfig, device, meter: MetricWindow | None) -> torch.Tensor:
    """Sum of the row's per-pair losses; metrics go to `meter` (None: a filler row, not counted)."""
    b = batch.packed
    fn = getattr(model, "packed_rewards", None) or (lambda *a: packed_rewards(model, *a))
    with phase("data"):
        ids, pos = b.input_ids.to(device), b.position_ids.to(device)
        margin = torch.tensor([cfg.rm.margin if m is None else m for m in batch.margins], device=device)
    with autocast_context(cfg.trainer.precision, device):
        rewards = fn(ids, pos, b.seq_lens)  # the forward range inside
    with phase("loss.rm"):
        loss, metrics = bradley_terry(rewards[0::2], rewards[1::2], margin=margin, center_coef=cfg.rm.center_coef)
    if meter is not None:
        for k, v in {"loss": loss.detach(), **metrics}.items():
            meter.add(k, v)
    return loss.sum()


@torch.no_grad()
def evaluate(model, pairs: list[PreferencePair], cfg: TrainConfig, world: World) -> dict[str, float]:
    """eval/<metric> means over held-out pairs (eval/accuracy = pair accuracy); ranks share the rows."""
    meter = MetricWindow(KEYS)
    was_training = model.training
    model.eval()
    with phase("eval"):
        for batch, real in shared_batches(packed_pair_batches(pairs, cfg.data.max_tokens, shuffle_seed=None), world):
            batch_loss(model, batch, cfg, world.device, meter if real else None)
    model.train(was_training)
    return meter.all_reduce(world).means("eval/")


def train(cfg: TrainConfig, resolve=local_source) -> dict | None:
    """One process, or one rank of a torchrun job (FSDP2; only rank 0 writes logs and the model)."""
    if cfg.model.lora.quantize != "none":
        raise ConfigError("method=rm supports LoRA but not QLoRA yet; set model.lora.quantize=none")
    with telemetry(cfg.trainer.telemetry), torchrun_world(cfg.device) as world:
        return _train(cfg, world, resolve)


def _train(cfg: TrainConfig, world: World, resolve) -> dict | None:
    run = start_run(cfg, world)
    tc, device, out_dir, precision = cfg.trainer, world.device, run.out_dir, run.precision
    model, tokenizer = load_reward_model(cfg.model, device, seed=cfg.seed, resolve=resolve)
    if world.distributed and is_peft(model):
        raise ConfigError("LoRA (model.lora.r > 0) is not supported under torchrun by the reward trainer yet; "
                          "train full weights, or run LoRA in one process")
    data = build_preference_data(cfg.data, tokenizer, seed=cfg.seed, kto=False)
    summary: dict = {**data.train_report.metrics("data/"), "data/pairs": len(data.train),
                     "data/eval_pairs": len(data.eval), **run_summary(run, model),
                     **describe_batches(pair_steps(data.train, cfg.data.max_tokens, tc.batch_tokens, cfg.seed), world,
                                        unit="pairs", count=lambda b: b.num_pairs, batch_tokens=tc.batch_tokens,
                                        max_tokens=cfg.data.max_tokens)}
    model = ready_for_training(model, world, precision, {"packed_rewards": packed_rewards})
    model.train()
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, tc.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(tc.warmup_steps, tc.max_steps,
                                                                           tc.min_lr_ratio))
    fingerprint = run_fingerprint(cfg, model, num_rows=len(data.train), data_sha256=pairs_sha256(data.train))
    loop = resume_loop(run, summary, model=model, optimizer=optimizer, scheduler=scheduler,
                       fingerprint=fingerprint, keys=KEYS)
    log, clock, meter, loss_value = loop.log, loop.clock, loop.meter, loop.loss
    step = start_step = loop.start_step
    if data.eval and cfg.eval.before and run.resume_from is None:
        before = {f"{k}_before": v for k, v in evaluate(model, data.eval, cfg, world).items()}
        summary.update(before)
        log.log(step, before)

    model.train()
    steps = pair_steps(data.train, cfg.data.max_tokens, tc.batch_tokens, cfg.seed, position=loop.position)
    progress = StepProgress(tc.max_steps, f"rm {cfg.recipe}", enabled=tc.progress and world.is_main)
    for step in range(start_step + 1, tc.max_steps + 1):
        with step_phase(step):
            with phase("data"):
                epoch, group = next(steps)
            n_pairs = sum(b.num_pairs for b in group)
            step_loss = 0.0
            for batch, real in shared_batches(group, world):
                loss_sum = batch_loss(model, batch, cfg, device, meter if real else None)
                step_loss += backward_share(loss_sum, real, n_pairs, world)  # mean over the step's pairs
            grad_norm = clip_and_step(model, optimizer, scheduler, tc.grad_clip)
        (step_loss,) = all_reduce_sum([step_loss], world)
        loss_value = step_loss / n_pairs
        clock.add(sum(b.num_tokens for b in group))
        if step % tc.log_every == 0 or step == tc.max_steps:
            metrics = train_metrics(meter, world, scheduler=scheduler, grad_norm=grad_norm, epoch=epoch, clock=clock)
            log.log(step, metrics)
            progress.update(step, f"loss {metrics['train/loss']:.4f}  acc {metrics['train/accuracy']:.2f}  "
                                  f"{metrics['throughput/tokens_per_s']:.0f} tok/s")
            meter = MetricWindow(KEYS)
            clock.new_window()
        if eval_due(tc, step) and data.eval:  # the last step's eval is the final one below
            log.log(step, evaluate(model, data.eval, cfg, world))
        stop_if_not_finite(loss_value, step, progress, hint="lower trainer.lr")
        if checkpoint_due(tc, step):
            # A saved window holds every rank's sums: on resume rank 0 takes it back, the others start empty.
            save_training_checkpoint(out_dir, step, cfg, world, model=model, optimizer=optimizer,
                                     scheduler=scheduler, fingerprint=fingerprint, clock=clock,
                                     position=steps.position, summary=summary, counters={"loss": loss_value},
                                     window=meter.summed_state(world))
    progress.close()
    summary.update(clock.totals(loss=loss_value, steps=tc.max_steps))
    if data.eval:
        final_eval = evaluate(model, data.eval, cfg, world)
        summary.update(final_eval)
        log.log(step, final_eval)
    save_reward_model(model, tokenizer, out_dir / "final", world, precision)
    return finish_run(run, log, summary)


def save_reward_model(model, tokenizer, path: Path, world: World, precision: Precision) -> None:
    """A Hugging Face sequence-classification folder in model.dtype (gathered from the shards under torchrun).

    With LoRA, `path` holds base + adapters merged into plain weights (so AutoModelForSequenceClassification
    loads it like any reward model), and `<path>-adapter` the peft adapter (with the trained head)."""
    if is_peft(model):
        model.save_pretrained(f"{path}-adapter", safe_serialization=True)
        tokenizer.save_pretrained(f"{path}-adapter")
        merged_model(model).to(precision.storage).save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
        return
    save_gathered(model, tokenizer, path, world, precision)
