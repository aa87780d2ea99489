"""Reward model training (method rm): Bradley-Terry on packed (chosen, rejected) pairs, the loop.

The model is the causal LM's backbone with a scalar head (optsys.models.reward): one packed forward
per row of whole pairs, the head on each sequence's last token, loss
-log sigma(r_c - r_r - margin) + rm.center_coef * (r_c + r_r)^2, mean over the step's pairs.
Held-out pair accuracy is `eval/accuracy`. The final folder is a Hugging Face sequence-classification
model (AutoModelForSequenceClassification reloads it); `score` scores texts or conversations.
"""

from __future__ import annotations

import time

import torch

from optsys.config import ConfigError, TrainConfig
from optsys.data.preference import PairBatch, PreferencePair, packed_pair_batches
from optsys.losses.reward import bradley_terry
from optsys.models.reward import load_reward_model, packed_rewards
from optsys.models.reward import score as score  # re-exported: `from optsys.trainers.reward import score`
from optsys.telemetry.metrics import MetricsLog
from optsys.telemetry.progress import StepProgress
from optsys.trainers.common import (
    autocast_context,
    build_optimizer,
    clip_and_step,
    close_run,
    pick_device,
    prepare_output_dir,
    set_seed,
    warmup_cosine,
)
from optsys.trainers.preference import build_preference_data, pair_steps

KEYS = ("loss", "accuracy", "rewards_chosen", "rewards_rejected", "margin")


def batch_loss(model, batch: PairBatch, cfg: TrainConfig, device, sums: dict) -> torch.Tensor:
    """Sum of the row's per-pair losses; metric sums accumulate in `sums` (key -> [sum, count])."""
    b = batch.packed
    with autocast_context(cfg.trainer.precision, device):
        rewards = packed_rewards(model, b.input_ids.to(device), b.position_ids.to(device), b.seq_lens)
    margin = torch.tensor([cfg.rm.margin if m is None else m for m in batch.margins], device=device)
    loss, metrics = bradley_terry(rewards[0::2], rewards[1::2], margin=margin, center_coef=cfg.rm.center_coef)
    for k, v in {"loss": loss.detach(), **metrics}.items():
        s = sums.setdefault(k, [0.0, 0])
        s[0] += float(v.sum())
        s[1] += v.numel()
    return loss.sum()


def means(sums: dict, prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": sums[k][0] / sums[k][1] for k in KEYS if k in sums and sums[k][1]}


@torch.no_grad()
def evaluate(model, pairs: list[PreferencePair], cfg: TrainConfig, device) -> dict[str, float]:
    sums: dict = {}
    was_training = model.training
    model.eval()
    for batch in packed_pair_batches(pairs, cfg.data.max_tokens, shuffle_seed=None):
        batch_loss(model, batch, cfg, device, sums)
    model.train(was_training)
    return means(sums, "eval/")


def train(cfg: TrainConfig) -> dict:
    t_start = time.time()
    tc = cfg.trainer
    if cfg.resume:
        raise ConfigError("resume=true is not supported by reward-model training yet; start a new run")
    if cfg.model.lora.r > 0:
        raise ConfigError("method=rm trains the full model for now; set model.lora.r=0")
    device = pick_device(cfg.device)
    set_seed(cfg.seed)
    out_dir = prepare_output_dir(cfg)
    model, tokenizer = load_reward_model(cfg.model, device, seed=cfg.seed)
    data = build_preference_data(cfg, tokenizer, kto=False)
    summary: dict = {**data.train_report.metrics("data/"), "data/pairs": len(data.train),
                     "data/eval_pairs": len(data.eval), "model/parameters": sum(p.numel() for p in model.parameters())}
    log = MetricsLog(out_dir)
    step = 0
    if data.eval and cfg.eval.before:
        before = {f"{k}_before": v for k, v in evaluate(model, data.eval, cfg, device).items()}
        summary.update(before)
        log.log(step, before)

    model.train()
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, tc.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(tc.warmup_steps, tc.max_steps,
                                                                           tc.min_lr_ratio))
    steps = pair_steps(data.train, cfg.data.max_tokens, tc.batch_tokens, cfg.seed)
    progress = StepProgress(tc.max_steps, f"rm {cfg.recipe}", enabled=tc.progress)
    sums: dict = {}
    window_tokens, total_tokens, window_t0, t_train, loss_value = 0, 0, time.time(), time.time(), float("nan")
    for step in range(1, tc.max_steps + 1):
        epoch, group = next(steps)
        n_pairs = sum(b.num_pairs for b in group)
        step_loss = 0.0
        for batch in group:
            loss_sum = batch_loss(model, batch, cfg, device, sums)
            (loss_sum / n_pairs).backward()
            step_loss += loss_sum.item()
        grad_norm = clip_and_step(model, optimizer, scheduler, tc.grad_clip)
        loss_value = step_loss / n_pairs
        step_tokens = sum(b.num_tokens for b in group)
        total_tokens += step_tokens
        window_tokens += step_tokens
        if step % tc.log_every == 0 or step == tc.max_steps:
            metrics = {**means(sums, "train/"), "train/lr": scheduler.get_last_lr()[0],
                       "train/grad_norm": grad_norm, "train/epoch": epoch, "train/tokens": total_tokens,
                       "throughput/tokens_per_s": window_tokens / max(time.time() - window_t0, 1e-9)}
            if tc.eval_every and step % tc.eval_every == 0 and data.eval:
                metrics.update(evaluate(model, data.eval, cfg, device))
            log.log(step, metrics)
            progress.update(step, f"loss {metrics['train/loss']:.4f}  acc {metrics['train/accuracy']:.2f}")
            sums, window_tokens, window_t0 = {}, 0, time.time()
        if not torch.isfinite(torch.tensor(loss_value)):
            progress.close()
            raise FloatingPointError(f"train/loss became {loss_value} at step {step}; lower trainer.lr")
    progress.close()
    train_s = time.time() - t_train
    summary.update({"train/loss": loss_value, "train/steps": tc.max_steps, "train/tokens": total_tokens,
                    "time/train_s": train_s, "throughput/tokens_per_s": total_tokens / max(train_s, 1e-9)})
    if data.eval:
        final_eval = evaluate(model, data.eval, cfg, device)
        summary.update(final_eval)
        log.log(step, final_eval)
    final = out_dir / "final"
    model.save_pretrained(final, safe_serialization=True)
    tokenizer.save_pretrained(final)
    close_run(log, summary, device=device, t_start=t_start, out_dir=out_dir)
    return summary
