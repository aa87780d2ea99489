"""Preference optimization on packed pairs (method dpo | ipo | robust | simpo | orpo | cpo | kto): the loop.

One micro-batch = a packed row of whole pairs (chosen_i, rejected_i adjacent); ONE forward gives
hidden states, `sequence_logprobs` gives every sequence's log-prob (summed or length-averaged, as the
loss's registry record asks), and `PREFERENCE_LOSSES[method]` gives the per-pair loss. An optimizer
step accumulates rows up to trainer.batch_tokens tokens; its loss is the mean over the step's pairs.
KTO rows hold (example_i, KL partner_i): the partner is the same prompt with another example's
completion, and its policy/reference log-ratio is the KL baseline z0 (estimated per micro-batch).

Reference log-probs (methods that need them): pref.reference=precompute scores the train and eval
pairs once with the initial model and caches them, fingerprinted, in <output_dir>/ref_logps.safetensors;
copy keeps a frozen in-memory copy; adapters_off runs the LoRA model with its adapters disabled.
"""

from __future__ import annotations

import copy
import json
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import torch

from optsys.checkpoint import _model_config_sha256
from optsys.config import ConfigError, TrainConfig
from optsys.data.preference import (
    PairBatch,
    PreferencePair,
    packed_pair_batches,
    pairs_sha256,
    tokenize_pairs,
    unpaired_rows,
)
from optsys.data.sources import load_rows
from optsys.data.tasks import get_task
from optsys.data.tokenize import DataReport
from optsys.eval.accuracy import task_accuracy
from optsys.losses import PREFERENCE_LOSSES, sequence_logprobs
from optsys.models.load import load_model_and_tokenizer
from optsys.models.lora import is_peft, save_final
from optsys.models.packed import lm_head_weight, packed_hidden
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

# Hyper-parameters each loss takes, by name, from cfg.pref.
HYPER = {
    "dpo": ("beta", "label_smoothing"),
    "robust": ("beta", "label_smoothing"),
    "ipo": ("beta",),
    "simpo": ("beta", "gamma", "label_smoothing"),
    "orpo": ("lam",),
    "cpo": ("beta", "alpha", "label_smoothing"),
    "kto": ("beta", "desirable_weight", "undesirable_weight"),
}
REF_CACHE = "ref_logps.safetensors"
METRIC_KEYS = ("loss", "rewards_chosen", "rewards_rejected", "reward_accuracy", "margin", "logps_chosen",
               "logps_rejected")


@dataclass
class PreferenceData:
    train: list[PreferencePair]
    eval: list[PreferencePair]
    train_report: DataReport


def build_preference_data(cfg: TrainConfig, tokenizer, *, kto: bool) -> PreferenceData:
    """Pairs from a built-in task (Task.preference_pairs, fixed train/test splits) or a dataset."""
    d = cfg.data
    if d.task is not None:
        task = get_task(d.task)
        train_rows = task.preference_pairs("train", d.num_train, difficulty=d.difficulty, seed=cfg.seed)
        eval_rows = task.preference_pairs("test", d.num_eval, difficulty=d.difficulty, seed=cfg.seed)
        if kto:
            train_rows, eval_rows = unpaired_rows(train_rows), unpaired_rows(eval_rows)
        train_name, eval_name = f"task:{d.task}/train", f"task:{d.task}/test"
    else:
        train_rows = load_rows(d.dataset, split=d.split)
        eval_rows = load_rows(d.eval_dataset, split=d.eval_split) if d.eval_dataset else []
        train_name, eval_name = d.dataset, d.eval_dataset or ""
    kw = dict(max_tokens=d.max_tokens, kto=kto, overlong=d.overlong, on_bad_pair=d.on_bad_pair)
    train, report = tokenize_pairs(train_rows, tokenizer, source=train_name, **kw)
    evals = tokenize_pairs(eval_rows, tokenizer, source=eval_name, **kw)[0] if eval_rows else []
    return PreferenceData(train, evals, report)


def pair_logps(model, batch: PairBatch, *, average: bool, backend: str, device) -> tuple[torch.Tensor, ...]:
    """One packed forward -> (chosen logps [P], rejected logps [P], chosen token counts [P])."""
    b = batch.packed
    hidden = packed_hidden(model, b.input_ids.to(device), b.position_ids.to(device), b.seq_lens)
    logps, counts = sequence_logprobs(hidden, lm_head_weight(model), b.targets.to(device),
                                      cu_seqlens=b.cu_seqlens().to(device), average=average, backend=backend)
    return logps[0::2], logps[1::2], counts[0::2]


# ---------------------------------------------------------------------------- reference log-probs


def reference_fingerprint(cfg: TrainConfig, model, tokenizer, data: PreferenceData, average: bool) -> dict:
    """What the cached reference log-probs depend on; a cache whose fingerprint differs is refused."""
    return {
        "model.name_or_path": cfg.model.name_or_path,
        "model.config_sha256": _model_config_sha256(model),
        "tokenizer.vocab_size": len(tokenizer),
        "data.train_sha256": pairs_sha256(data.train),
        "data.eval_sha256": pairs_sha256(data.eval),
        "average_logps": average,
    }


@torch.no_grad()
def score_pairs(model, pairs: list[PreferencePair], *, max_tokens: int, average: bool, backend: str, device,
                precision: str = "fp32") -> torch.Tensor:
    """[N, 2] (chosen, rejected) log-probs of every pair, in dataset order (eval mode, no grad)."""
    out = torch.zeros(len(pairs), 2)
    was_training = model.training
    model.eval()
    for batch in packed_pair_batches(pairs, max_tokens, shuffle_seed=None):
        with autocast_context(precision, device):
            c, r, _ = pair_logps(model, batch, average=average, backend=backend, device=device)
        idx = torch.tensor(batch.pair_index)
        out[idx, 0], out[idx, 1] = c.float().cpu(), r.float().cpu()
    model.train(was_training)
    return out


def save_reference_cache(path: Path, logps: dict[str, torch.Tensor], fingerprint: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in logps.items()}, str(tmp),
              metadata={"fingerprint": json.dumps(fingerprint, sort_keys=True)})
    tmp.replace(path)


def load_reference_cache(path: Path, fingerprint: dict) -> dict[str, torch.Tensor] | None:
    """The cached log-probs, None if there is no cache; a ConfigError naming the field if it does not match."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        saved = json.loads((f.metadata() or {}).get("fingerprint", "{}"))
    diff = [f"{k}: cached {saved.get(k, '<missing>')!r}, now {v!r}" for k, v in fingerprint.items()
            if saved.get(k) != v]
    if diff:
        raise ConfigError(
            f"the reference log-prob cache {path} was computed for a different run:\n  " + "\n  ".join(diff)
            + f"\nDelete {path} (it is recomputed), or use a new output_dir.")
    return load_file(str(path))


# ---------------------------------------------------------------------------- steps and metrics


def pair_steps(pairs: list[PreferencePair], max_tokens: int, batch_tokens: int, seed: int):
    """Endless (epoch, [PairBatch, ...]) optimizer steps; pairs reshuffled and repacked every epoch."""
    for epoch in count():
        order = list(range(len(pairs)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        batches = packed_pair_batches(pairs, max_tokens, shuffle_seed=seed + epoch, order=order)
        i = 0
        while i < len(batches):
            group, tokens = [batches[i]], batches[i].num_tokens
            i += 1
            while i < len(batches) and tokens + batches[i].num_tokens <= batch_tokens:
                group.append(batches[i])
                tokens += batches[i].num_tokens
                i += 1
            yield epoch, group


class Meter:
    """Sums of per-pair metrics over a window; means on read."""

    def __init__(self):
        self.sums = dict.fromkeys(METRIC_KEYS, 0.0)
        self.counts = dict.fromkeys(METRIC_KEYS, 0)

    def add(self, name: str, values: torch.Tensor) -> None:
        values = values.detach().float().reshape(-1)
        self.sums[name] += float(values.sum())
        self.counts[name] += values.numel()

    def means(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}{k}": self.sums[k] / self.counts[k] for k in METRIC_KEYS if self.counts[k]}


def batch_loss(model, batch: PairBatch, ref: torch.Tensor | None, *, method: str, cfg: TrainConfig,
               device, meter: Meter) -> torch.Tensor:
    """Sum over the row's pairs of the per-pair loss; metrics go to `meter`. ref: [P, 2] or None."""
    spec = PREFERENCE_LOSSES[method]
    hyper = {k: getattr(cfg.pref, k) for k in HYPER[method]}
    with autocast_context(cfg.trainer.precision, device):
        chosen, rejected, chosen_counts = pair_logps(model, batch, average=spec.average_logps,
                                                     backend=cfg.trainer.kernel_backend, device=device)
    chosen, rejected = chosen.float(), rejected.float()
    if method == "kto":
        ref_c, ref_r = ref[:, 0].to(device), ref[:, 1].to(device)
        labels = torch.tensor(batch.labels, dtype=torch.bool, device=device)
        loss, m = spec(chosen, ref_c, rejected, ref_r, labels, **hyper)
        r = m["rewards"]
        meter.add("rewards_chosen", m["rewards_chosen"])
        meter.add("rewards_rejected", m["rewards_rejected"])
        # KTO has no pairs: accuracy = the reward's sign agrees with the label.
        meter.add("reward_accuracy", ((r > 0) == labels).float())
        if labels.any() and (~labels).any():  # unpaired: margin of the desirable and undesirable means
            meter.add("margin", (r[labels].mean() - r[~labels].mean()).reshape(1))
        meter.add("logps_chosen", chosen[labels])
        meter.add("logps_rejected", chosen[~labels])
    else:
        ref_c, ref_r = (ref[:, 0].to(device), ref[:, 1].to(device)) if spec.needs_reference else (None, None)
        if method == "cpo":
            hyper["chosen_num_tokens"] = chosen_counts
        loss, m = spec(chosen, rejected, ref_c, ref_r, **hyper)
        for k in ("rewards_chosen", "rewards_rejected", "reward_accuracy", "margin"):
            meter.add(k, m[k])
        meter.add("logps_chosen", chosen)
        meter.add("logps_rejected", rejected)
    meter.add("loss", loss)
    return loss.sum()


class Reference:
    """Per-row reference log-probs [P, 2] from the precomputed cache, a frozen copy, or adapters off."""

    def __init__(self, mode: str, *, cached: dict | None = None, frozen=None, model=None, average: bool,
                 backend: str, device, precision: str):
        self.mode, self.cached, self.frozen, self.model = mode, cached, frozen, model
        self.average, self.backend, self.device, self.precision = average, backend, device, precision

    @torch.no_grad()
    def __call__(self, batch: PairBatch, split: str) -> torch.Tensor:
        if self.mode == "precompute":
            return self.cached[split][torch.tensor(batch.pair_index)]
        model = self.frozen if self.mode == "copy" else self.model
        ctx = self.model.disable_adapter() if self.mode == "adapters_off" else nullcontext()
        was_training = model.training
        model.eval()  # no dropout in the reference
        with ctx, autocast_context(self.precision, self.device):
            c, r, _ = pair_logps(model, batch, average=self.average, backend=self.backend, device=self.device)
        model.train(was_training)
        return torch.stack([c.float(), r.float()], 1)


@torch.no_grad()
def evaluate(model, pairs: list[PreferencePair], reference: Reference | None, *, method: str, cfg: TrainConfig,
             device) -> dict[str, float]:
    """eval/<metric> means over held-out pairs (eval mode)."""
    meter = Meter()
    was_training = model.training
    model.eval()
    for batch in packed_pair_batches(pairs, cfg.data.max_tokens, shuffle_seed=None):
        ref = reference(batch, "eval") if reference is not None else None
        batch_loss(model, batch, ref, method=method, cfg=cfg, device=device, meter=meter)
    model.train(was_training)
    return meter.means("eval/")


def train(cfg: TrainConfig) -> dict:
    t_start = time.time()
    method, tc = cfg.method, cfg.trainer
    if method not in PREFERENCE_LOSSES:
        raise ConfigError(f"method={method!r} is not a preference method; choose one of {sorted(PREFERENCE_LOSSES)}")
    if cfg.resume:
        raise ConfigError("resume=true is not supported by preference training yet; start a new run")
    spec = PREFERENCE_LOSSES[method]
    device = pick_device(cfg.device)
    set_seed(cfg.seed)
    out_dir = prepare_output_dir(cfg)

    model, tokenizer = load_model_and_tokenizer(cfg.model, device, seed=cfg.seed)
    data = build_preference_data(cfg, tokenizer, kto=not spec.paired)
    task = get_task(cfg.data.task) if cfg.data.task else None
    eval_problems = (task.problems("test", cfg.data.num_eval, difficulty=cfg.data.difficulty, seed=cfg.seed)
                     if task else [])
    summary: dict = {**data.train_report.metrics("data/"), "data/pairs": len(data.train),
                     "data/eval_pairs": len(data.eval), "model/parameters": sum(p.numel() for p in model.parameters())}
    log = MetricsLog(out_dir)

    reference = None
    if spec.needs_reference:
        mode = cfg.pref.reference
        if mode == "adapters_off" and not is_peft(model):
            raise ConfigError("pref.reference=adapters_off needs LoRA (model.lora.r > 0)")
        common = dict(average=spec.average_logps, backend=tc.kernel_backend, device=device, precision=tc.precision)
        if mode == "precompute":
            t0 = time.time()
            path = out_dir / REF_CACHE
            fingerprint = reference_fingerprint(cfg, model, tokenizer, data, spec.average_logps)
            cached = load_reference_cache(path, fingerprint)
            if cached is None:
                cached = {split: score_pairs(model, pairs, max_tokens=cfg.data.max_tokens, **common)
                          for split, pairs in (("train", data.train), ("eval", data.eval))}
                save_reference_cache(path, cached, fingerprint)
            summary["time/reference_s"] = time.time() - t0
            reference = Reference(mode, cached=cached, **common)
        elif mode == "copy":
            frozen = copy.deepcopy(model).eval().requires_grad_(False)
            reference = Reference(mode, frozen=frozen, **common)
        else:
            reference = Reference(mode, model=model, **common)

    def accuracy(tag: str) -> None:
        acc, records = task_accuracy(model, tokenizer, task, eval_problems,
                                     max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
        summary[f"eval/accuracy_{tag}"] = acc
        log.log(step, {f"eval/accuracy_{tag}": acc})
        print(f"eval/accuracy_{tag} = {acc:.3f}  (e.g. {records[0]['prompt']} -> {records[0]['completion']!r})")

    step = 0
    if task and cfg.eval.before:
        accuracy("before")
    if data.eval and cfg.eval.before:
        before = evaluate(model, data.eval, reference, method=method, cfg=cfg, device=device)
        summary.update({f"{k}_before": v for k, v in before.items()})
        log.log(step, {f"{k}_before": v for k, v in before.items()})

    model.train()
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, tc.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(tc.warmup_steps, tc.max_steps,
                                                                           tc.min_lr_ratio))
    steps = pair_steps(data.train, cfg.data.max_tokens, tc.batch_tokens, cfg.seed)
    progress = StepProgress(tc.max_steps, f"{method} {cfg.recipe}", enabled=tc.progress)
    meter, window_tokens, total_tokens, window_t0, t_train = Meter(), 0, 0, time.time(), time.time()
    loss_value = float("nan")
    for step in range(1, tc.max_steps + 1):
        epoch, group = next(steps)
        n_pairs = sum(b.num_pairs for b in group)
        step_loss = 0.0
        for batch in group:
            ref = reference(batch, "train") if reference is not None else None
            loss_sum = batch_loss(model, batch, ref, method=method, cfg=cfg, device=device, meter=meter)
            (loss_sum / n_pairs).backward()  # the step's loss is the mean over its pairs
            step_loss += loss_sum.item()
        grad_norm = clip_and_step(model, optimizer, scheduler, tc.grad_clip)
        loss_value = step_loss / n_pairs
        step_tokens = sum(b.num_tokens for b in group)
        total_tokens += step_tokens
        window_tokens += step_tokens
        if step % tc.log_every == 0 or step == tc.max_steps:
            metrics = {**meter.means("train/"), "train/lr": scheduler.get_last_lr()[0],
                       "train/grad_norm": grad_norm, "train/epoch": epoch, "train/tokens": total_tokens,
                       "throughput/tokens_per_s": window_tokens / max(time.time() - window_t0, 1e-9)}
            if tc.eval_every and step % tc.eval_every == 0 and data.eval:
                metrics.update(evaluate(model, data.eval, reference, method=method, cfg=cfg, device=device))
            log.log(step, metrics)
            progress.update(step, f"loss {metrics['train/loss']:.4f}  acc {metrics['train/reward_accuracy']:.2f}")
            meter, window_tokens, window_t0 = Meter(), 0, time.time()
        if not torch.isfinite(torch.tensor(loss_value)):
            progress.close()
            raise FloatingPointError(f"train/loss became {loss_value} at step {step}; lower trainer.lr or "
                                     f"pref.beta (metrics so far are in {out_dir / 'metrics.jsonl'})")
    progress.close()
    train_s = time.time() - t_train

    summary.update({"train/loss": loss_value, "train/steps": tc.max_steps, "train/tokens": total_tokens,
                    "time/train_s": train_s, "throughput/tokens_per_s": total_tokens / max(train_s, 1e-9)})
    if data.eval:
        final_eval = evaluate(model, data.eval, reference, method=method, cfg=cfg, device=device)
        summary.update(final_eval)
        log.log(step, final_eval)
    if task and cfg.eval.after:
        accuracy("after")
    save_final(model, tokenizer, out_dir, cfg.model.lora)
    close_run(log, summary, device=device, t_start=t_start, out_dir=out_dir)
    return summary
