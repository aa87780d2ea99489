"""RL with a co-located rollout engine (GRPO, Dr. GRPO, DAPO, GSPO, CISPO, RLOO, REINFORCE++, on-policy
distillation, PPO with a critic): the loop.

One rollout step, top to bottom (`_train`):
  generate: prompts (a pure function of the step) -> engine.generate: rl.group_size completions each, with the
  sampler's log-probs (multi-turn: episodes against the task's environment) -> score: rewards -> (DAPO) drop
  all-equal groups and refill -> advantages -> packed micro-batches -> old log-probs (no grad; also entropy and
  the sampler-vs-trainer gap), the reference's (or teacher's), PPO's values -> update: rl.updates_per_batch
  optimizer steps on mini-batches of whole groups, the policy loss through the fused token log-prob kernel (no
  [T, V] logits) with importance weights against the sampler -> weight sync into the engine -> canary check ->
  log -> checkpoint.
Each mini-batch's loss is the method's aggregate over the whole mini-batch (all its micro-batches and ranks):
every token carries its aggregation weight, so how sequences fall into packed rows changes nothing.
Prompts and sampling seeds are functions of (seed, step, round, prompt), so a resumed run draws what an
uninterrupted one draws. The batch types, the prompt schedule and the micro-batches, with a worked example, are
in optsys.trainers.rl_batch; PPO's critic in optsys.models.critic.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import time

import torch

from optsys.checkpoint import run_fingerprint
from optsys.config import ConfigError, ModelConfig, RLConfig, TrainConfig, TrainerConfig
from optsys.data.tasks import get_task
from optsys.eval.generate import stop_token_ids
from optsys.losses.policy import POLICY_LOSSES, sampler_correction
from optsys.losses.value import value_loss
from optsys.methods import RL_ALGORITHMS
from optsys.models.critic import build_critic, packed_values
from optsys.models.load import load_model_and_tokenizer
from optsys.models.lora import is_peft
from optsys.models.packed import attach_forward_methods
from optsys.models.sources import local_source
from optsys.parallel.dist import barrier, shard_model, torchrun_world
from optsys.rollout.engine import Sampling, resolve_engine_name
from optsys.rollout.games import evaluate_environment
from optsys.rollout.rewards import build_rewards
from optsys.rollout.sync import Canary, SyncError, sync_weights
from optsys.telemetry.nvtx import phase, step_phase, telemetry
from optsys.telemetry.progress import StepProgress
from optsys.trainers.common import (
    RunClock,
    autocast_context,
    build_optimizer,
    clip_and_step,
    held_out_accuracy,
    ready_for_training,
    save_final_model,
    warmup_cosine,
)
from optsys.trainers.precision import frozen_for_compute, fsdp_param_dtype
from optsys.trainers.rl_batch import (
    MicroBatch,
    Prompt,
    Rollout,
    StepStats,
    build_prompts,
    generate,
    group_advantages,
    micro_batches,
    prompts_sha256,
    set_token_advantages,
    write_completions,
)
from optsys.trainers.run import (
    checkpoint_due,
    eval_due,
    finish_run,
    open_metrics,
    restore_run,
    run_summary,
    save_training_checkpoint,
    start_run,
)


def train(cfg: TrainConfig, resolve=local_source) -> dict | None:
    """One process, or one rank of a torchrun job (FSDP2; each rank generates its share of the prompts).
    `resolve(source, seed)` turns a model source into a folder (optsys.models.sources.local_source; the entry
    points pass optsys.sources.resolve_source, which trains or reuses `stage:` recipes)."""
    with telemetry(cfg.trainer.telemetry), torchrun_world(cfg.device) as world:
        return _train(cfg, world, resolve)


def _train(cfg: TrainConfig, world, resolve) -> dict | None:
    run = start_run(cfg, world)
    device, tc, rl, method = world.device, cfg.trainer, cfg.rl, cfg.method
    out_dir, precision = run.out_dir, run.precision
    algo = RL_ALGORITHMS[method]
    fns = build_rewards(rl.rewards, rl.reward_weights, device, resolve=resolve)

    # ---- the policy, its prompts, the frozen reference (or distillation's teacher), PPO's critic, the optimizer
    model, tokenizer = load_model_and_tokenizer(cfg.model, device, seed=cfg.seed, resolve=resolve)
    train_prompts, eval_prompts = build_prompts(cfg.data, tokenizer, seed=cfg.seed, max_new_tokens=rl.max_new_tokens,
                                                model_name=cfg.model.name_or_path)
    ref_model = None
    if algo.advantage == "teacher_kl":  # distillation: the teacher scores in the reference's place
        ref_model = shard_model(load_teacher(rl.teacher, cfg.model, tokenizer, device, precision, seed=cfg.seed,
                                             resolve=resolve), world, fsdp_param_dtype(precision))
    elif rl.kl_coef > 0:
        ref_model = build_reference(model, world, precision)
    critic = None
    if algo.advantage == "gae":
        critic = ready_for_training(build_critic(model), world, precision, methods={"packed_values": packed_values})
    model = ready_for_training(model, world, precision)
    model.train()
    optimizer, scheduler = build_optimization(model, critic, tc, updates_per_batch=rl.updates_per_batch,
                                              critic_lr=rl.critic_lr)
    # what a checkpoint holds: the policy, and the critic beside it for PPO
    trained = model if critic is None else torch.nn.ModuleDict({"policy": model, "critic": critic})
    fingerprint = run_fingerprint(cfg, model, num_rows=len(train_prompts), data_sha256=prompts_sha256(train_prompts))
    state = restore_run(run.resume_from, out_dir, world, model=trained, optimizer=optimizer, scheduler=scheduler,
                        fingerprint=fingerprint, max_steps=tc.max_steps)
    summary: dict = {**run_summary(run, model), **state["summary"]}
    log = open_metrics(cfg, out_dir, world, start_step=state["step"])
    accuracy = held_out_accuracy(model=model, tokenizer=tokenizer, cfg=cfg, world=world, log=log,
                                 summary=summary, periodic=bool(tc.eval_every))
    step = start_step = state["step"]
    if cfg.eval.before and run.resume_from is None:
        accuracy("before", step)
        model.train()

    # ---- the engine, its sampling, the canary; multi-turn tasks' environment
    t0 = time.perf_counter()
    model_path = resolve(cfg.model.name_or_path, cfg.seed, dtype=cfg.model.dtype)
    engine = build_engine(rl, model, tokenizer, world, precision.storage, model_path=model_path,
                          lora_r=cfg.model.lora.r, seed=cfg.seed, max_tokens=cfg.data.max_tokens)
    summary["time/engine_start_s"] = time.perf_counter() - t0
    summary["rollout/engine"] = engine.name
    summary["rollout/tensor_parallel"] = getattr(engine, "tensor_parallel", 1)
    stops = tuple(stop_token_ids(model, tokenizer))
    sampling = Sampling(n=rl.group_size, temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k,
                        max_new_tokens=rl.max_new_tokens, stop_token_ids=stops)
    canary, filler = make_canary(eval_prompts[0] if eval_prompts else train_prompts[0], tokenizer, stops,
                                 rl.canary_tolerance)
    dynamic = rl.dynamic_sampling if rl.dynamic_sampling is not None else algo.dynamic_sampling
    task = get_task(cfg.data.task) if cfg.data.task else None
    env_task = getattr(task, "environment", None)
    if env_task and dynamic:
        raise ConfigError("dynamic sampling with a multi-turn task is not supported yet; set rl.dynamic_sampling=false")
    if env_task and world.distributed and engine.name == "hf":
        # episodes end at different turns on different ranks: the ranks' FSDP models would run different numbers
        # of generate calls and hang
        raise ConfigError(f"data.task={cfg.data.task} under torchrun needs the vLLM engine (rl.engine=vllm): with HF "
                          "generate on the FSDP model the ranks' episodes would end at different turns")
    env_kwargs = task.env_kwargs(cfg.data.difficulty) if env_task else {}
    held_out_play = functools.partial(play_eval, engine=engine, tokenizer=tokenizer, environment=env_task,
                                      rows=[p.row for p in eval_prompts], sampling=sampling, max_turns=rl.max_turns,
                                      max_tokens=cfg.data.max_tokens, summary=summary, log=log, world=world)
    sync = functools.partial(sync_and_check, engine, model, canary, rl=rl, lora_r=cfg.model.lora.r,
                             dtype=precision.storage, last_sync=tc.max_steps)
    adapter_sync = bool(cfg.model.lora.r) and rl.lora_sync == "adapter"
    start_stats = StepStats()
    try:  # the engine loaded the initial checkpoint: after a resume it gets the restored weights first
        sync(start_stats, 0)
    except SyncError as e:
        raise SyncError(f"before the first rollout: {e}") from None
    summary["sync/canary_error_start"] = start_stats.sums["sync/canary_error"][0] if rl.canary_every else None
    if env_task and run.resume_from is None and cfg.eval.before:
        held_out_play("before", step)

    fwd = Forward(device, tc.precision, rl.temperature, tc.kernel_backend)
    dropout = has_dropout(model)
    progress = StepProgress(tc.max_steps, f"{method} {cfg.recipe}", enabled=tc.progress and world.is_main)
    window: dict[str, list[float]] = state["window"] or {}  # per-step metrics since the last log line
    clock = RunClock(state["counters"])
    metrics: dict = {}
    for step in range(start_step + 1, tc.max_steps + 1):
        stats = StepStats()
        with step_phase(step):
            # ---- generate + score: this rank's share of the step's prompt groups, rl.group_size completions each
            rollouts = generate(engine, train_prompts, sampling, tokenizer, fns, rl=rl, seed=cfg.seed, step=step,
                                world=world, dynamic=dynamic, environment=env_task, env_kwargs=env_kwargs,
                                max_tokens=cfg.data.max_tokens, stats=stats)
            if rollouts:
                with phase("advantages"):
                    group_advantages(rollouts, rl.group_size, method)
            # ---- the engine sleeps (GPU: KV cache and weights freed, the weights kept on the host only for a LoRA
            # adapter sync, which leaves the base alone; CPU: a no-op that says so once)
            t = time.perf_counter()
            with phase("engine_sleep"):
                memory = engine.sleep(discard_weights=not adapter_sync)
            sleep_s = time.perf_counter() - t
            # ---- old / reference log-probs (PPO: the critic's values), then the per-token advantages
            t = time.perf_counter()
            with phase("data"):  # rollouts packed into rows
                all_mbs = micro_batches(rollouts, cfg.data.max_tokens, algo.agg, rl.max_new_tokens, world, filler)
            fused_old = on_policy_old(rl.updates_per_batch, method, dropout)
            if not fused_old or ref_model is not None or critic is not None:
                score_old_and_ref(None if fused_old else model, ref_model, all_mbs, fwd, critic)
            stats.add("time/ref_logprobs_s", time.perf_counter() - t)
            with phase("advantages"):
                set_token_advantages(rollouts, method, kl_coef=rl.kl_coef, gamma=rl.gamma, lam=rl.gae_lambda,
                                     world=world)
            if not fused_old:
                old_logp_stats(rollouts, algo.advantage, stats)
            # ---- update: rl.updates_per_batch optimizer steps, each on a mini-batch of whole groups
            t = time.perf_counter()
            n_groups = len(rollouts) // rl.group_size
            grad_norm = float("nan")
            for u in range(rl.updates_per_batch):
                lo, hi = (u * n_groups // rl.updates_per_batch, (u + 1) * n_groups // rl.updates_per_batch)
                part = rollouts[lo * rl.group_size : hi * rl.group_size]
                with phase("data"):
                    mbs = (all_mbs if rl.updates_per_batch == 1
                           else micro_batches(part, cfg.data.max_tokens, algo.agg, rl.max_new_tokens, world, filler))
                grad_norm = update(model, optimizer, scheduler, mbs, fwd=fwd, rl=rl, method=method,
                                   fused_old=fused_old, grad_clip=tc.grad_clip, world=world, stats=stats,
                                   critic=critic)
            stats.add("time/update_s", time.perf_counter() - t)
            # ---- sync + canary: the engine's weights wake (the reload writes into them), take the new policy, then
            # its KV cache wakes (not during the sync: a lower peak) and the canary checks it
            t = time.perf_counter()
            with phase("engine_wake"):
                memory.update(engine.wake(("weights",)))
            stats.add("time/sleep_wake_s", sleep_s + time.perf_counter() - t)
            sync(stats, step)
            for key, mb in memory.items():  # GPU: what the sleep freed, what the wakes took back, host copies
                stats.add(key, mb)
        # ---- log: per-step metrics, averaged over trainer.log_every steps
        clock.add(sum(len(r.prompt.ids) + len(r.token_ids) for r in rollouts))
        metrics = stats.means(world)
        metrics.update({"train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm})
        for k, v in metrics.items():
            window.setdefault(k, []).append(v)
        if step % tc.log_every == 0 or step == tc.max_steps:
            log_window(window, step, log, progress)
            window = {}
            if world.is_main:  # a sample of what the policy writes, with its rewards (rl.log_completions)
                write_completions(out_dir / "completions.jsonl", rollouts, step, rl.log_completions)
        # ---- held-out accuracy (multi-turn: play) every trainer.eval_every steps, on the policy just synced
        if eval_due(tc, step):
            if env_task:
                held_out_play("", step)
            else:
                accuracy("", step)
                model.train()
        # ---- checkpoint
        if checkpoint_due(tc, step):
            save_training_checkpoint(out_dir, step, cfg, world, model=trained, optimizer=optimizer, scheduler=scheduler,
                                     fingerprint=fingerprint, clock=clock, position=(step, 0), summary=summary,
                                     counters={}, window=window)
    progress.close()
    summary.update(clock.totals(loss=metrics.get("train/loss", float("nan")), steps=tc.max_steps))
    summary.update({k: v for k, v in metrics.items() if k.startswith(("reward/", "time/", "sync/"))})
    if env_task and cfg.eval.after:
        held_out_play("after", step)
    if cfg.eval.after:
        accuracy("after", step)
    save_final_model(model, tokenizer, out_dir, cfg, world, precision)  # ends at a barrier under torchrun
    result = finish_run(run, log, summary)
    barrier(world)
    engine.close()  # last: under torchrun vLLM's shutdown also destroys the default process group
    return result


# ---------------------------------------------------------------------------- setup


def load_teacher(teacher: str, model_cfg: ModelConfig, tokenizer, device, precision, *, seed: int,
                 resolve=local_source):
    """rl.teacher, frozen; a ConfigError if its tokenizer is not the student's (per-token log-probs of the same
    token ids must mean the same tokens). Its architecture and size may differ: that is the point."""
    teacher_cfg = dataclasses.replace(model_cfg, name_or_path=teacher, gradient_checkpointing=False,
                                      lora=dataclasses.replace(model_cfg.lora, r=0, quantize="none"))
    teacher_model, teacher_tok = load_model_and_tokenizer(teacher_cfg, device, seed=seed, resolve=resolve)
    vocab, other = tokenizer.get_vocab(), teacher_tok.get_vocab()
    if vocab != other:
        differing = sorted(set(vocab.items()) ^ set(other.items()))[:3]
        raise ConfigError(f"rl.teacher={teacher} has another tokenizer than the student "
                          f"{model_cfg.name_or_path} ({len(other)} vs {len(vocab)} tokens; e.g. differing entries "
                          f"{differing}): on-policy distillation compares log-probs token for token, so the teacher "
                          "must share the student's tokenizer")
    return attach_forward_methods(frozen_for_compute(teacher_model.eval().requires_grad_(False), precision))


@dataclasses.dataclass(frozen=True)
class AdaptersOff:
    """The KL reference of a LoRA policy: the policy itself with its adapters disabled, i.e. its frozen base,
    which is the initial policy (LoRA's B starts at 0). No second model in memory."""

    model: torch.nn.Module


def build_reference(model, world, precision):
    """The initial policy, frozen, for the KL term: a LoRA policy's base with the adapters off (AdaptersOff);
    else a frozen copy sharded like the policy (FSDP2 under torchrun: 1 / world of it per rank, not a full copy).
    Call before ready_for_training (the copy is of the loaded weights); `model` stays the same module after it."""
    if is_peft(model):
        return AdaptersOff(model)
    frozen = frozen_for_compute(copy.deepcopy(model).eval().requires_grad_(False), precision)
    return shard_model(attach_forward_methods(frozen), world, fsdp_param_dtype(precision))


def build_optimization(model, critic, tc: TrainerConfig, *, updates_per_batch: int, critic_lr: float | None):
    """AdamW over the policy, with PPO's critic in its own group at rl.critic_lr (the schedule scales both), and
    the warmup-cosine schedule over every optimizer step of the run."""
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, tc.betas)
    if critic is not None:
        critic.train()
        optimizer.add_param_group({"params": [p for p in critic.parameters() if p.requires_grad],
                                   "lr": critic_lr or tc.lr, "weight_decay": 0.0})
    total_updates = tc.max_steps * updates_per_batch
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(tc.warmup_steps, total_updates,
                                                                                 tc.min_lr_ratio))


def build_engine(rl: RLConfig, model, tokenizer, world, storage_dtype: torch.dtype, *, model_path: str, lora_r: int,
                 seed: int, max_tokens: int):
    """The rollout engine rl.engine names: HF generate on the trained model itself, or vLLM in this process loading
    `model_path` (the policy's folder) and then taking the trainer's weights at every sync."""
    name = resolve_engine_name(rl.engine)
    if name == "hf" and rl.engine_tensor_parallel > 1:
        raise ConfigError(f"rl.engine_tensor_parallel={rl.engine_tensor_parallel} needs vLLM, and rl.engine="
                          f"{rl.engine} resolved to HF generate (vLLM is not installed)")
    if name == "hf":
        from optsys.rollout.hf_engine import HFEngine

        return HFEngine(model, pad_token_id=tokenizer.pad_token_id, synced_gpus=world.distributed)
    from optsys.rollout.vllm_engine import VLLMEngine

    lora = lora_r if lora_r and rl.lora_sync == "adapter" else 0
    return VLLMEngine(model_path, dtype=storage_dtype, max_model_len=max_tokens,
                      seed=seed, device=world.device, gpu_memory_utilization=rl.engine_memory_fraction,
                      lora_rank=lora, distributed=world.distributed, tensor_parallel=rl.engine_tensor_parallel)


def make_canary(prompt: Prompt, tokenizer, stops: tuple[int, ...], tolerance: float) -> tuple[Canary, list[Rollout]]:
    """The canary (a held-out prompt and its answer, scored by engine and trainer after syncs), and from the same
    tokens a zero-weight filler for a rank with fewer micro-batches than the others (FSDP runs the same forwards
    on every rank)."""
    ids = tokenizer(prompt.answer or "0", add_special_tokens=False).input_ids + list(stops[:1])
    zeros = torch.zeros(len(ids))
    filler = [Rollout(prompt, 0, ids, [0.0] * len(ids), "stop", old_logp=zeros, ref_logp=zeros, entropy=zeros,
                      old_values=zeros, returns=zeros)]
    return Canary(prompt.ids, ids, tolerance), filler


# ---------------------------------------------------------------------------- old / reference log-probs


@dataclasses.dataclass(frozen=True)
class Forward:
    """How the trainer runs its packed forwards: on `device`, under trainer.precision's autocast, log-probs at
    the sampling temperature through trainer.kernel_backend."""

    device: torch.device
    precision: str
    temperature: float
    backend: str

    def logps(self, model, mb: MicroBatch, *, entropy: bool = False):
        with phase("data"):
            b = mb.batch.to(self.device)
        with autocast_context(self.precision, self.device):
            return model.packed_token_logps(b.input_ids, b.position_ids, b.seq_lens, b.targets,
                                            temperature=self.temperature, return_entropy=entropy,
                                            backend=self.backend)

    def values(self, critic, mb: MicroBatch) -> torch.Tensor:
        b = mb.batch.to(self.device)
        with autocast_context(self.precision, self.device):
            return critic.packed_values(b.input_ids, b.position_ids, b.seq_lens, b.targets)


def on_policy_old(updates_per_batch: int, method: str, dropout: bool = False) -> bool:
    """With one optimizer step per rollout step, the policy that scores the update's forward IS the old policy:
    its log-probs (detached) are the old log-probs, and the separate no-grad pass over the batch is skipped (a
    third of the update's compute). Not for methods whose advantages need the old log-probs before the loss
    (REINFORCE++ with KL, distillation, PPO's KL-shaped reward), nor with dropout (`dropout`: the update's
    train-mode forward is noisy, and the old log-probs must be the eval-mode policy's)."""
    return updates_per_batch == 1 and RL_ALGORITHMS[method].advantage in ("grpo", "rloo") and not dropout


@torch.no_grad()
def score_old_and_ref(model, ref_model, mbs: list[MicroBatch], fwd: Forward, critic=None) -> None:
    """The trainer's log-probs (and entropy) before the update (model None: skipped, see `on_policy_old`), the
    reference's (or teacher's) when there is one, and the critic's values (PPO). All in eval mode (no dropout:
    the old log-probs are the policy's, deterministic, and on-policy ratios are 1); train mode again after.
    FSDP ranks run the same number of forwards: fillers too, results dropped."""
    with eval_mode(model, ref_model if isinstance(ref_model, torch.nn.Module) else None, critic):
        _score_old_and_ref(model, ref_model, mbs, fwd, critic)
    if hasattr(ref_model, "reshard"):  # FSDP2 leaves the root gathered after a no-grad forward: free it
        ref_model.reshard()


@contextlib.contextmanager
def eval_mode(*models):
    """Each model (None skipped) in eval mode inside, back in the mode it had after."""
    was = [(m, m.training) for m in models if m is not None]
    for m, _ in was:
        m.eval()
    try:
        yield
    finally:
        for m, training in was:
            m.train(training)


def has_dropout(model) -> bool:
    """Whether a train-mode forward of `model` is random: a Dropout module with p > 0 (LoRA's lora_dropout too), or
    a config dropout rate > 0 (attention_dropout and the like, applied functionally)."""
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    rates = vars(config).items() if config is not None else ()
    return any(k.endswith("dropout") and isinstance(v, float) and v > 0 for k, v in rates)


def _score_old_and_ref(model, ref_model, mbs: list[MicroBatch], fwd: Forward, critic=None) -> None:
    for mb in mbs:
        logp, ent, ref, values = None, None, None, None
        if model is not None:
            with phase("old_logprobs"):
                logp, ent = fwd.logps(model, mb, entropy=True)
        if isinstance(ref_model, AdaptersOff):
            with phase("reference"), ref_model.model.disable_adapter(), eval_mode(ref_model.model):
                ref = fwd.logps(ref_model.model, mb)[0]
        elif ref_model is not None:
            with phase("reference"):  # the reference's (or the teacher's) log-probs
                ref = fwd.logps(ref_model, mb)[0]
        if critic is not None:
            with phase("values"):
                values = fwd.values(critic, mb)
        if not mb.real:
            continue
        start = 0
        for r in mb.rollouts:
            n = r.n_trained
            if logp is not None:
                r.old_logp, r.entropy = logp[start : start + n].float().cpu(), ent[start : start + n].float().cpu()
            if ref is not None:
                r.ref_logp = ref[start : start + n].float().cpu()
            if values is not None:
                r.old_values = values[start : start + n].float().cpu()
            start += n


def old_logp_stats(rollouts: list[Rollout], advantage: str, stats: StepStats) -> None:
    """From the no-grad pass: the sampler-vs-trainer log-prob gap, the entropy, distillation's teacher KL."""
    for r in rollouts:
        if r.ref_logp is not None and advantage == "teacher_kl":
            stats.add("train/teacher_kl", float((r.old_logp - r.ref_logp).sum()), r.n_trained)
        gap = (torch.tensor(r.trained_sampler_logp) - r.old_logp).abs()
        stats.add("train/logp_gap_mean", float(gap.sum()), gap.numel())
        stats.add("train/entropy", float(r.entropy.sum()), r.entropy.numel())


# ---------------------------------------------------------------------------- update


def loss_kl(rl: RLConfig, method: str) -> dict:
    """The policy loss's KL arguments: none without rl.kl_coef; for the methods with the KL in the reward (PPO,
    REINFORCE++: set_token_advantages folds -kl_coef x k1 into the token rewards) a zero coefficient, so the
    loss only logs train/kl (mean k1) and the KL is applied once; else kl_coef x rl.kl_estimator (default k3)."""
    if rl.kl_coef == 0:
        return {}
    if RL_ALGORITHMS[method].kl_in_reward:
        return {"kl_coef": 0.0, "kl_estimator": "k1"}
    return {"kl_coef": rl.kl_coef, "kl_estimator": rl.kl_estimator or "k3"}


def update(model, optimizer, scheduler, mbs: list[MicroBatch], *, fwd: Forward, rl: RLConfig, method: str,
           fused_old: bool, grad_clip: float, world, stats: StepStats, critic=None) -> float:
    """One optimizer step on a mini-batch's micro-batches (policy, and the critic for PPO); returns the policy's
    pre-clip grad norm. fused_old: the old log-probs are this forward's, detached (see `on_policy_old`)."""
    algo = RL_ALGORITHMS[method]
    loss_fn = POLICY_LOSSES[algo.loss]
    kw = dict(clip_eps_high=rl.clip_eps_high if rl.clip_eps_high is not None else algo.clip_eps_high)
    if algo.loss != "cispo":
        kw["clip_eps"] = rl.clip_eps if rl.clip_eps is not None else algo.clip_eps
    kl_kw = loss_kl(rl, method)
    kw.update(kl_kw)
    kl = bool(kl_kw)
    device = fwd.device
    # (metric, value, multiplier, count) per micro-batch, the values left on the device and read back once after
    # the loop: each float() of a device tensor would wait for the GPU (a host sync per metric per micro-batch)
    pending: list[tuple[str, object, float, float]] = []
    for mb in mbs:
        logp, ent = fwd.logps(model, mb, entropy=fused_old)
        n = logp.shape[0]
        old = logp.detach().float() if fused_old else mb.per_token("old_logp").to(device)
        sampler = mb.per_token("sampler_logp").to(device)
        if fused_old and mb.real:  # the metrics the no-grad pass would have given
            pending.append(("train/logp_gap_mean", (sampler - old).abs().sum(), 1, n))
            pending.append(("train/entropy", ent.detach().sum(), 1, n))
        with phase("data"):
            adv = mb.per_token("advantage").to(device)
            seq_ids = mb.seq_ids().to(device)
            ref = mb.per_token("ref_logp").to(device) if kl else None
            weights = mb.weights.to(device)
            every = torch.ones(n, dtype=torch.bool, device=device)
        with phase(f"loss.{method}"):
            is_w, is_metrics = sampler_correction(old, sampler, every, mode=rl.sampler_correction,
                                                  cap=rl.correction_cap, seq_ids=seq_ids, num_seqs=len(mb.rollouts))
            loss, metrics = loss_fn(logp.float(), old, adv, every, ref_logp=ref, seq_ids=seq_ids,
                                    num_seqs=len(mb.rollouts), token_weights=weights, is_weights=is_w, **kw)
        if critic is not None:
            values = fwd.values(critic, mb)  # the critic's forward range inside
            with phase("loss.value"):
                v_loss, v_metrics = value_loss(values, mb.per_token("returns").to(device),
                                               mb.per_token("old_values").to(device), weights, clip=rl.value_clip)
            metrics = {**metrics, **v_metrics}
            loss = loss + v_loss  # separate parameters: one backward fills both models' gradients
        # FSDP averages gradients over ranks; the weights already sum over all ranks' tokens
        with phase("backward"):
            (loss * world.size).backward()
        pending.append(("loss", loss.detach(), 1, 0))
        pending.append(("kl", metrics.get("kl", 0.0), 1, 0))
        if mb.real:
            for k, v in {**metrics, **is_metrics}.items():
                if k not in ("pg_loss", "kl"):  # token-weighted means of the micro-batch metrics
                    pending.append((f"train/{k}", v, n, n))
    loss_sum = kl_sum = 0.0
    for (name, _, times, count), value in zip(pending, host_floats([p[1] for p in pending])):
        if name == "loss":
            loss_sum += value
        elif name == "kl":
            kl_sum += value
        else:
            stats.add(name, value * times, count)  # x 1 is exact: sums go in as they are
    # the micro-batch losses of all ranks sum to the mini-batch's loss: each rank counts 1 / world_size. The KL
    # term is such a share too (aggregated with the loss's token weights), so it is summed the same way
    stats.add("train/loss", loss_sum, 1.0 / world.size)
    if kl:
        stats.add("train/kl", kl_sum, 1.0 / world.size)
    if critic is not None and grad_clip > 0:  # the critic's own norm (clip_and_step clips the policy)
        with phase("optimizer"):
            norm = torch.nn.utils.clip_grad_norm_(critic.parameters(), grad_clip)
        stats.add("train/critic_grad_norm", float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm),
                  1.0 / world.size)
    return clip_and_step(model, optimizer, scheduler, grad_clip)


def host_floats(values: list) -> list[float]:
    """Each value as a Python float, in order, the tensors among them read back in one transfer (one host sync
    instead of one per value). Exact: every value goes through float64, which holds any float32 or float64."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    read = iter(torch.stack([t.detach().reshape(()).double() for t in tensors]).tolist() if tensors else [])
    return [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]


# ---------------------------------------------------------------------------- sync + canary, held-out play, log


def sync_policy(engine, model, dtype: torch.dtype, *, lora_r: int, lora_sync: str, bucket_mb: float):
    """The trainer's policy into the engine: full weights, or with LoRA the adapter alone (rl.lora_sync=adapter)
    or the merged weights (merged)."""
    if not lora_r:
        return sync_weights(engine, model, dtype=dtype, bucket_mb=bucket_mb)
    from optsys.rollout.lora_sync import sync_adapter, sync_merged

    if lora_sync == "adapter":
        return sync_adapter(engine, model, dtype=dtype)
    return sync_merged(engine, model, dtype=dtype, bucket_mb=bucket_mb)


def sync_and_check(engine, model, canary: Canary, stats: StepStats, n_sync: int, *, rl: RLConfig, lora_r: int,
                   dtype: torch.dtype, last_sync: int) -> None:
    """Sync the policy into the engine (its weights awake), wake its KV cache (a no-op if awake); when
    `canary_due`, check the engine against the trainer."""
    t = time.perf_counter()
    with phase("weight_sync"):
        report = sync_policy(engine, model, dtype, lora_r=lora_r, lora_sync=rl.lora_sync, bucket_mb=rl.sync_bucket_mb)
    stats.add("time/sync_s", time.perf_counter() - t)
    stats.add("sync/mb", report.bytes / 2**20)
    t = time.perf_counter()
    with phase("engine_wake"):
        for key, mb in engine.wake(("kv_cache",)).items():
            stats.add(key, mb)
    stats.add("time/sleep_wake_s", time.perf_counter() - t, 0.0)  # added to the step's one sleep/wake entry
    if canary_due(n_sync, rl.canary_every, last_sync):
        t = time.perf_counter()
        with phase("canary"), eval_mode(model):  # engine vs trainer log-probs of a fixed completion (no dropout)
            stats.add("sync/canary_error", canary.check(engine, model))
        stats.add("time/canary_s", time.perf_counter() - t)


def canary_due(n_sync: int, every: int, last_sync: int) -> bool:
    """Whether sync `n_sync` (0: the one before the first rollout, s: after step s's update) is checked: the first
    two (the engine loaded what the trainer holds; the first update's weights took), every `every`-th, and the last
    (the weights the run ends with). every = 0: never. A sync that does not take (a parameter skipped or renamed, a
    stale packed head) shows at the first sync after an update; the later checks catch what grows with training."""
    return every > 0 and (n_sync <= 1 or n_sync % every == 0 or n_sync == last_sync)


def play_eval(tag: str, at_step: int, *, engine, tokenizer, environment: str, rows: list[dict], sampling: Sampling,
              max_turns: int, max_tokens: int, summary: dict, log, world) -> None:
    """Held-out play of a multi-turn task through the engine (in sync with the trainer here): greedy
    (eval/success_rate_<tag>, ...) and sampled as in training, at the sampling temperature with fixed seeds
    (eval/sampled_success_rate_<tag>, ...): the policy RL optimizes is the sampled one."""
    t = time.perf_counter()
    named = {}
    for prefix, temperature in (("eval/", 0.0), ("eval/sampled_", sampling.temperature)):
        play = dataclasses.replace(sampling, n=1, temperature=temperature)
        with phase("eval"):
            result = evaluate_environment(environment, engine, tokenizer, rows, play, max_turns=max_turns,
                                          max_tokens=max_tokens)
        named.update({f"{prefix}{k.removeprefix('eval/')}" + (f"_{tag}" if tag else ""): v for k, v in result.items()})
    if tag:  # "": a point of the curve at this step (trainer.eval_every), in metrics.jsonl only
        summary.update(named)
        summary[f"time/eval_{tag}_s"] = time.perf_counter() - t
    log.log(at_step, named)
    if world.is_main:
        print("  ".join(f"{k} = {v:.3f}" for k, v in named.items()))


def log_window(window: dict[str, list[float]], step: int, log, progress: StepProgress) -> None:
    """The window's per-step metrics, averaged, as one metrics.jsonl row; the progress line."""
    logged = {k: sum(v) / len(v) for k, v in window.items()}
    log.log(step, logged)
    gen_s, update_s = logged.get("time/generate_s", 0), logged.get("time/update_s", 0)
    progress.update(step, f"reward {logged.get('reward/mean', float('nan')):.3f}  gen {gen_s:.1f}s  "
                          f"update {update_s:.1f}s")
