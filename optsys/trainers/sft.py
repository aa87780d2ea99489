"""Supervised fine-tuning on packed sequences: the loop, top to bottom.

One optimizer step = micro-batches (packed rows of <= data.max_tokens tokens) accumulated until
trainer.batch_tokens tokens. The loss is the sum of token cross-entropies over the whole step
divided by the step's number of target tokens, so every token weighs the same however the
sequences fall into rows (a per-row mean would overweight tokens in short rows).
The loss runs from hidden states through the fused linear cross-entropy: no [T, V] logits.
Checkpoints (optsys/checkpoint.py) every trainer.save_every steps and at the end; resume=true continues
from the latest one bit for bit: same weights, optimizer, schedule, RNG, data position and log windows.
parallel.backend=deepspeed hands weights, AdamW and schedule to a DeepSpeed ZeRO engine (optsys/parallel/zero.py):
the losses then run through `net` (the engine), and backward, step and checkpoints go through it.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

import torch

from optsys.checkpoint import run_fingerprint
from optsys.config import DataConfig, TrainConfig
from optsys.data.packing import PackedBatch, collate_padded, packed_batches, packing_efficiency
from optsys.data.sources import load_rows
from optsys.data.tasks import get_task
from optsys.data.tokenize import DataReport, TokenizedExample, tokenize_rows
from optsys.models.load import load_model_and_tokenizer
from optsys.models.sources import local_source
from optsys.parallel.dist import all_reduce_sum, shared_batches, torchrun_world
from optsys.telemetry.nvtx import phase, step_phase, telemetry
from optsys.telemetry.progress import StepProgress, progress_items
from optsys.trainers.common import (
    MetricWindow,
    StepStream,
    autocast_context,
    backward_share,
    build_optimizer,
    clip_and_step,
    deepspeed_engine,
    describe_batches,
    epoch_order,
    held_out_accuracy,
    ready_for_training,
    save_final_model,
    warmup_cosine,
)
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


def step_groups(examples: list[TokenizedExample], max_tokens: int, batch_tokens: int, seed: int,
                position: tuple[int, int] = (0, 0)) -> StepStream:
    """The SFT step stream, optionally starting at a saved `position` (see StepStream).

    Every epoch reshuffles the examples before packing, so rows mix differently each epoch."""

    def epoch_batches(epoch: int) -> list[PackedBatch]:
        order = epoch_order(len(examples), seed, epoch)
        return packed_batches([examples[i] for i in order], max_tokens, shuffle_seed=seed + epoch)

    return StepStream(epoch_batches, batch_tokens, position)


def examples_sha256(examples: list[TokenizedExample]) -> str:
    """Content hash of the tokenized training set: part of the resume fingerprint."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(array("q", [len(ex.input_ids), *ex.input_ids, *ex.targets]).tobytes())
    return h.hexdigest()


def micro_batch_loss_sum(model, batch: PackedBatch, *, packing: bool, pad_id: int, backend: str,
                         device: torch.device) -> torch.Tensor:
    """Sum of token cross-entropies of one micro-batch, packed [1, T] or padded [B, L].

    `model` carries `token_loss_sum` (optsys.models.packed.attach_forward_methods)."""
    if packing:
        with phase("data"):
            b = batch.to(device)
        return model.token_loss_sum(b.targets, input_ids=b.input_ids, position_ids=b.position_ids,
                                    seq_lens=b.seq_lens, backend=backend)
    # The same sequences as the packed row, laid out one per padded row (the baseline).
    pieces = zip(batch.input_ids[0].split(batch.seq_lens), batch.targets[0].split(batch.seq_lens))
    with phase("data"):
        padded = collate_padded([TokenizedExample(i.tolist(), t.tolist()) for i, t in pieces], pad_id)
        padded = {k: v.to(device) for k, v in padded.items()}
    return model.token_loss_sum(padded["targets"], input_ids=padded["input_ids"],
                                attention_mask=padded["attention_mask"], backend=backend)


def loss_rows(examples: list[TokenizedExample], max_rows: int) -> list[TokenizedExample]:
    """The held-out rows eval/loss runs on: the first eval.loss_max_rows (0 = all)."""
    return examples[:max_rows] if max_rows else examples


@torch.no_grad()
def eval_loss(model, examples: list[TokenizedExample], cfg: TrainConfig, pad_id: int, device,
              show: bool = False) -> float:
    """Token-mean cross-entropy on the held-out rows (already cut by loss_rows), packed like training rows;
    `show`: a progress bar over the packed rows."""
    total, n = 0.0, 0
    model.eval()
    batches = packed_batches(examples, cfg.data.max_tokens, shuffle_seed=None)
    with phase("eval"):
        for batch in progress_items(batches, f"eval/loss ({len(examples)} rows)", enabled=show):
            with autocast_context(cfg.trainer.precision, device):
                total += micro_batch_loss_sum(model, batch, packing=True, pad_id=pad_id,
                                              backend=cfg.trainer.kernel_backend, device=device).item()
            n += batch.num_target_tokens
    model.train()
    return total / max(1, n)


def train(cfg: TrainConfig, resolve=local_source) -> dict | None:
    """One process, or one rank of a torchrun job (FSDP2; only rank 0 writes logs and the model).
    `resolve(source, seed)` turns a model source into a folder (optsys.models.sources.local_source; the entry
    points pass optsys.sources.resolve_source, which trains or reuses `stage:` recipes)."""
    one_rank_group = cfg.parallel.backend == "deepspeed"  # DeepSpeed needs a process group in one process too
    with telemetry(cfg.trainer.telemetry), torchrun_world(cfg.device, group_of_one=one_rank_group) as world:
        return _train(cfg, world, resolve)


def _train(cfg: TrainConfig, world, resolve) -> dict | None:
    run = start_run(cfg, world)
    device, tc, out_dir, precision = world.device, cfg.trainer, run.out_dir, run.precision
    model, tokenizer = load_model_and_tokenizer(cfg.model, device, seed=cfg.seed, resolve=resolve)
    data = build_sft_data(cfg.data, tokenizer, cfg.seed)
    summary: dict = {
        **data.train_report.metrics("data/"),  # rows, kept, truncated, skipped_<reason>, tokens
        "data/packing_efficiency": packing_efficiency(
            packed_batches(data.train, cfg.data.max_tokens, shuffle_seed=None), cfg.data.max_tokens),
        **run_summary(run, model),  # model/stage: the cached stage folder a stage:<recipe> model came from
        **describe_batches(step_groups(data.train, cfg.data.max_tokens, tc.batch_tokens, cfg.seed), world,
                           unit="sequences", count=lambda b: len(b.seq_lens), batch_tokens=tc.batch_tokens,
                           max_tokens=cfg.data.max_tokens),
    }
    # fp32 master weights; FSDP2 under torchrun (parallel.backend=fsdp2)
    model = ready_for_training(model, world, precision, backend=cfg.parallel.backend)
    model.train()
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, tc.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(tc.warmup_steps, tc.max_steps, tc.min_lr_ratio))
    fingerprint = run_fingerprint(cfg, model, num_rows=len(data.train), data_sha256=examples_sha256(data.train))
    engine = None  # parallel.backend=deepspeed: the ZeRO engine, which owns model, optimizer and schedule from here
    if cfg.parallel.backend == "deepspeed":
        engine = deepspeed_engine(cfg, world, precision, out_dir, model=model, optimizer=optimizer,
                                  scheduler=scheduler)
    net = model if engine is None else engine  # what the losses run through
    loop = resume_loop(run, summary, model=model, optimizer=optimizer, scheduler=scheduler,
                       fingerprint=fingerprint, keys=("loss",), engine=engine)  # eval/accuracy_before: kept
    log, clock, meter, loss_value = loop.log, loop.clock, loop.meter, loop.loss

    accuracy = held_out_accuracy(model=model, tokenizer=tokenizer, cfg=cfg, world=world, log=log,
                                 summary=summary)
    step = start_step = loop.start_step
    if cfg.eval.before and run.resume_from is None:
        accuracy("before", step)
        model.train()

    groups = step_groups(data.train, cfg.data.max_tokens, tc.batch_tokens, cfg.seed, position=loop.position)
    progress = StepProgress(tc.max_steps, f"sft {cfg.recipe}", enabled=tc.progress and world.is_main)
    pad_id = tokenizer.pad_token_id
    held_out = loss_rows(data.eval, cfg.eval.loss_max_rows)
    if held_out and len(held_out) < len(data.eval):
        summary["eval/loss_rows"] = len(held_out)
        if world.is_main:
            print(f"eval/loss: on the first {len(held_out)} of {len(data.eval)} held-out rows "
                  "(eval.loss_max_rows; 0 = all)", flush=True)
    show = tc.progress and world.is_main

    for step in range(start_step + 1, tc.max_steps + 1):
        with step_phase(step):
            with phase("data"):
                epoch, group = next(groups)  # every rank builds the same global step, then takes its share
            n_targets = sum(b.num_target_tokens for b in group)
            step_loss = 0.0
            # A rank short of micro-batches reruns one with weight 0, keeping FSDP's collectives in step.
            shares = list(shared_batches(group, world))
            for i, (batch, real) in enumerate(shares):
                with autocast_context(tc.precision, device):
                    loss_sum = micro_batch_loss_sum(net, batch, packing=cfg.data.packing, pad_id=pad_id,
                                                    backend=tc.kernel_backend, device=device)
                # Normalized by the whole step's target count (see module docstring)
                part = backward_share(loss_sum, real, n_targets, world, engine=engine, last=i == len(shares) - 1)
                meter.add_total("loss", part, batch.num_target_tokens if real else 0)
                step_loss += part
            grad_norm = clip_and_step(model, optimizer, scheduler, tc.grad_clip, engine=engine)
            (step_loss,) = all_reduce_sum([step_loss], world)

        clock.add(sum(b.num_tokens for b in group))
        loss_value = step_loss / max(1, n_targets)
        if step % tc.log_every == 0 or step == tc.max_steps:
            # train/loss: the window's token-weighted mean
            metrics = train_metrics(meter, world, scheduler=scheduler, grad_norm=grad_norm, epoch=epoch, clock=clock)
            log.log(step, metrics)
            progress.update(step, f"loss {metrics['train/loss']:.4f}  {metrics['throughput/tokens_per_s']:.0f} tok/s")
            meter = MetricWindow(("loss",))
            clock.new_window()
        if eval_due(tc, step) and held_out:
            log.log(step, {"eval/loss": eval_loss(net, held_out, cfg, pad_id, device, show)})
        stop_if_not_finite(loss_value, step, progress, hint=f"lower trainer.lr or check the data (metrics so far "
                                                            f"are in {out_dir / 'metrics.jsonl'})")
        if checkpoint_due(tc, step):
            save_training_checkpoint(out_dir, step, cfg, world, model=model, optimizer=optimizer, engine=engine,
                                     scheduler=scheduler, fingerprint=fingerprint, clock=clock,
                                     position=groups.position, summary=summary, counters={"loss": loss_value},
                                     window=meter.summed_state(world))
    progress.close()
    summary.update(clock.totals(loss=loss_value, steps=tc.max_steps))
    if held_out:
        summary["eval/loss"] = eval_loss(net, held_out, cfg, pad_id, device, show)
        log.log(step, {"eval/loss": summary["eval/loss"]})
    if cfg.eval.after:
        accuracy("after", step)

    save_final_model(model, tokenizer, out_dir, cfg, world, precision, engine=engine)
    return finish_run(run, log, summary)  # rank 0 reports for the job
