"""Preference optimization on packed pairs (method dpo | ipo | robust | simpo | orpo | cpo | kto): the loop.

One micro-batch = a packed row of whole pairs (chosen_i, rejected_i adjacent); ONE forward gives
hidden states, `sequence_logprobs` gives every sequence's log-prob (summed or length-averaged, as the
loss's registry record asks), and `PREFERENCE_LOSSES[method]` gives the per-pair loss. An optimizer
step accumulates rows up to trainer.batch_tokens tokens; its loss is the mean over the step's pairs.
KTO rows hold (example_i, KL partner_i): the partner is the same prompt with the completion of an example
of another prompt, and the partners' policy/reference log-ratio is the KL baseline z0, estimated over the
whole optimizer step and all ranks by a no-grad pass over the step's partners before its micro-batches
(`kto_z0`); the micro-batches then run forward and backward on the examples only.
pref.rpo_alpha (RPO) adds rpo_alpha x the step's mean NLL per chosen token, from the same fused forward: the
chosen summed log-probs are the negated NLL sums (`chosen_nll`).

Pairs: the data's own (pref.pairs=task), or with pref.pairs=on_policy the start model's own samples of each training
prompt, a correct one against an incorrect one (optsys.trainers.pairs), sampled before any update and kept in
<output_dir>/pairs.jsonl.

Reference log-probs (methods that need them): pref.reference=precompute scores the train and eval
pairs once with the initial model and caches them, fingerprinted, in <output_dir>/ref_logps.safetensors;
copy keeps a frozen in-memory copy; adapters_off runs the LoRA model with its adapters disabled.

Like SFT: FSDP2 under torchrun (every rank builds the same step and runs its round-robin share of the
rows; the reference cache is scored the same way), checkpoints every trainer.save_every steps, and
resume=true continues bit for bit (weights, optimizer, schedule, RNG, data position, metric window).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from optsys.checkpoint import model_config_sha256, run_fingerprint, weights_stamp
from optsys.config import ConfigError, TrainConfig
from optsys.data.packing import PackedBatch
from optsys.data.preference import (
    PairBatch,
    PreferenceData,
    PreferencePair,
    build_preference_data,
    packed_pair_batches,
    pairs_sha256,
)
from optsys.losses import PREFERENCE_LOSSES, chosen_nll
from optsys.methods import METHODS, methods_of
from optsys.models.gguf import is_gguf_source
from optsys.models.load import load_model_and_tokenizer
from optsys.models.lora import is_peft
from optsys.models.packed import attach_forward_methods, packed_sequence_logps
from optsys.models.sources import local_source
from optsys.parallel.dist import (
    World,
    all_reduce_sum,
    all_reduce_sum_tensor,
    barrier,
    broadcast_object,
    shard_model,
    shared_batches,
    torchrun_world,
)
from optsys.stages import is_stage
from optsys.telemetry.nvtx import phase, step_phase, telemetry
from optsys.telemetry.progress import StepProgress, progress_items
from optsys.trainers.common import (
    MetricWindow,
    autocast_context,
    backward_share,
    build_optimizer,
    clip_and_step,
    describe_batches,
    held_out_accuracy,
    pair_steps,
    ready_for_training,
    save_final_model,
    warmup_cosine,
)
from optsys.trainers.pairs import PAIRS_FILE, on_policy_pairs, pair_engine_name, pair_questions
from optsys.trainers.precision import Precision, frozen_for_compute, fsdp_param_dtype, to_master
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

REF_CACHE = "ref_logps.safetensors"
METRIC_KEYS = ("loss", "rewards_chosen", "rewards_rejected", "reward_accuracy", "margin", "logps_chosen",
               "logps_rejected", "kl", "nll_chosen")  # kl: KTO's z0 only; nll_chosen: with pref.rpo_alpha only


def row_logps(model, b: PackedBatch, *, average: bool, backend: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One packed forward -> (per-sequence logps [S], target counts [S]).

    Goes through `model.packed_sequence_logps` when attached (what FSDP2 registers as a forward)."""
    fn = getattr(model, "packed_sequence_logps", None) or (lambda *a, **k: packed_sequence_logps(model, *a, **k))
    with phase("data"):
        ids, pos, targets, cu = (t.to(device) for t in (b.input_ids, b.position_ids, b.targets, b.cu_seqlens()))
    return fn(ids, pos, b.seq_lens, targets, cu, average=average, backend=backend)


def pair_logps(model, batch: PairBatch, *, average: bool, backend: str, device,
               separate: bool = False) -> tuple[torch.Tensor, ...]:
    """One packed forward (two with `separate`) -> (chosen logps [P], rejected logps [P], chosen token counts [P]).

    separate: two forwards, of the chosen and of the rejected sequences each packed apart (`PairBatch.half`),
    the rows KTO's trainer runs, so KTO's reference log-probs equal the policy's bit for bit at the start."""
    if separate:
        chosen, counts = row_logps(model, batch.half(0), average=average, backend=backend, device=device)
        rejected, _ = row_logps(model, batch.half(1), average=average, backend=backend, device=device)
        return chosen, rejected, counts
    logps, counts = row_logps(model, batch.packed, average=average, backend=backend, device=device)
    return logps[0::2], logps[1::2], counts[0::2]


# ---------------------------------------------------------------------------- reference log-probs


def reference_fingerprint(cfg: TrainConfig, model, tokenizer, data: PreferenceData, average: bool,
                          resolve=local_source) -> dict:
    """What the cached reference log-probs depend on; a cache whose fingerprint differs is refused.

    Local checkpoints are identified by path plus their weight files' names, sizes and mtimes
    (`weights_stamp`; a `stage:` source through `resolve`): one retrained into the same folder is seen. Hub ids
    are named by id and revision, `tiny:` presets by name (they are rebuilt deterministically)."""

    def stamp(source: str | None) -> str | None:
        if is_stage(source) or (source is not None and is_gguf_source(source)):
            # the folder (a gguf: one is named by the file's sha256), stored as the policy is
            source = resolve(source, cfg.seed, dtype=cfg.model.dtype)
        return weights_stamp(source)

    return {
        "model.name_or_path": cfg.model.name_or_path,
        "model.revision": cfg.model.revision,
        "model.weights_stamp": stamp(cfg.model.name_or_path),
        "model.config_sha256": model_config_sha256(model),
        "pref.reference_model": cfg.pref.reference_model,
        "pref.reference_model.weights_stamp": stamp(cfg.pref.reference_model),
        "tokenizer.vocab_size": len(tokenizer),
        "data.train_sha256": pairs_sha256(data.train),
        "data.eval_sha256": pairs_sha256(data.eval),
        "average_logps": average,
    }


@torch.no_grad()
def score_pairs(model, pairs: list[PreferencePair], *, max_tokens: int, average: bool, backend: str, device,
                precision: str = "fp32", world: World | None = None, separate: bool = False,
                show: str | None = None) -> torch.Tensor:
    """[N, 2] (chosen, rejected) log-probs of every pair, in dataset order (eval mode, no grad).

    Under torchrun each rank scores its share of the rows and the results are summed over ranks. `show`: the
    label of a progress bar over the packed rows."""
    world = world or World(0, 1, 0, device)
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    was_training = model.training
    model.eval()
    rows = shared_batches(packed_pair_batches(pairs, max_tokens, shuffle_seed=None), world)
    for batch, real in progress_items(rows, show or "", enabled=show is not None):
        with autocast_context(precision, device):
            c, r, _ = pair_logps(model, batch, average=average, backend=backend, device=device, separate=separate)
        if real:
            idx = torch.tensor(batch.pair_index)
            out[idx, 0], out[idx, 1] = c.double().cpu(), r.double().cpu()
    model.train(was_training)
    return all_reduce_sum_tensor(out, world).float()


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


@torch.no_grad()
def kto_z0(model, rows: list[tuple[PairBatch, bool]], refs: list[torch.Tensor], *, cfg: TrainConfig, device,
           world: World) -> float:
    """KTO's KL estimate for one optimizer step (or an eval split): the mean of log pi - log ref over ALL its
    KL partners on all ranks, before the clamp at 0 (kto applies it). `rows` is this rank's
    shared_batches share, `refs` their reference log-probs [P, 2] (column 1: the partners').

    z0 carries no gradient, so this pass runs without one, on the partner sequences only (fillers too, to keep
    FSDP's collectives in step), and the micro-batches then run forward and backward on the examples only:
    per step one extra no-grad forward of the partners' tokens, and no backward through them."""
    total, count = 0.0, 0
    for (batch, real), ref in zip(rows, refs):
        with autocast_context(cfg.trainer.precision, device):
            logps, _ = row_logps(model, batch.half(1), average=False, backend=cfg.trainer.kernel_backend,
                                 device=device)
        if real:
            total += float((logps.double() - ref[:, 1].to(device).double()).sum())
            count += len(logps)
    total, count = all_reduce_sum([total, float(count)], world)  # one collective for both
    return total / count


def batch_loss(model, batch: PairBatch, ref: torch.Tensor | None, *, method: str, cfg: TrainConfig,
               device, meter: MetricWindow | None, z0: float | None = None,
               step: tuple[int, int] | None = None) -> torch.Tensor:
    """Sum over the row's pairs of the per-pair loss; metrics go to `meter` (None: not counted, a
    filler row). ref: [P, 2] or None. KTO: z0 from `kto_z0`; only the row's examples are run.

    pref.rpo_alpha: `step` = (pairs, chosen target tokens) of the whole optimizer step (or eval split) on all
    ranks. The row adds its share of rpo_alpha x the step's mean NLL per chosen token, scaled by the step's
    pairs, so that the trainer's mean over the step's pairs gives preference mean + rpo_alpha x NLL."""
    spec = PREFERENCE_LOSSES[method]
    hyper = {k: getattr(cfg.pref, k) for k in METHODS[method].hyper}
    meter = meter if meter is not None else MetricWindow(METRIC_KEYS)  # a filler's metrics are dropped
    if method == "kto":
        with autocast_context(cfg.trainer.precision, device):
            chosen, _ = row_logps(model, batch.half(0), average=spec.average_logps,
                                  backend=cfg.trainer.kernel_backend, device=device)
        chosen = chosen.float()
        labels = torch.tensor(batch.labels, dtype=torch.bool, device=device)
        with phase(f"loss.{method}"):
            loss, m = spec(chosen, ref[:, 0].to(device), None, None, labels, z0=z0, **hyper)
        r = m["rewards"]
        meter.add("kl", m["kl"].expand(len(chosen)))  # a per-example mean, like the other metrics
        meter.add("rewards_chosen", m["rewards_chosen"])
        meter.add("rewards_rejected", m["rewards_rejected"])
        if labels.any() and (~labels).any():
            # KTO has no pairs: accuracy = how often a desirable row's reward beats an undesirable one's, over
            # all such couples of the micro-batch (the ranking AUC of the implicit reward; ties count as wrong,
            # as in DPO's accuracy); margin = the desirable mean minus the undesirable mean.
            meter.add("reward_accuracy", (r[labels][:, None] > r[~labels][None, :]).float())
            meter.add("margin", (r[labels].mean() - r[~labels].mean()).reshape(1))
        meter.add("logps_chosen", chosen[labels])
        meter.add("logps_rejected", chosen[~labels])
    else:
        with autocast_context(cfg.trainer.precision, device):
            chosen, rejected, chosen_counts = pair_logps(model, batch, average=spec.average_logps,
                                                         backend=cfg.trainer.kernel_backend, device=device)
        chosen, rejected = chosen.float(), rejected.float()
        ref_c, ref_r = (ref[:, 0].to(device), ref[:, 1].to(device)) if spec.needs_reference else (None, None)
        if method == "cpo":
            hyper["chosen_num_tokens"] = chosen_counts
        with phase(f"loss.{method}"):
            loss, m = spec(chosen, rejected, ref_c, ref_r, **hyper)
        for k in ("rewards_chosen", "rewards_rejected", "reward_accuracy", "margin"):
            meter.add(k, m[k])
        meter.add("logps_chosen", chosen)
        meter.add("logps_rejected", rejected)
        if cfg.pref.rpo_alpha is not None:
            # summed chosen log-probs (a length-averaged loss's means times their token counts)
            sums = chosen * chosen_counts.to(chosen.dtype) if spec.average_logps else chosen
            step_pairs, step_tokens = step
            with phase("loss.rpo"):
                total = loss.sum() + cfg.pref.rpo_alpha * step_pairs * chosen_nll(sums, step_tokens)
            meter.add_total("nll_chosen", float(-sums.detach().sum()), int(chosen_counts.sum()))
            meter.add_total("loss", float(total.detach()), len(loss))
            return total
    meter.add("loss", loss)
    return loss.sum()


def step_counts(batches: list[PairBatch], chosen_tokens: bool = True) -> tuple[int, int]:
    """(pairs, chosen target tokens) of a whole step or split: the sizes of pref.rpo_alpha's token mean. Without
    `chosen_tokens` (rpo_alpha off) the tokens are not counted (0): a pass over every row's targets each step."""
    tokens = sum(b.chosen_target_tokens for b in batches) if chosen_tokens else 0
    return sum(b.num_pairs for b in batches), tokens


class Reference:
    """Per-row reference log-probs [P, 2] from the precomputed cache, a frozen copy, or adapters off."""

    def __init__(self, mode: str, *, cached: dict | None = None, frozen=None, model=None, average: bool,
                 backend: str, device, precision: str, separate: bool = False):
        self.mode, self.cached, self.frozen, self.model = mode, cached, frozen, model
        self.average, self.backend, self.device, self.precision = average, backend, device, precision
        self.separate = separate  # KTO: examples and partners scored in rows of their own, as the policy is

    @torch.no_grad()
    def __call__(self, batch: PairBatch, split: str) -> torch.Tensor:
        if self.mode == "precompute":
            return self.cached[split][torch.tensor(batch.pair_index)]
        model = self.frozen if self.mode == "copy" else self.model
        ctx = self.model.disable_adapter() if self.mode == "adapters_off" else nullcontext()
        was_training = model.training
        model.eval()  # no dropout in the reference
        with ctx, autocast_context(self.precision, self.device):
            c, r, _ = pair_logps(model, batch, average=self.average, backend=self.backend, device=self.device,
                                 separate=self.separate)
        model.train(was_training)
        return torch.stack([c.float(), r.float()], 1)


@torch.no_grad()
def evaluate(model, pairs: list[PreferencePair], reference: Reference | None, *, method: str, cfg: TrainConfig,
             device, world: World | None = None) -> dict[str, float]:
    """eval/<metric> means over held-out pairs (eval mode; under torchrun each rank takes a share)."""
    world = world or World(0, 1, 0, device)
    meter = MetricWindow(METRIC_KEYS)
    was_training = model.training
    model.eval()
    batches = packed_pair_batches(pairs, cfg.data.max_tokens, shuffle_seed=None)
    split = step_counts(batches, cfg.pref.rpo_alpha is not None)  # all ranks': rpo_alpha's NLL is the split's mean
    rows = list(shared_batches(batches, world))
    refs = [reference(batch, "eval") if reference is not None else None for batch, _ in rows]
    z0 = kto_z0(model, rows, refs, cfg=cfg, device=device, world=world) if method == "kto" else None  # the split's
    show = cfg.trainer.progress and world.is_main
    for (batch, real), ref in progress_items(list(zip(rows, refs)), f"eval ({len(pairs)} pairs)", enabled=show):
        batch_loss(model, batch, ref, method=method, cfg=cfg, device=device, meter=meter if real else None, z0=z0,
                   step=split)
    model.train(was_training)
    return meter.all_reduce(world).means("eval/")


def load_reference_model(cfg: TrainConfig, policy, tokenizer, device, precision: Precision, resolve=local_source):
    """pref.reference_model, loaded frozen; a ConfigError if its tokenizer or architecture is not the policy's
    (log-probs under another vocabulary are not comparable token for token)."""
    path = cfg.pref.reference_model
    ref_cfg = dataclasses.replace(cfg.model, name_or_path=path, gradient_checkpointing=False,
                                  lora=dataclasses.replace(cfg.model.lora, r=0, quantize="none"))
    ref, ref_tokenizer = load_model_and_tokenizer(ref_cfg, device, seed=cfg.seed, resolve=resolve)
    problems = []
    vocab, ref_vocab = tokenizer.get_vocab(), ref_tokenizer.get_vocab()
    if vocab != ref_vocab:
        differing = sorted(set(vocab.items()) ^ set(ref_vocab.items()))[:3]
        problems.append(f"tokenizer: the policy's has {len(vocab)} tokens, the reference's {len(ref_vocab)}"
                        f" (e.g. differing entries {differing})")
    rows, ref_rows = lm_head_rows(policy), lm_head_rows(ref)
    if rows != ref_rows:
        problems.append(f"vocab (lm_head rows): policy {rows}, reference {ref_rows}")
    kind, ref_kind = policy.config.model_type, ref.config.model_type
    if kind != ref_kind:
        problems.append(f"architecture: policy {kind!r}, reference {ref_kind!r}")
    if problems:
        raise ConfigError(f"pref.reference_model={path} does not match the policy {cfg.model.name_or_path}:\n  "
                          + "\n  ".join(problems) + "\nUse a reference of the policy's family and tokenizer (e.g. "
                          "the SFT checkpoint the policy starts from), or drop pref.reference_model to use the "
                          "policy's initial weights.")
    return attach_forward_methods(frozen_for_compute(ref.eval().requires_grad_(False), precision))


def lm_head_rows(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def build_reference(mode: str, cfg: TrainConfig, model, tokenizer, data: PreferenceData, out_dir: Path,
                    world: World, *, average: bool, summary: dict, precision: Precision,
                    resolve=local_source) -> Reference:
    """The reference log-prob source for `mode`: pref.reference_model if set, else the policy as loaded
    (built before any resume, and for `copy` before the policy is sharded).

    precompute: read the fingerprinted cache in out_dir, or score every pair once and write it (rank 0)."""
    tc = cfg.trainer
    common = dict(average=average, backend=tc.kernel_backend, device=world.device, precision=tc.precision,
                  separate=not PREFERENCE_LOSSES[cfg.method].paired)
    if mode == "adapters_off" and not is_peft(model):
        raise ConfigError("pref.reference=adapters_off needs LoRA (model.lora.r > 0)")

    def shard_frozen(ref):
        return shard_model(ref, world, fsdp_param_dtype(precision))

    def separate_reference():
        return shard_frozen(load_reference_model(cfg, model, tokenizer, world.device, precision, resolve))

    if mode == "copy":  # the policy's master weights, frozen in the dtype they were loaded in
        frozen = (separate_reference() if cfg.pref.reference_model else
                  shard_frozen(frozen_for_compute(copy.deepcopy(model).eval().requires_grad_(False), precision)))
        return Reference(mode, frozen=frozen, **common)
    if mode == "adapters_off":
        return Reference(mode, model=model, **common)
    t0 = time.time()
    path = out_dir / REF_CACHE
    fingerprint = reference_fingerprint(cfg, model, tokenizer, data, average, resolve)
    found = None
    if world.is_main:  # a mismatched cache is an error on rank 0; the others learn whether one exists
        found = load_reference_cache(path, fingerprint) is not None
    if broadcast_object(found, world):
        cached = load_reference_cache(path, fingerprint)
    else:
        scorer = separate_reference() if cfg.pref.reference_model else model
        with phase("reference"):
            show = cfg.trainer.progress and world.is_main
            cached = {split: score_pairs(scorer, pairs, max_tokens=cfg.data.max_tokens, world=world, **common,
                                         show=f"reference log-probs, {split} ({len(pairs)} pairs)" if show else None)
                      for split, pairs in (("train", data.train), ("eval", data.eval))}
        del scorer  # a separate reference leaves memory before training starts
        if world.is_main:
            save_reference_cache(path, cached, fingerprint)
        barrier(world)
    summary["time/reference_s"] = time.time() - t0
    return Reference(mode, cached=cached, **common)


def train(cfg: TrainConfig, resolve=local_source) -> dict | None:
    """One process, or one rank of a torchrun job (FSDP2; only rank 0 writes logs, cache and the model).
    `resolve(source, seed)` turns a model source into a folder (optsys.models.sources.local_source; the entry
    points pass optsys.sources.resolve_source, which trains or reuses `stage:` recipes)."""
    if METHODS[cfg.method].trainer != __name__:
        raise ConfigError(f"method={cfg.method!r} is not a preference method; choose one of "
                          f"{methods_of(__name__)}")
    with telemetry(cfg.trainer.telemetry), torchrun_world(cfg.device) as world:
        return _train(cfg, world, resolve)


def _train(cfg: TrainConfig, world: World, resolve) -> dict | None:
    run = start_run(cfg, world)
    method, tc, device, out_dir, precision = cfg.method, cfg.trainer, world.device, run.out_dir, run.precision
    spec = PREFERENCE_LOSSES[method]
    on_policy = cfg.pref.pairs == "on_policy"
    questions = pair_questions(cfg) if on_policy else None  # a dataset without answers fails before the model loads
    model, tokenizer = load_model_and_tokenizer(cfg.model, device, seed=cfg.seed, resolve=resolve)
    attach_forward_methods(to_master(model, precision))  # master weights before a reference copies them
    pair_summary, pair_rows = {}, None
    if on_policy:  # the start model samples its own pairs (before any update, any reference copy, any sharding)
        t0 = time.time()
        with phase("pairs"):
            pair_rows, counts = on_policy_pairs(cfg, questions, model, tokenizer, world=world, out_dir=out_dir,
                                                storage_dtype=precision.storage, resolve=resolve,
                                                autocast=autocast_context(tc.precision, device))
        pair_summary = {**{f"data/{k}": v for k, v in counts.items()}, "data/pair_engine": pair_engine_name(cfg, world),
                        "time/pairs_s": time.time() - t0}
    data = build_preference_data(cfg.data, tokenizer, seed=cfg.seed, kto=not spec.paired, pair_rows=pair_rows,
                                 pair_source=str(out_dir / PAIRS_FILE))
    summary: dict = {**pair_summary, **data.train_report.metrics("data/"), "data/pairs": len(data.train),
                     "data/eval_pairs": len(data.eval), **run_summary(run, model),
                     **describe_batches(pair_steps(data.train, cfg.data.max_tokens, tc.batch_tokens, cfg.seed), world,
                                        unit="pairs", count=lambda b: b.num_pairs, batch_tokens=tc.batch_tokens,
                                        max_tokens=cfg.data.max_tokens)}

    # The reference is the model as loaded: build it (copy, or the precomputed cache) before any resume.
    reference = None
    if spec.needs_reference and cfg.pref.reference == "copy":
        reference = build_reference("copy", cfg, model, tokenizer, data, out_dir, world,
                                    average=spec.average_logps, summary=summary, precision=precision,
                                    resolve=resolve)
    model = ready_for_training(model, world, precision)  # FSDP2 under torchrun; a no-op for one process
    # The optimizer takes the parameters now, while they are all in sharded form (see dist.reshard).
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, tc.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(tc.warmup_steps, tc.max_steps,
                                                                           tc.min_lr_ratio))
    if spec.needs_reference and reference is None:
        reference = build_reference(cfg.pref.reference, cfg, model, tokenizer, data, out_dir, world,
                                    average=spec.average_logps, summary=summary, precision=precision,
                                    resolve=resolve)

    fingerprint = run_fingerprint(cfg, model, num_rows=len(data.train), data_sha256=pairs_sha256(data.train))
    loop = resume_loop(run, summary, model=model, optimizer=optimizer, scheduler=scheduler,
                       fingerprint=fingerprint, keys=METRIC_KEYS)  # the before-training evals are not measured again
    log, clock, meter, loss_value = loop.log, loop.clock, loop.meter, loop.loss

    accuracy = held_out_accuracy(model=model, tokenizer=tokenizer, cfg=cfg, world=world, log=log,
                                 summary=summary)

    def evaluate_pairs() -> dict[str, float]:
        with phase("eval"):
            return evaluate(model, data.eval, reference, method=method, cfg=cfg, device=device, world=world)

    step = start_step = loop.start_step
    if run.resume_from is None:
        if cfg.eval.before:
            accuracy("before", step)
        if data.eval and cfg.eval.before:
            before = {f"{k}_before": v for k, v in evaluate_pairs().items()}
            summary.update(before)
            log.log(step, before)

    model.train()
    steps = pair_steps(data.train, cfg.data.max_tokens, tc.batch_tokens, cfg.seed, position=loop.position)
    progress = StepProgress(tc.max_steps, f"{method} {cfg.recipe}", enabled=tc.progress and world.is_main)
    for step in range(start_step + 1, tc.max_steps + 1):
        with step_phase(step):
            with phase("data"):
                epoch, group = next(steps)  # every rank builds the same global step, then takes its share
                rows = list(shared_batches(group, world))
            n_pairs, n_chosen_tokens = step_counts(group, cfg.pref.rpo_alpha is not None)
            step_loss = 0.0
            with phase("reference"):
                refs = [reference(batch, "train") if reference is not None else None for batch, _ in rows]
            z0 = None
            if method == "kto":
                with phase("kto_z0"):
                    z0 = kto_z0(model, rows, refs, cfg=cfg, device=device, world=world)
            for (batch, real), ref in zip(rows, refs):
                # forward, logprobs and loss.<method> ranges inside; the step's loss is the mean over its pairs
                loss_sum = batch_loss(model, batch, ref, method=method, cfg=cfg, device=device,
                                      meter=meter if real else None, z0=z0, step=(n_pairs, n_chosen_tokens))
                step_loss += backward_share(loss_sum, real, n_pairs, world)  # the backward range
            grad_norm = clip_and_step(model, optimizer, scheduler, tc.grad_clip)  # the optimizer range
        (step_loss,) = all_reduce_sum([step_loss], world)
        loss_value = step_loss / n_pairs
        clock.add(sum(b.num_tokens for b in group))
        if step % tc.log_every == 0 or step == tc.max_steps:
            metrics = train_metrics(meter, world, scheduler=scheduler, grad_norm=grad_norm, epoch=epoch, clock=clock)
            log.log(step, metrics)
            # KTO's reward_accuracy needs both labels in a micro-batch; a window without such a row logs none.
            acc = metrics.get("train/reward_accuracy", float("nan"))
            progress.update(step, f"loss {metrics['train/loss']:.4f}  acc {acc:.2f}  "
                                  f"{metrics['throughput/tokens_per_s']:.0f} tok/s")
            meter = MetricWindow(METRIC_KEYS)
            clock.new_window()
        if eval_due(tc, step) and data.eval:  # the last step's eval is the final one below
            log.log(step, evaluate_pairs())
        stop_if_not_finite(loss_value, step, progress, hint=f"lower trainer.lr or pref.beta (metrics so far are in "
                                                            f"{out_dir / 'metrics.jsonl'})")
        if checkpoint_due(tc, step):
            # A saved window holds every rank's sums: on resume rank 0 takes it back, the others start empty.
            save_training_checkpoint(out_dir, step, cfg, world, model=model, optimizer=optimizer,
                                     scheduler=scheduler, fingerprint=fingerprint, clock=clock,
                                     position=steps.position, summary=summary, counters={"loss": loss_value},
                                     window=meter.summed_state(world))
    progress.close()
    summary.update(clock.totals(loss=loss_value, steps=tc.max_steps))
    if data.eval:
        final_eval = evaluate_pairs()
        summary.update(final_eval)
        log.log(step, final_eval)
    if cfg.eval.after:
        accuracy("after", step)
    save_final_model(model, tokenizer, out_dir, cfg, world, precision)
    return finish_run(run, log, summary)  # rank 0 reports for the job

