"""Supervised fine-tuning on packed sequences: the loop, top to bottom.

One optimizer step = micro-batches (packed rows of <= data.max_tokens tokens) accumulated until
trainer.batch_tokens tokens. The loss is the sum of token cross-entropies over the whole step
divided by the step's number of target tokens, so every token weighs the same however the
sequences fall into rows (a per-row mean would overweight tokens in short rows).
The loss runs from hidden states through the fused linear cross-entropy: no [T, V] logits.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from itertools import count

import torch

from optsys.config import DataConfig, TrainConfig
from optsys.data.packing import PackedBatch, collate_padded, packed_batches, packing_efficiency
from optsys.data.sources import load_rows
from optsys.data.tasks import get_task
from optsys.data.tokenize import DataReport, TokenizedExample, tokenize_rows
from optsys.eval.accuracy import task_accuracy
from optsys.kernels import fused_linear_cross_entropy
from optsys.models.load import load_model_and_tokenizer
from optsys.models.packed import lm_head_weight, packed_hidden, padded_hidden
from optsys.telemetry.metrics import MetricsLog
from optsys.telemetry.nvtx import nvtx_range
from optsys.telemetry.progress import StepProgress
from optsys.trainers.common import (
    autocast_context,
    build_optimizer,
    peak_memory_mb,
    pick_device,
    prepare_output_dir,
    set_seed,
    warmup_cosine,
)


@dataclass
class SFTData:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    train_report: DataReport
    eval_report: DataReport | None


def build_sft_data(cfg: DataConfig, tokenizer, seed: int) -> SFTData:
    """Rows from a built-in task or a dataset, tokenized with assistant-only loss masks."""
    if cfg.task is not None:
        task = get_task(cfg.task)
        train_rows = task.sft_rows("train", cfg.num_train, difficulty=cfg.difficulty, seed=seed)
        eval_rows = task.sft_rows("test", cfg.num_eval, difficulty=cfg.difficulty, seed=seed)
        train_name, eval_name = f"task:{cfg.task}/train", f"task:{cfg.task}/test"
    else:
        train_rows = load_rows(cfg.dataset, split=cfg.split)
        eval_rows = load_rows(cfg.eval_dataset, split=cfg.eval_split) if cfg.eval_dataset else []
        train_name, eval_name = cfg.dataset, cfg.eval_dataset or ""
    common = dict(max_tokens=cfg.max_tokens, train_on_prompt=cfg.train_on_prompt, overlong=cfg.overlong)
    train, train_report = tokenize_rows(train_rows, tokenizer, source=train_name, **common)
    eval_examples, eval_report = (tokenize_rows(eval_rows, tokenizer, source=eval_name, **common)
                                  if eval_rows else ([], None))
    return SFTData(train, eval_examples, train_report, eval_report)


def step_groups(examples: list[TokenizedExample], max_tokens: int, batch_tokens: int, seed: int):
    """Endless stream of optimizer steps, each a list of packed micro-batches.

    A step takes micro-batches while their tokens fit in batch_tokens (at least one per step).

    Every epoch reshuffles the examples before packing, so rows mix differently each epoch.
    """
    for epoch in count():
        order = list(range(len(examples)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        batches = packed_batches([examples[i] for i in order], max_tokens, shuffle_seed=seed + epoch)
        group: list[PackedBatch] = []
        tokens = 0
        for batch in batches:
            if group and tokens + batch.num_tokens > batch_tokens:
                yield epoch, group
                group, tokens = [], 0
            group.append(batch)
            tokens += batch.num_tokens
        if group:  # the epoch's tail makes a smaller step rather than being dropped
            yield epoch, group


def micro_batch_loss_sum(model, batch: PackedBatch, *, packing: bool, pad_id: int, backend: str,
                         device: torch.device) -> torch.Tensor:
    """Sum of token cross-entropies of one micro-batch, packed [1, T] or padded [B, L]."""
    if packing:
        hidden = packed_hidden(model, batch.input_ids.to(device), batch.position_ids.to(device), batch.seq_lens)
        targets = batch.targets[0].to(device)
    else:
        # The same sequences as the packed row, laid out one per padded row (the baseline).
        pieces = zip(batch.input_ids[0].split(batch.seq_lens), batch.targets[0].split(batch.seq_lens))
        padded = collate_padded([TokenizedExample(i.tolist(), t.tolist()) for i, t in pieces], pad_id)
        hidden = padded_hidden(model, padded["input_ids"].to(device), padded["attention_mask"].to(device))
        targets = padded["targets"].reshape(-1).to(device)
    return fused_linear_cross_entropy(hidden, lm_head_weight(model), targets, reduction="sum", backend=backend)


@torch.no_grad()
def eval_loss(model, examples: list[TokenizedExample], cfg: TrainConfig, pad_id: int, device) -> float:
    total, n = 0.0, 0
    model.eval()
    for batch in packed_batches(examples, cfg.data.max_tokens, shuffle_seed=None):
        with autocast_context(cfg.trainer.precision, device):
            total += micro_batch_loss_sum(model, batch, packing=True, pad_id=pad_id,
                                          backend=cfg.trainer.kernel_backend, device=device).item()
        n += batch.num_target_tokens
    model.train()
    return total / max(1, n)


def train(cfg: TrainConfig) -> dict:
    t_start = time.time()
    device = pick_device(cfg.device)
    set_seed(cfg.seed)
    out_dir = prepare_output_dir(cfg)
    log = MetricsLog(out_dir)
    tc = cfg.trainer

    model, tokenizer = load_model_and_tokenizer(cfg.model, device, seed=cfg.seed)
    data = build_sft_data(cfg.data, tokenizer, cfg.seed)
    task = get_task(cfg.data.task) if cfg.data.task else None
    eval_problems = (task.problems("test", cfg.data.num_eval, difficulty=cfg.data.difficulty, seed=cfg.seed)
                     if task else [])
    summary: dict = {
        **data.train_report.metrics("data/"),  # rows, kept, truncated, skipped_<reason>, tokens
        "data/packing_efficiency": packing_efficiency(
            packed_batches(data.train, cfg.data.max_tokens, shuffle_seed=None), cfg.data.max_tokens),
        "model/parameters": sum(p.numel() for p in model.parameters()),
    }

    def accuracy(tag: str) -> None:
        t0 = time.time()
        acc, records = task_accuracy(model, tokenizer, task, eval_problems,
                                     max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
        summary[f"eval/accuracy_{tag}"] = acc
        summary[f"time/eval_{tag}_s"] = time.time() - t0
        log.log(step, {f"eval/accuracy_{tag}": acc})
        print(f"eval/accuracy_{tag} = {acc:.3f}  (e.g. {records[0]['prompt']} -> {records[0]['completion']!r})")

    step = 0
    if task and cfg.eval.before:
        accuracy("before")

    model.train()
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, tc.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(tc.warmup_steps, tc.max_steps, tc.min_lr_ratio))
    groups = step_groups(data.train, cfg.data.max_tokens, tc.batch_tokens, cfg.seed)
    progress = StepProgress(tc.max_steps, f"sft {cfg.recipe}", enabled=tc.progress)
    pad_id = tokenizer.pad_token_id
    t_train = time.time()
    window_tokens, window_loss, window_targets, window_t0 = 0, 0.0, 0, time.time()
    total_tokens = 0
    loss_value = float("nan")

    for step in range(1, tc.max_steps + 1):
        epoch, group = next(groups)
        n_targets = sum(b.num_target_tokens for b in group)
        step_loss = 0.0
        with nvtx_range(f"step {step}"):
            for batch in group:
                with autocast_context(tc.precision, device):
                    loss_sum = micro_batch_loss_sum(model, batch, packing=cfg.data.packing, pad_id=pad_id,
                                                    backend=tc.kernel_backend, device=device)
                # Normalize by the whole step's target count (see module docstring).
                (loss_sum / max(1, n_targets)).backward()
                step_loss += loss_sum.item()
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                         if tc.grad_clip > 0 else torch.tensor(float("nan")))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

        step_tokens = sum(b.num_tokens for b in group)
        total_tokens += step_tokens
        window_tokens += step_tokens
        window_loss += step_loss
        window_targets += n_targets
        loss_value = step_loss / max(1, n_targets)
        if step % tc.log_every == 0 or step == tc.max_steps:
            elapsed = time.time() - window_t0
            metrics = {
                "train/loss": window_loss / max(1, window_targets),
                "train/lr": scheduler.get_last_lr()[0],
                "train/grad_norm": float(grad_norm),
                "train/epoch": epoch,
                "train/tokens": total_tokens,
                "throughput/tokens_per_s": window_tokens / max(elapsed, 1e-9),
            }
            if tc.eval_every and step % tc.eval_every == 0 and data.eval:
                metrics["eval/loss"] = eval_loss(model, data.eval, cfg, pad_id, device)
            log.log(step, metrics)
            progress.update(step, f"loss {metrics['train/loss']:.4f}  {metrics['throughput/tokens_per_s']:.0f} tok/s")
            window_tokens, window_loss, window_targets, window_t0 = 0, 0.0, 0, time.time()
        if not torch.isfinite(torch.tensor(loss_value)):
            progress.close()
            raise FloatingPointError(
                f"train/loss became {loss_value} at step {step}; lower trainer.lr or check the data "
                f"(metrics so far are in {out_dir / 'metrics.jsonl'})")
    progress.close()
    train_s = time.time() - t_train

    summary["train/loss"] = loss_value
    summary["train/steps"] = tc.max_steps
    summary["train/tokens"] = total_tokens
    summary["time/train_s"] = train_s
    summary["throughput/tokens_per_s"] = total_tokens / max(train_s, 1e-9)
    if data.eval:
        summary["eval/loss"] = eval_loss(model, data.eval, cfg, pad_id, device)
        log.log(step, {"eval/loss": summary["eval/loss"]})
    if task and cfg.eval.after:
        accuracy("after")

    final = out_dir / "final"
    model.save_pretrained(final, safe_serialization=True)
    tokenizer.save_pretrained(final)
    summary["memory/peak_mb"] = peak_memory_mb(device)
    summary["time/total_s"] = time.time() - t_start
    summary["output_dir"] = str(out_dir)
    log.write_summary(summary)
    log.close()
    return summary
