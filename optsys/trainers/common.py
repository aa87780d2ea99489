"""Pieces every trainer's step calls: optimizer, schedule, backward and step (FSDP2 or DeepSpeed), precision and
model setup, held-out accuracy, the resumable step stream, metric windows and the run clock. A run's life around
the loop (folder, resume, metrics log, checkpoints, summary) is optsys.trainers.run."""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Callable

import torch

from optsys.config import ConfigError, TrainConfig
from optsys.data.preference import PairBatch, PreferencePair, packed_pair_batches
from optsys.models.heads import output_head
from optsys.models.lora import is_peft, save_final
from optsys.models.packed import attach_forward_methods
from optsys.parallel.dist import (
    World,
    all_reduce_sum,
    barrier,
    full_state_dict,
    local_steps,
    rank0_mismatch,
    shard_model,
    weight_checksums,
)
from optsys.parallel.zero import (
    deepspeed_config,
    full_fp32_state_dict,
    write_deepspeed_config,
    zero_backward,
    zero_engine,
    zero_step,
)
from optsys.telemetry.nvtx import phase
from optsys.trainers.precision import (
    Precision,
    fsdp_param_dtype,
    mark_storage_dtype,
    resolve_precision,
    storage_state_dict,
    to_master,
)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and norm weights (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused or None)


def backward_share(loss_sum: torch.Tensor, real: bool, step_count: int, world: World, *, engine=None,
                   last: bool = True) -> float:
    """Backward of one micro-batch's summed loss as its part of the step's mean over `step_count` units (target
    tokens, pairs) of ALL ranks; returns the micro-batch's loss sum (0 for a zero-weight filler, which runs only
    to keep FSDP's collectives in step). FSDP (and DeepSpeed ZeRO) average gradients over ranks, so the world
    size turns that average back into the sum the mean needs. A DeepSpeed `engine` runs the backward, `last`
    marking the step's last micro-batch (its gradient accumulation boundary)."""
    weight = float(real)
    scaled = loss_sum * (weight * world.size / max(1, step_count))
    with phase("backward"):
        if engine is None:
            scaled.backward()
        else:
            zero_backward(engine, scaled, last)
    return weight * loss_sum.item()


def clip_and_step(model: torch.nn.Module, optimizer, scheduler, grad_clip: float, engine=None) -> float:
    """Clip the global grad norm (0 disables), step optimizer and schedule, clear grads; returns the
    pre-clip norm (NaN when clipping is off). Works on FSDP2's DTensor parameters too. A DeepSpeed `engine`
    does all of it (clipping at its gradient_clipping = trainer.grad_clip) and reports its norm."""
    if engine is not None:
        with phase("optimizer"):
            return zero_step(engine)
    with phase("optimizer"):
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0 else float("nan")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def warmup_cosine(warmup_steps: int, max_steps: int, min_ratio: float):
    """LR multiplier: linear warmup from ~0 to 1, then cosine down to min_ratio at max_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast when trainer.precision resolves to bf16 (see optsys.trainers.precision); fp32 otherwise."""
    if not resolve_precision(precision, "float32", device).mixed:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@dataclass
class HeldOut:
    """The questions a run's eval/accuracy_* is measured on, where they come from, and how answers match."""
    source: str
    questions: list  # optsys.eval.tasks.Question
    match: str


def held_out_questions(cfg: TrainConfig, world: World) -> HeldOut | None:
    """A built-in task's held-out problems (matched by the task's rule), or the data.eval_dataset rows that carry an
    `answer` (numeric match when every answer is a number). None, said once on rank 0, for a multi-turn task, a
    dataset run without data.eval_dataset, or eval rows without answers."""
    from optsys.data.tasks import get_task
    from optsys.eval.accuracy import dataset_questions
    from optsys.eval.tasks import Question

    d = cfg.data

    def say(text: str) -> None:
        if world.is_main:
            print(text)

    if d.task is not None:
        task = get_task(d.task)
        if getattr(task, "environment", None):  # multi-turn: scored by playing (the RL trainer does it)
            say(f"eval/accuracy: skipped, data.task={d.task} is a multi-turn task scored by playing it against its "
                "environment (the RL trainer reports eval/success_rate_*)")
            return None
        problems = task.problems("test", d.num_eval, difficulty=d.difficulty, seed=cfg.seed)
        questions = [Question(f"{task.name}-{i}", tuple(task.messages(p.prompt)), p.answer)
                     for i, p in enumerate(problems)]
        return HeldOut(f"task:{d.task}/test", questions, task.match)
    if d.eval_dataset is None:
        say("eval/accuracy: skipped, no data.eval_dataset: set it to held-out rows with 'prompt' and 'answer' fields "
            "to measure accuracy before and after training")
        return None
    from optsys.data.sources import load_rows

    rows = load_rows(d.eval_dataset, split=d.eval_split)
    questions, missing, match = dataset_questions(rows, d.eval_dataset)
    if not questions:
        say(f"eval/accuracy: skipped, no row of data.eval_dataset={d.eval_dataset} has an 'answer' field (the "
            "reference held-out accuracy compares with); add one to measure accuracy before and after training")
        return None
    if missing:
        say(f"eval/accuracy: {missing} of {len(rows)} rows of {d.eval_dataset} have no 'answer' field; accuracy is "
            f"measured on the other {len(questions)}")
    why = "every answer is a number" if match == "numeric" else "not every answer is a number"
    say(f"eval/accuracy: {len(questions)} questions from {d.eval_dataset}, match={match} ({why})")
    return HeldOut(d.eval_dataset, questions, match)


def held_out_accuracy(*, model, tokenizer, cfg: TrainConfig, world: World, log, summary: dict,
                      periodic: bool = False) -> Callable[[str, int], None]:
    """The trainers' accuracy(tag, step): greedy accuracy on the held-out questions (held_out_questions, loaded
    once here), as eval/accuracy_<tag> (summary and metrics.jsonl) and time/eval_<tag>_s; rank 0 prints one
    example. A no-op when there are no questions. Under torchrun every rank calls (each generates its share)."""
    from optsys.eval.accuracy import questions_accuracy

    held = held_out_questions(cfg, world) if cfg.eval.before or cfg.eval.after or periodic else None
    if held is not None:
        summary["eval/accuracy_questions"] = len(held.questions)
        summary["eval/match"] = held.match

    def accuracy(tag: str, step: int) -> None:
        """tag "before"/"after": eval/accuracy_<tag> in the summary too; "": eval/accuracy at this step (a curve
        point, trainer.eval_every), in metrics.jsonl only."""
        if held is None:
            return
        t0 = time.time()
        with phase("eval"), autocast_context(cfg.trainer.precision, world.device):  # in the training compute dtype
            acc, records = questions_accuracy(model, tokenizer, held.questions, match=held.match, name=held.source,
                                              max_new_tokens=cfg.eval.max_new_tokens,
                                              batch_size=cfg.eval.batch_size, world=world,
                                              show=cfg.trainer.progress and world.is_main)
        key = f"eval/accuracy_{tag}" if tag else "eval/accuracy"
        if tag:
            summary[key] = acc
            summary[f"time/eval_{tag}_s"] = time.time() - t0
        log.log(step, {key: acc})
        if world.is_main:
            print(f"{key} = {acc:.3f}" + (f" at step {step}" if not tag else "")
                  + f"  (e.g. {records[0]['prompt']} -> {records[0]['completion']!r})")

    return accuracy


SAME_INPUTS_HINT = ("Every rank loads the model and data itself, so under torchrun --nnodes every node must read "
                    "the same files: model folders and data.dataset on a shared filesystem, and one OPTSYS_CACHE_DIR "
                    "(tiny: models, stage: runs) that every node sees, with the same optsys version everywhere")


def ready_for_training(model, world: World, p: Precision, methods: dict | None = None, backend: str = "fsdp2"):
    """fp32 master weights, the fused-loss forward methods attached, and FSDP2 shards under torchrun
    (all-gathered in the compute dtype under mixed precision); backend="deepspeed" leaves the model whole:
    `deepspeed_engine` partitions it. Under torchrun the ranks first check that they loaded the same weights:
    each rank keeps its own shard of what that rank loaded, so a node that read other weights (a node-local
    cache, another folder) would otherwise train a silently mixed model."""
    mismatch = rank0_mismatch("the loaded weights", weight_checksums(model), world)
    if mismatch:
        raise ConfigError(f"{mismatch}. {SAME_INPUTS_HINT}.")
    model = attach_forward_methods(to_master(model, p), methods)
    return shard_model(model, world, fsdp_param_dtype(p)) if backend == "fsdp2" else model


def deepspeed_engine(cfg: TrainConfig, world: World, p: Precision, out_dir: Path, *, model, optimizer, scheduler):
    """parallel.backend=deepspeed: the ZeRO engine that owns `model`, `optimizer` and `scheduler` from here (see
    optsys.parallel.zero); its generated config goes to <out_dir>/deepspeed_config.json (rank 0 writes)."""
    config = deepspeed_config(zero_stage=cfg.parallel.zero_stage, batch_tokens=cfg.trainer.batch_tokens,
                              max_tokens=cfg.data.max_tokens, world_size=world.size, grad_clip=cfg.trainer.grad_clip,
                              bf16=p.mixed)
    if world.is_main:
        path = write_deepspeed_config(out_dir, config)
        print(f"parallel: DeepSpeed ZeRO-{cfg.parallel.zero_stage} over {world.size} rank(s), config in {path}")
    return zero_engine(model, optimizer, scheduler, config, world.device, head=output_head(model))


def save_final_model(model, tokenizer, out_dir: Path, cfg: TrainConfig, world: World, p: Precision,
                     engine=None) -> None:
    """<out_dir>/final/: a Hugging Face folder with the weights in model.dtype, gathered from the shards under
    torchrun (every rank calls; rank 0 writes); under DeepSpeed from the ZeRO optimizer's fp32 master weights.
    LoRA: peft's adapter folder, adapters as trained (fp32); in one process also final-merged/ with
    model.lora.save_merged."""
    with phase("checkpoint"):
        if engine is not None:
            save_gathered(model, tokenizer, out_dir / "final", world, p, state_dict=full_fp32_state_dict(engine, model))
            return
        if not world.distributed and is_peft(model):
            save_final(model, tokenizer, out_dir, cfg.model.lora, dtype=p.storage)
            return
        save_gathered(model, tokenizer, out_dir / "final", world, p, storage_dtype=not is_peft(model))


def save_gathered(model, tokenizer, path: Path, world: World, p: Precision, *, storage_dtype: bool = True,
                  state_dict: dict | None = None) -> None:
    """A Hugging Face folder from the model's full state dict (gathered from the shards under torchrun: every
    rank calls, rank 0 writes; or `state_dict`, already gathered), its floating-point weights cast to model.dtype
    unless `storage_dtype` is False (a peft adapter keeps the dtype it was trained in)."""
    if state_dict is None:
        state_dict = full_state_dict(model, world)  # a collective under torchrun
    if world.is_main:
        if storage_dtype:
            state_dict = storage_state_dict(state_dict, p)
        model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
        if storage_dtype:
            mark_storage_dtype(path, p)
        tokenizer.save_pretrained(path)
    barrier(world)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a pure function of (seed, epoch), so a resumed run replays it."""
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


class StepStream:
    """Endless stream of optimizer steps, each (epoch, list of micro-batches); resumable.

    `epoch_batches(epoch)` gives that epoch's micro-batches (packed rows with `.num_tokens`) and must be a
    pure function of the epoch. A step takes micro-batches while their tokens fit in batch_tokens (at
    least one per step); the epoch's tail makes a smaller step rather than being dropped.

    `position` is (epoch, index in that epoch's batches of the next step's first batch). A step always
    starts fresh, so a stream started at a saved position yields exactly the steps an uninterrupted one
    yields from there.
    """

    def __init__(self, epoch_batches: Callable[[int], list], batch_tokens: int, position: tuple[int, int] = (0, 0)):
        self.epoch_batches, self.batch_tokens = epoch_batches, batch_tokens
        self.position = (int(position[0]), int(position[1]))
        self._steps = self._generate()

    def _generate(self):
        first_epoch, i = self.position
        for epoch in count(first_epoch):
            batches = self.epoch_batches(epoch)
            i = i if epoch == first_epoch else 0
            while i < len(batches):
                group, tokens = [batches[i]], batches[i].num_tokens
                i += 1
                while i < len(batches) and tokens + batches[i].num_tokens <= self.batch_tokens:
                    group.append(batches[i])
                    tokens += batches[i].num_tokens
                    i += 1
                self.position = (epoch, i) if i < len(batches) else (epoch + 1, 0)
                yield epoch, group

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, list]:
        return next(self._steps)


def describe_batches(stream: StepStream, world: World, *, unit: str, count: Callable[[object], int],
                     batch_tokens: int, max_tokens: int) -> dict:
    """The effective batch of a run, measured over the first epoch's steps of a fresh `stream`: printed at
    start (rank 0) and written to summary.json as batch/*.

    trainer.batch_tokens is the GLOBAL step (all ranks together): every rank builds the same step of packed
    micro-batches (each <= data.max_tokens tokens) and runs its round-robin share of them, so per rank a step
    is about batch_tokens / world_size tokens. A rank short of micro-batches runs a zero-weight filler to keep
    FSDP's collectives in step; when most slots are fillers the ranks mostly wait, and this warns."""
    steps = []
    for epoch, group in stream:
        if epoch > 0:
            break
        steps.append(group)
    n = max(1, len(steps))
    micro = [len(g) for g in steps]
    per_rank = [local_steps(m, world) for m in micro]
    slots = sum(per_rank) * world.size
    tokens = sum(b.num_tokens for g in steps for b in g)
    out = {
        "batch/world_size": world.size,
        "batch/steps_per_epoch": len(steps),
        "batch/tokens_per_step": tokens / n,
        "batch/tokens_per_rank_per_step": tokens / n / world.size,
        f"batch/{unit}_per_step": sum(count(b) for g in steps for b in g) / n,
        "batch/micro_batches_per_step": sum(micro) / n,
        "batch/micro_batches_per_rank_per_step": sum(per_rank) / n,
        "batch/filler_fraction": (slots - sum(micro)) / max(1, slots),
    }
    if world.is_main:
        print(f"batch: trainer.batch_tokens={batch_tokens} tokens per optimizer step over all {world.size} rank(s); "
              f"measured over epoch 0: {out['batch/tokens_per_step']:.0f} tokens, "
              f"{out[f'batch/{unit}_per_step']:.1f} {unit}, {out['batch/micro_batches_per_step']:.1f} micro-batches "
              f"(packed rows of <= data.max_tokens={max_tokens}) per step; per rank "
              f"{out['batch/micro_batches_per_rank_per_step']:.1f} micro-batches, "
              f"{out['batch/tokens_per_rank_per_step']:.0f} tokens; {len(steps)} steps per epoch")
        if out["batch/filler_fraction"] > 0.5:
            print(f"warning: {100 * out['batch/filler_fraction']:.0f}% of the ranks' micro-batch slots are "
                  f"zero-weight fillers (a step has {out['batch/micro_batches_per_step']:.1f} micro-batches for "
                  f"{world.size} ranks): the ranks mostly wait. Raise trainer.batch_tokens to at least "
                  f"{world.size * max_tokens} (world size x data.max_tokens), or lower data.max_tokens.")
    return out


class MetricWindow:
    """Sums and counts of per-example metrics over a logging window; means on read.

    Under torchrun each rank adds its own examples; `all_reduce` sums the window over ranks (every rank
    must call it) before the means are logged. `state` / `from_state` carry a window through a checkpoint.
    """

    def __init__(self, keys: tuple[str, ...]):
        self.keys = keys
        self.sums = dict.fromkeys(keys, 0.0)
        self.counts = dict.fromkeys(keys, 0)

    def add(self, name: str, values) -> None:
        values = torch.as_tensor(values).detach().float().reshape(-1)
        self.sums[name] += float(values.sum())
        self.counts[name] += values.numel()

    def add_total(self, name: str, total: float, count: int) -> None:
        """A sum over `count` items at once (SFT: a micro-batch's summed token loss and its target tokens)."""
        self.sums[name] += float(total)
        self.counts[name] += int(count)

    def means(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}{k}": self.sums[k] / self.counts[k] for k in self.keys if self.counts[k]}

    def all_reduce(self, world: World) -> MetricWindow:
        if world.distributed:
            flat = all_reduce_sum([self.sums[k] for k in self.keys] + [float(self.counts[k]) for k in self.keys],
                                  world)
            n = len(self.keys)
            self.sums = dict(zip(self.keys, flat[:n]))
            self.counts = {k: int(round(c)) for k, c in zip(self.keys, flat[n:])}
        return self

    def state(self) -> dict:
        return {"sums": self.sums, "counts": self.counts}

    def summed_state(self, world: World) -> dict:
        """The window's state summed over ranks, for a checkpoint; this window is left as it is."""
        return MetricWindow.from_state(self.keys, self.state()).all_reduce(world).state()

    @classmethod
    def from_state(cls, keys: tuple[str, ...], state: dict | None) -> MetricWindow:
        window = cls(keys)
        if state:
            window.sums.update(state["sums"])
            window.counts.update(state["counts"])
        return window


class RunClock:
    """Tokens and wall-clock time of a training loop. Its state rides in every checkpoint, so a resumed run's
    totals and logged throughput continue where the killed run left them; checkpoint writes are not counted
    as training time."""

    def __init__(self, saved: dict | None = None):
        saved, now = saved or {}, time.time()
        self.total_tokens = int(saved.get("total_tokens", 0))
        self.window_tokens = int(saved.get("window_tokens", 0))
        self.checkpoint_s = float(saved.get("checkpoint_s", 0.0))
        self.t_train = now - float(saved.get("train_s", 0.0))
        self.window_t0 = now - float(saved.get("window_s", 0.0))

    def add(self, tokens: int) -> None:
        self.total_tokens += tokens
        self.window_tokens += tokens

    def window_tokens_per_s(self) -> float:
        return self.window_tokens / max(time.time() - self.window_t0, 1e-9)

    def new_window(self) -> None:
        self.window_tokens, self.window_t0 = 0, time.time()

    def train_s(self) -> float:
        return time.time() - self.t_train

    def state(self) -> dict:
        now = time.time()
        return {"total_tokens": self.total_tokens, "window_tokens": self.window_tokens,
                "window_s": now - self.window_t0, "train_s": now - self.t_train, "checkpoint_s": self.checkpoint_s}

    def pause(self, seconds: float) -> None:
        self.checkpoint_s += seconds
        self.window_t0 += seconds

    def totals(self, *, loss: float, steps: int) -> dict:
        """The run's end-of-training summary entries (the last step's loss, tokens, time, tokens/s)."""
        train_s = self.train_s()
        return {"train/loss": loss, "train/steps": steps, "train/tokens": self.total_tokens,
                "time/train_s": train_s, "time/checkpoint_s": self.checkpoint_s,
                "throughput/tokens_per_s": self.total_tokens / max(train_s, 1e-9)}


def pair_steps(pairs: list[PreferencePair], max_tokens: int, batch_tokens: int, seed: int,
               position: tuple[int, int] = (0, 0)) -> StepStream:
    """Endless (epoch, [PairBatch, ...]) optimizer steps; pairs reshuffled and repacked every epoch;
    resumable at a saved `position` (see StepStream)."""

    def epoch_batches(epoch: int) -> list[PairBatch]:
        return packed_pair_batches(pairs, max_tokens, shuffle_seed=seed + epoch,
                                   order=epoch_order(len(pairs), seed, epoch))

    return StepStream(epoch_batches, batch_tokens, position)
