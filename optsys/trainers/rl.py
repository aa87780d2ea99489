"""RL with a co-located rollout engine (GRPO, Dr. GRPO, DAPO, GSPO, CISPO, RLOO, REINFORCE++, on-policy
distillation): the loop.

One rollout step, top to bottom:
  prompts (a pure function of the step) -> engine.generate: rl.group_size completions each, with the sampler's
  log-probs -> rewards -> (DAPO) drop all-equal groups and refill -> advantages -> packed sequences ->
  old log-probs (no grad; also entropy and the sampler-vs-trainer gap) -> rl.updates_per_batch optimizer steps
  on mini-batches of whole groups, the policy loss through the fused token log-prob kernel (no [T, V] logits)
  with importance weights against the sampler -> weight sync into the engine -> canary check.
Each mini-batch's loss is the method's aggregate over the whole mini-batch (all its micro-batches and ranks):
every token carries its aggregation weight, so how sequences fall into packed rows changes nothing.
Prompts and sampling seeds are functions of (seed, step, round, prompt), so a resumed run draws what an
uninterrupted one draws.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import random
import time
from dataclasses import dataclass, field

import torch

from optsys.checkpoint import run_fingerprint
from optsys.config import ConfigError, TrainConfig
from optsys.data.errors import DataError
from optsys.data.packing import PackedBatch, collate_packed, pack_best_fit_decreasing
from optsys.data.tasks import get_task
from optsys.data.tokenize import IGNORE, TokenizedExample
from optsys.eval.generate import stop_token_ids
from optsys.losses.policy import (
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSSES,
    aggregation_weights,
    informative_groups,
    overlong_penalty,
    sampler_correction,
)
from optsys.losses.value import value_loss
from optsys.methods import RL_ALGORITHMS
from optsys.models.critic import build_critic, packed_values
from optsys.models.load import load_model_and_tokenizer, resolve_model_path
from optsys.models.packed import attach_forward_methods
from optsys.parallel.dist import all_gather_objects, all_reduce_sum, barrier, torchrun_world
from optsys.rollout.engine import Sampling, resolve_engine_name, stable_seed
from optsys.rollout.games import evaluate_environment
from optsys.rollout.rewards import build_rewards, score_completions
from optsys.rollout.sync import Canary, SyncError, sync_weights
from optsys.stages import stage_provenance
from optsys.telemetry.nvtx import phase, step_phase, telemetry
from optsys.telemetry.progress import StepProgress
from optsys.trainers.common import (
    RunClock,
    autocast_context,
    build_optimizer,
    checkpoint_due,
    clip_and_step,
    close_run,
    epoch_order,
    held_out_accuracy,
    locate_resume,
    open_metrics,
    ready_for_training,
    restore_run,
    run_output_dir,
    save_final_model,
    save_training_checkpoint,
    set_seed,
    warmup_cosine,
)
from optsys.trainers.precision import frozen_for_compute, resolve_precision


@dataclass
class Prompt:
    ids: list[int]
    text: str  # the user turn, what reward functions see as `prompt`
    answer: str | None
    row: dict | None = None  # the task's row (multi-turn: what the environment is reset with)


@dataclass(eq=False)
class Rollout:
    """One completion of one prompt, with everything the update needs, per completion token."""

    prompt: Prompt
    group: int  # index of its prompt group in the step
    token_ids: list[int]  # everything after the prompt (multi-turn: model and environment turns)
    sampler_logp: list[float]  # aligned with token_ids (0 at environment tokens)
    finish_reason: str
    text: str = ""
    reward: float = 0.0
    advantage: float = 0.0
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    token_adv: torch.Tensor | None = None  # per-token advantages (REINFORCE++), else `advantage` everywhere
    loss_mask: list[bool] | None = None  # multi-turn: True at the model's tokens (None: all of them)
    old_values: torch.Tensor | None = None  # PPO: the critic's values before the update, per trained token
    returns: torch.Tensor | None = None  # PPO: GAE returns (value targets), per trained token
    episode: object = None  # multi-turn: the optsys.rollout.environments.Episode

    @property
    def n_trained(self) -> int:
        """Tokens the loss sees (the per-token tensors of the update have this length)."""
        return len(self.token_ids) if self.loss_mask is None else sum(self.loss_mask)

    @property
    def trained_sampler_logp(self) -> list[float]:
        if self.loss_mask is None:
            return self.sampler_logp
        return [lp for lp, m in zip(self.sampler_logp, self.loss_mask) if m]

    def example(self) -> TokenizedExample:
        """prompt + tokens[:-1] as inputs; targets are the model's tokens (prompt and environment tokens -100)."""
        n = len(self.prompt.ids)
        ids = self.prompt.ids + self.token_ids[:-1]
        mask = self.loss_mask or [True] * len(self.token_ids)
        return TokenizedExample(ids, [IGNORE] * (n - 1) + [t if m else IGNORE for t, m in zip(self.token_ids, mask)])


@dataclass
class MicroBatch:
    batch: PackedBatch
    rollouts: list[Rollout]
    weights: torch.Tensor  # [N] aggregation weight per completion token
    real: bool = True  # False: a zero-weight filler that keeps FSDP ranks in step

    def per_token(self, attr: str) -> torch.Tensor:
        if attr == "advantage":
            return torch.cat([r.token_adv if r.token_adv is not None else torch.full((r.n_trained,), r.advantage)
                              for r in self.rollouts])
        if attr == "sampler_logp":
            return torch.cat([torch.tensor(r.trained_sampler_logp) for r in self.rollouts])
        return torch.cat([getattr(r, attr) for r in self.rollouts])

    def seq_ids(self) -> torch.Tensor:
        return torch.cat([torch.full((r.n_trained,), i) for i, r in enumerate(self.rollouts)])


@dataclass
class StepStats:
    """Per-step metrics as (sum, count) pairs, reduced over ranks before logging."""

    sums: dict = field(default_factory=dict)

    def add(self, name: str, total: float, count: float = 1.0) -> None:
        s, c = self.sums.get(name, (0.0, 0.0))
        self.sums[name] = (s + float(total), c + float(count))

    def means(self, world) -> dict[str, float]:
        keys = sorted(self.sums)
        if world.distributed:  # ranks may hold different keys (a reward error, a rank of fillers): use the union
            keys = sorted({k for share in all_gather_objects(keys, world) for k in share})
        flat = all_reduce_sum([v for k in keys for v in self.sums.get(k, (0.0, 0.0))], world)
        return {k: flat[2 * i] / flat[2 * i + 1] for i, k in enumerate(keys) if flat[2 * i + 1]}


def build_prompts(cfg: TrainConfig, tokenizer) -> tuple[list[Prompt], list[Prompt]]:
    """Training and held-out prompts of the built-in task, tokenized with the chat template, length-checked."""
    if tokenizer.chat_template is None:
        raise DataError(f"the tokenizer of {cfg.model.name_or_path} has no chat template, so RL prompts cannot be "
                        "rendered; use a model whose tokenizer_config.json carries one")
    d = cfg.data
    if d.task is not None:
        task = get_task(d.task)
        sources = [(f"task:{d.task}/{split}", task.rl_prompts(split, n, difficulty=d.difficulty, seed=cfg.seed))
                   for split, n in (("train", d.num_train), ("test", d.num_eval))]
    else:
        from optsys.data.sources import load_rows

        def dataset_rows(source: str | None, split: str) -> list[dict]:
            if source is None:
                return []
            return [prompt_row(r, source, i) for i, r in enumerate(load_rows(source, split=split))]

        sources = [(d.dataset, dataset_rows(d.dataset, d.split)), (d.eval_dataset, dataset_rows(d.eval_dataset,
                                                                                                  d.eval_split))]
    out = []
    for name, rows in sources:
        prompts = []
        for i, row in enumerate(rows):
            ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
            if len(ids) + cfg.rl.max_new_tokens > d.max_tokens:
                raise DataError(f"{name} row {i}: the prompt has {len(ids)} tokens, and with "
                                f"rl.max_new_tokens={cfg.rl.max_new_tokens} exceeds data.max_tokens="
                                f"{d.max_tokens} (the engine's context); raise data.max_tokens")
            prompts.append(Prompt(list(ids), row["prompt"][-1]["content"], row.get("answer"), row))
        out.append(prompts)
    return out[0], out[1]


def prompts_sha256(prompts: list[Prompt]) -> str:
    """Content hash of the training prompts (token ids and answers): part of the resume fingerprint."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(repr((p.ids, p.answer)).encode())
    return h.hexdigest()


def prompt_row(row: dict, source: str, index: int) -> dict:
    """An RL row of a dataset: `prompt` (a string, or chat messages ending with the user's turn) and an optional
    `answer` (the reference reward functions such as `correct` compare with); other fields are kept."""
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        messages = [{"role": "user", "content": prompt}]
    elif (isinstance(prompt, list) and prompt and all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                                                        for m in prompt) and prompt[-1]["role"] == "user"):
        messages = prompt
    else:
        raise DataError(f"{source} row {index}: RL rows need a 'prompt' (a non-empty string, or a list of "
                        f"{{role, content}} messages ending with a user turn); got {str(prompt)[:120]!r} (fields: "
                        f"{sorted(row)})")
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise DataError(f"{source} row {index}: 'answer' must be a string or a number, got {type(answer).__name__}")
    return {**row, "prompt": messages, "answer": None if answer is None else str(answer)}


def step_prompts(prompts: list[Prompt], step: int, count: int, seed: int, round_: int = 0) -> list[Prompt]:
    """The `count` prompts of rollout step `step` (1-based): epochs of shuffled prompts, step after step;
    refill rounds (DAPO) draw from a separate seeded stream. Pure in (step, round): resume replays it."""
    if round_:
        rng = random.Random(stable_seed(seed, "refill", step, round_))
        return [prompts[rng.randrange(len(prompts))] for _ in range(count)]
    out = []
    for g in range((step - 1) * count, step * count):
        epoch, i = divmod(g, len(prompts))
        out.append(prompts[_epoch_order(len(prompts), seed, epoch)[i]])
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The trainers' epoch_order, cached: a step asks for it once per prompt."""
    return tuple(epoch_order(n, seed, epoch))


def build_engine(cfg: TrainConfig, model, tokenizer, world, storage_dtype: torch.dtype):
    name = resolve_engine_name(cfg.rl.engine)
    if name == "hf" and cfg.rl.engine_tensor_parallel > 1:
        raise ConfigError(f"rl.engine_tensor_parallel={cfg.rl.engine_tensor_parallel} needs vLLM, and rl.engine="
                          f"{cfg.rl.engine} resolved to HF generate (vLLM is not installed)")
    if name == "hf":
        from optsys.rollout.hf_engine import HFEngine

        return HFEngine(model, pad_token_id=tokenizer.pad_token_id, synced_gpus=world.distributed)
    from optsys.rollout.vllm_engine import VLLMEngine

    lora = cfg.model.lora.r if cfg.model.lora.r and cfg.rl.lora_sync == "adapter" else 0
    return VLLMEngine(resolve_model_path(cfg.model.name_or_path, seed=cfg.seed), dtype=storage_dtype,
                      max_model_len=cfg.data.max_tokens, seed=cfg.seed, device=world.device,
                      gpu_memory_utilization=cfg.rl.engine_memory_fraction, lora_rank=lora,
                      distributed=world.distributed, tensor_parallel=cfg.rl.engine_tensor_parallel)


def sync_policy(engine, model, cfg: TrainConfig, dtype: torch.dtype):
    """The trainer's policy into the engine: full weights, or with LoRA the adapter alone (rl.lora_sync=adapter)
    or the merged weights (merged)."""
    if not cfg.model.lora.r:
        return sync_weights(engine, model, dtype=dtype, bucket_mb=cfg.rl.sync_bucket_mb)
    from optsys.rollout.lora_sync import sync_adapter, sync_merged

    if cfg.rl.lora_sync == "adapter":
        return sync_adapter(engine, model, dtype=dtype)
    return sync_merged(engine, model, dtype=dtype, bucket_mb=cfg.rl.sync_bucket_mb)


def rank_groups(num_groups: int, updates: int, world) -> list[int]:
    """The step's prompt groups this rank generates and trains, as global indices, mini-batch by mini-batch:
    mini-batch u is global groups [u G / U, (u + 1) G / U), split into contiguous equal parts over the ranks.
    So every mini-batch holds the same groups whatever the world size (config checks G % (U x ranks) == 0)."""
    per_update = num_groups // updates
    part = per_update // world.size
    return [u * per_update + world.rank * part + j for u in range(updates) for j in range(part)]


def generate_groups(engine, prompts: list[Prompt], sampling: Sampling, tokenizer, *, seed: int, step: int,
                    round_: int, groups: list[int]) -> list[Rollout]:
    """Sample each prompt's group; a prompt's seed depends on its global group index (world-size invariant)."""
    seeds = [stable_seed(seed, step, round_, g) for g in groups]
    with phase("generate"):
        outs = engine.generate([p.ids for p in prompts], sampling, seeds)
    rollouts = []
    for i, (p, group) in zip(groups, zip(prompts, outs)):
        for c in group:
            if not c.token_ids:  # an engine may return nothing for an immediate stop; train on the stop token
                raise DataError(f"the engine returned an empty completion for prompt {p.text!r}")
            text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
            rollouts.append(Rollout(p, i, list(c.token_ids), list(c.logprobs), c.finish_reason, text))
    return rollouts


def play_groups(engine, prompts: list[Prompt], sampling: Sampling, tokenizer, cfg: TrainConfig, *, step: int,
                round_: int, groups: list[int], stats: StepStats) -> list[Rollout]:
    """Multi-turn rollouts: rl.group_size episodes of each prompt row against the task's environment, played in
    lock step (optsys.rollout.environments.run_episodes). Rewards come from the environment; the environment's
    tokens are in each sequence but masked out of the loss."""
    from dataclasses import replace

    from optsys.rollout.environments import make_environment, run_episodes, summarize_episodes

    task, k = get_task(cfg.data.task), cfg.rl.group_size
    owners = [(g, p) for g, p in zip(groups, prompts) for _ in range(k)]
    envs = [make_environment(task.environment, **task.env_kwargs(cfg.data.difficulty)) for _ in owners]
    seeds = [stable_seed(cfg.seed, step, round_, g, i % k) for i, (g, _) in enumerate(owners)]
    with phase("generate"):  # the environment's steps included
        episodes = run_episodes(engine, envs, tokenizer, replace(sampling, n=1), seeds,
                                rows=[p.row for _, p in owners], max_turns=cfg.rl.max_turns,
                                max_tokens=cfg.data.max_tokens)
    for key, value in summarize_episodes(episodes).items():
        stats.add(key, value * len(episodes), len(episodes))
    return [Rollout(Prompt(ep.prompt_ids, p.text, p.answer, p.row), g, ep.token_ids, ep.logprobs,
                    ep.stop_reason, " | ".join(ep.texts), reward=ep.reward, loss_mask=ep.loss_mask, episode=ep)
            for ep, (g, p) in zip(episodes, owners)]


def score(rollouts: list[Rollout], fns, cfg: TrainConfig, stats: StepStats) -> None:
    with phase("reward"):
        result = score_completions(fns, [(r.prompt.text, r.text, r.prompt.answer) for r in rollouts],
                                   timeout_s=cfg.rl.reward_timeout_s, on_error=cfg.rl.on_reward_error)
    rl = cfg.rl
    lengths = torch.tensor([len(r.token_ids) for r in rollouts], dtype=torch.float32)
    penalty = (overlong_penalty(lengths, max_len=rl.max_new_tokens, buffer=rl.overlong_buffer)
               if rl.overlong_buffer > 0 else torch.zeros_like(lengths))
    for i, r in enumerate(rollouts):
        r.reward = float(result.total[i]) + float(penalty[i])
    for name, values in result.per_function.items():
        stats.add(f"reward/{name}", sum(values), len(values))
    for name, n in {**result.errors, **result.timeouts}.items():
        stats.add(f"reward/errors_{name}", n, 1)
    if rl.overlong_buffer > 0:
        stats.add("reward/overlong_penalty", float(penalty.sum()), len(rollouts))


def group_advantages(rollouts: list[Rollout], group_size: int, method: str, world=None) -> None:
    """Outcome advantages per completion from its group's rewards (GRPO / Dr. GRPO / RLOO / REINFORCE++)."""
    algo = RL_ALGORITHMS[method]
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32).view(-1, group_size)
    if algo.advantage == "teacher_kl":  # rewards are metrics only; advantages come from the teacher per token
        return
    if algo.advantage == "grpo":
        adv = ADVANTAGE_ESTIMATORS["grpo"](rewards, scale_std=algo.scale_std)
    elif algo.advantage == "rloo":
        adv = ADVANTAGE_ESTIMATORS["rloo"](rewards)
    else:  # reinforce_pp_token: return-to-go whitened over all tokens of the batch (set in set_token_advantages)
        adv = rewards
    for r, a in zip(rollouts, adv.reshape(-1).tolist()):
        r.advantage = a


def pack(rollouts: list[Rollout], max_tokens: int) -> list[list[int]]:
    """Bins of rollout indices, each one packed row of <= max_tokens tokens (best-fit decreasing)."""
    return pack_best_fit_decreasing([len(r.prompt.ids) + len(r.token_ids) - 1 for r in rollouts], max_tokens)


def micro_batches(rollouts: list[Rollout], max_tokens: int, agg: str, max_len: int, world,
                  filler: list[Rollout]) -> list[MicroBatch]:
    """This rank's packed micro-batches of a mini-batch, every token weighted so that the sum over all ranks'
    micro-batches is the method's aggregate over the whole mini-batch; padded with zero-weight fillers to the
    largest rank's count (FSDP ranks run the same number of forwards)."""
    lengths = [r.n_trained for r in rollouts]
    # global normalizers: total completion tokens and sequences over all ranks
    shares = all_gather_objects(lengths, world) if world.distributed else [lengths]
    all_lengths = [n for share in shares for n in share]
    weight_of = aggregation_weights(torch.tensor(all_lengths, dtype=torch.float32), agg, max_len=max_len)
    offset = sum(len(share) for share in shares[: world.rank])
    mbs = []
    for bin_ in pack(rollouts, max_tokens) if rollouts else []:
        rows = [rollouts[i] for i in bin_]
        w = torch.cat([torch.full((rollouts[i].n_trained,), float(weight_of[offset + i])) for i in bin_])
        mbs.append(MicroBatch(collate_packed([r.example() for r in rows]), rows, w))
    (most,) = (max(all_gather_objects(len(mbs), world)),) if world.distributed else (len(mbs),)
    while len(mbs) < most:
        rows = filler
        mbs.append(MicroBatch(collate_packed([r.example() for r in rows]), rows,
                              torch.zeros(sum(r.n_trained for r in rows)), real=False))
    return mbs


def token_logps(model, mb: MicroBatch, cfg: TrainConfig, device, *, entropy: bool = False):
    with phase("data"):
        b = mb.batch.to(device)
    with autocast_context(cfg.trainer.precision, device):
        return model.packed_token_logps(b.input_ids, b.position_ids, b.seq_lens, b.targets,
                                        temperature=cfg.rl.temperature, return_entropy=entropy,
                                        backend=cfg.trainer.kernel_backend)


@torch.no_grad()
def score_old_and_ref(model, ref_model, mbs: list[MicroBatch], cfg: TrainConfig, device, critic=None) -> None:
    """The trainer's log-probs (and entropy) before the update (model None: skipped, see `on_policy_old`), the
    reference's (or teacher's) when there is one, and the critic's values (PPO). FSDP ranks run the same number
    of forwards: fillers too, results dropped."""
    for mb in mbs:
        logp, ent, ref, values = None, None, None, None
        if model is not None:
            with phase("old_logprobs"):
                logp, ent = token_logps(model, mb, cfg, device, entropy=True)
        if ref_model is not None:
            with phase("reference"):  # the reference's (or the teacher's) log-probs
                ref = token_logps(ref_model, mb, cfg, device)[0]
        if critic is not None:
            with phase("values"):
                values = token_values(critic, mb, cfg, device)
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


def load_teacher(cfg: TrainConfig, tokenizer, device, precision):
    """rl.teacher, frozen; a ConfigError if its tokenizer is not the student's (per-token log-probs of the same
    token ids must mean the same tokens). Its architecture and size may differ: that is the point."""
    import dataclasses

    teacher_cfg = dataclasses.replace(cfg.model, name_or_path=cfg.rl.teacher, gradient_checkpointing=False,
                                      lora=dataclasses.replace(cfg.model.lora, r=0, quantize="none"))
    teacher, teacher_tok = load_model_and_tokenizer(teacher_cfg, device, seed=cfg.seed)
    vocab, other = tokenizer.get_vocab(), teacher_tok.get_vocab()
    if vocab != other:
        differing = sorted(set(vocab.items()) ^ set(other.items()))[:3]
        raise ConfigError(f"rl.teacher={cfg.rl.teacher} has another tokenizer than the student "
                          f"{cfg.model.name_or_path} ({len(other)} vs {len(vocab)} tokens; e.g. differing entries "
                          f"{differing}): on-policy distillation compares log-probs token for token, so the teacher "
                          "must share the student's tokenizer")
    return attach_forward_methods(frozen_for_compute(teacher.eval().requires_grad_(False), precision))


def set_token_advantages(rollouts: list[Rollout], method: str, cfg: TrainConfig, world) -> None:
    """Per-token advantages: REINFORCE++ (KL-shaped return-to-go, whitened over the batch) or distillation
    (-(log pi - log teacher) per token, the negative per-token reverse KL estimate)."""
    kind = RL_ALGORITHMS[method].advantage
    if kind == "gae":
        gae_advantages(rollouts, cfg, world)
        return
    if kind == "teacher_kl":
        for r in rollouts:
            r.token_adv = -(r.old_logp - r.ref_logp)
        return
    if kind != "reinforce_pp_token":
        return
    ids = torch.cat([torch.full((r.n_trained,), i) for i, r in enumerate(rollouts)])
    kl = None
    if cfg.rl.kl_coef > 0:
        kl = torch.cat([r.old_logp - r.ref_logp for r in rollouts])
    adv = ADVANTAGE_ESTIMATORS["reinforce_pp_token"](
        torch.tensor([r.reward for r in rollouts]), torch.ones(len(ids), dtype=torch.bool), ids, kl=kl,
        kl_coef=cfg.rl.kl_coef)
    start = 0
    for r in rollouts:
        r.token_adv = adv[start : start + r.n_trained]
        start += r.n_trained


def on_policy_old(cfg: TrainConfig, method: str) -> bool:
    """With one optimizer step per rollout step, the policy that scores the update's forward IS the old policy:
    its log-probs (detached) are the old log-probs, and the separate no-grad pass over the batch is skipped (a
    third of the update's compute). Not for methods whose advantages need the old log-probs before the loss
    (REINFORCE++ with KL, distillation, PPO's KL-shaped reward)."""
    return cfg.rl.updates_per_batch == 1 and RL_ALGORITHMS[method].advantage in ("grpo", "rloo")


def update(model, optimizer, scheduler, mbs: list[MicroBatch], cfg: TrainConfig, method: str, world, device,
           stats: StepStats, critic=None) -> float:
    """One optimizer step on a mini-batch's micro-batches (policy, and the critic for PPO); returns the policy's
    pre-clip grad norm."""
    fused_old = on_policy_old(cfg, method)
    algo, rl = RL_ALGORITHMS[method], cfg.rl
    loss_fn = POLICY_LOSSES[algo.loss]
    kw = dict(clip_eps_high=rl.clip_eps_high if rl.clip_eps_high is not None else algo.clip_eps_high)
    if algo.loss != "cispo":
        kw["clip_eps"] = rl.clip_eps if rl.clip_eps is not None else algo.clip_eps
    kl = rl.kl_coef > 0 and algo.advantage != "gae"  # PPO puts the KL in the reward instead
    if kl:
        kw.update(kl_coef=rl.kl_coef, kl_estimator=rl.kl_estimator)
    loss_sum = 0.0
    for mb in mbs:
        logp, ent = token_logps(model, mb, cfg, device, entropy=fused_old)
        n = logp.shape[0]
        old = logp.detach().float() if fused_old else mb.per_token("old_logp").to(device)
        sampler = mb.per_token("sampler_logp").to(device)
        if fused_old and mb.real:  # the metrics the no-grad pass would have given
            stats.add("train/logp_gap_mean", float((sampler - old).abs().sum()), n)
            stats.add("train/entropy", float(ent.detach().sum()), n)
        with phase("data"):
            adv = mb.per_token("advantage").to(device)
            seq_ids = mb.seq_ids().to(device)
            ref = mb.per_token("ref_logp").to(device) if kl else None
            weights = mb.weights.to(device)
        with phase(f"loss.{method}"):
            is_w, is_metrics = sampler_correction(old, sampler,
                                                  torch.ones(n, dtype=torch.bool, device=device),
                                                  mode=rl.sampler_correction, cap=rl.correction_cap,
                                                  seq_ids=seq_ids, num_seqs=len(mb.rollouts))
            loss, metrics = loss_fn(logp.float(), old, adv, torch.ones(n, dtype=torch.bool, device=device),
                                    ref_logp=ref, seq_ids=seq_ids, num_seqs=len(mb.rollouts),
                                    token_weights=weights, is_weights=is_w, **kw)
        if critic is not None:
            values = token_values(critic, mb, cfg, device)  # the critic's forward range inside
            with phase("loss.value"):
                v_loss, v_metrics = value_loss(values, mb.per_token("returns").to(device),
                                               mb.per_token("old_values").to(device), weights, clip=rl.value_clip)
            metrics = {**metrics, **v_metrics}
            loss = loss + v_loss  # separate parameters: one backward fills both models' gradients
        # FSDP averages gradients over ranks; the weights already sum over all ranks' tokens
        with phase("backward"):
            (loss * world.size).backward()
        loss_sum += float(loss.detach())
        if mb.real:
            for k, v in {**metrics, **is_metrics}.items():
                if k != "pg_loss":  # token-weighted means of the micro-batch metrics
                    stats.add(f"train/{k}", float(v) * n, n)
    # the micro-batch losses of all ranks sum to the mini-batch's loss: each rank counts 1 / world_size
    stats.add("train/loss", loss_sum, 1.0 / world.size)
    if critic is not None and cfg.trainer.grad_clip > 0:  # the critic's own norm (clip_and_step clips the policy)
        with phase("optimizer"):
            norm = torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.trainer.grad_clip)
        stats.add("train/critic_grad_norm", float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm),
                  1.0 / world.size)
    return clip_and_step(model, optimizer, scheduler, cfg.trainer.grad_clip)


# ---- PPO with a critic ---------------------------------------------------------------------------------


def token_values(critic, mb: MicroBatch, cfg: TrainConfig, device) -> torch.Tensor:
    b = mb.batch.to(device)
    with autocast_context(cfg.trainer.precision, device):
        return critic.packed_values(b.input_ids, b.position_ids, b.seq_lens, b.targets)


def gae_advantages(rollouts: list[Rollout], cfg: TrainConfig, world) -> None:
    """PPO's advantages: token rewards (the outcome on the last model token, minus kl_coef x (log pi - log ref)
    per token when rl.kl_coef > 0: the KL in the reward, as in RLHF PPO), GAE with the critic's values (Schulman
    et al. 2016), then whitened over the batch's tokens; returns = advantages + values are the value targets."""
    width = max((r.n_trained for r in rollouts), default=0)
    rewards, values, mask = (torch.zeros(len(rollouts), width) for _ in range(3))
    for i, r in enumerate(rollouts):
        n = r.n_trained
        mask[i, :n] = 1
        values[i, :n] = r.old_values
        if cfg.rl.kl_coef > 0:
            rewards[i, :n] = -cfg.rl.kl_coef * (r.old_logp - r.ref_logp)
        rewards[i, n - 1] += r.reward
    adv, returns = ADVANTAGE_ESTIMATORS["gae"](rewards, values, mask, gamma=cfg.rl.gamma, lam=cfg.rl.gae_lambda)
    m = mask.bool()
    # whitened over every rank's tokens (sum, sum of squares, count reduced over ranks): world-size invariant
    n, total, squares = all_reduce_sum([float(m.sum()), float(adv[m].sum()), float((adv[m] ** 2).sum())], world)
    mean = total / max(n, 1)
    std = max(squares / max(n, 1) - mean**2, 0.0) ** 0.5 * (n / max(n - 1, 1)) ** 0.5  # unbiased, as torch.std
    adv = (adv - mean) / (std + 1e-6)
    for i, r in enumerate(rollouts):
        r.token_adv, r.returns = adv[i, : r.n_trained].clone(), returns[i, : r.n_trained].clone()


def train(cfg: TrainConfig) -> dict | None:
    """One process, or one rank of a torchrun job (FSDP2; each rank generates its share of the prompts)."""
    with telemetry(cfg.trainer.telemetry), torchrun_world(cfg.device) as world:
        return _train(cfg, world)


def _train(cfg: TrainConfig, world) -> dict | None:
    t_start = time.time()
    device, tc, rl, method = world.device, cfg.trainer, cfg.rl, cfg.method
    algo = RL_ALGORITHMS[method]
    set_seed(cfg.seed)
    out_dir = run_output_dir(cfg, world)
    resume_from = locate_resume(cfg, out_dir, world)
    fns = build_rewards(cfg.rl.rewards, cfg.rl.reward_weights, device)

    precision = resolve_precision(tc.precision, cfg.model.dtype, device)
    model, tokenizer = load_model_and_tokenizer(cfg.model, device, seed=cfg.seed)
    train_prompts, eval_prompts = build_prompts(cfg, tokenizer)
    ref_model = None
    if algo.advantage == "teacher_kl":  # distillation: the teacher scores in the reference's place
        ref_model = load_teacher(cfg, tokenizer, device, precision)
    elif rl.kl_coef > 0:  # the initial policy, frozen
        ref_model = attach_forward_methods(frozen_for_compute(copy.deepcopy(model).eval().requires_grad_(False),
                                                              precision))
    if world.is_main:
        print(precision.describe())
    critic = None
    if algo.advantage == "gae":
        critic = ready_for_training(build_critic(model), world, precision, methods={"packed_values": packed_values})
    model = ready_for_training(model, world, precision)
    model.train()
    total_updates = tc.max_steps * rl.updates_per_batch
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, tc.betas)
    if critic is not None:  # one optimizer, the critic in its own group at rl.critic_lr (the schedule scales both)
        critic.train()
        optimizer.add_param_group({"params": [p for p in critic.parameters() if p.requires_grad],
                                   "lr": rl.critic_lr or tc.lr, "weight_decay": 0.0})
    # what a checkpoint holds: the policy, and the critic beside it for PPO
    trained = model if critic is None else torch.nn.ModuleDict({"policy": model, "critic": critic})
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(tc.warmup_steps, total_updates,
                                                                           tc.min_lr_ratio))
    fingerprint = run_fingerprint(cfg, model, num_rows=len(train_prompts), data_sha256=prompts_sha256(train_prompts))
    state = restore_run(resume_from, out_dir, world, model=trained, optimizer=optimizer, scheduler=scheduler,
                        fingerprint=fingerprint, max_steps=tc.max_steps)
    summary: dict = {"model/parameters": sum(p.numel() for p in model.parameters()),
                     "parallel/world_size": world.size, "parallel/nodes": world.nodes, **stage_provenance(cfg),
                     **state["summary"]}
    log = open_metrics(cfg, out_dir, world, start_step=state["step"])
    accuracy = functools.partial(held_out_accuracy, model=model, tokenizer=tokenizer, cfg=cfg, world=world, log=log,
                                 summary=summary)
    step = start_step = state["step"]
    if cfg.eval.before and resume_from is None:
        accuracy("before", step)
        model.train()

    t0 = time.perf_counter()
    engine = build_engine(cfg, model, tokenizer, world, precision.storage)
    summary["time/engine_start_s"] = time.perf_counter() - t0
    summary["rollout/engine"] = engine.name
    summary["rollout/tensor_parallel"] = getattr(engine, "tensor_parallel", 1)
    stops = tuple(stop_token_ids(model, tokenizer))
    sampling = Sampling(n=rl.group_size, temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k,
                        max_new_tokens=rl.max_new_tokens, stop_token_ids=stops)
    canary_prompt = eval_prompts[0] if eval_prompts else train_prompts[0]
    canary_ids = tokenizer(canary_prompt.answer or "0", add_special_tokens=False).input_ids + list(stops[:1])
    canary = Canary(canary_prompt.ids, canary_ids, rl.canary_tolerance)
    # a zero-weight micro-batch for a rank with fewer than the others (FSDP runs the same forwards on every rank)
    zeros = torch.zeros(len(canary_ids))
    filler = [Rollout(canary_prompt, 0, canary_ids, [0.0] * len(canary_ids), "stop", old_logp=zeros,
                      ref_logp=zeros, entropy=zeros, old_values=zeros, returns=zeros)]
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

    def play_eval(tag: str, at_step: int) -> None:
        """Held-out play of a multi-turn task through the engine (in sync with the trainer here): greedy
        (eval/success_rate_<tag>, ...) and sampled as in training, at rl.temperature with fixed seeds
        (eval/sampled_success_rate_<tag>, ...): the policy RL optimizes is the sampled one."""
        t = time.perf_counter()
        rows = [p.row for p in eval_prompts]
        named = {}
        for prefix, temperature in (("eval/", 0.0), ("eval/sampled_", rl.temperature)):
            play = Sampling(n=1, temperature=temperature, top_p=rl.top_p, top_k=rl.top_k,
                            max_new_tokens=rl.max_new_tokens, stop_token_ids=stops)
            with phase("eval"):
                result = evaluate_environment(env_task, engine, tokenizer, rows, play, max_turns=rl.max_turns,
                                              max_tokens=cfg.data.max_tokens)
            named.update({f"{prefix}{k.removeprefix('eval/')}_{tag}": v for k, v in result.items()})
        summary.update(named)
        summary[f"time/eval_{tag}_s"] = time.perf_counter() - t
        log.log(at_step, named)
        if world.is_main:
            print("  ".join(f"{k} = {v:.3f}" for k, v in named.items()))
    max_len = rl.max_new_tokens

    def sync_and_check(stats: StepStats, n_sync: int) -> None:
        t = time.perf_counter()
        with phase("weight_sync"):
            report = sync_policy(engine, model, cfg, precision.storage)
        stats.add("time/sync_s", time.perf_counter() - t)
        stats.add("sync/mb", report.bytes / 2**20)
        if rl.canary_every and n_sync % rl.canary_every == 0:
            t = time.perf_counter()
            with phase("canary"):  # engine vs trainer log-probs of a fixed completion
                stats.add("sync/canary_error", canary.check(engine, model))
            stats.add("time/canary_s", time.perf_counter() - t)

    start_stats = StepStats()
    try:  # the engine loaded the initial checkpoint: after a resume it gets the restored weights first
        sync_and_check(start_stats, 0)
    except SyncError as e:
        raise SyncError(f"before the first rollout: {e}") from None
    summary["sync/canary_error_start"] = start_stats.sums["sync/canary_error"][0] if rl.canary_every else None
    if env_task and resume_from is None and cfg.eval.before:
        play_eval("before", step)

    progress = StepProgress(tc.max_steps, f"{method} {cfg.recipe}", enabled=tc.progress and world.is_main)
    window: dict[str, list[float]] = state["window"] or {}  # per-step metrics since the last log line
    clock = RunClock(state["counters"])
    metrics: dict = {}
    for step in range(start_step + 1, tc.max_steps + 1):
        stats = StepStats()
        with step_phase(step):
            # ---- rollouts: this rank's share of the step's prompts, group_size completions each
            t = time.perf_counter()
            with phase("data"):
                mine = rank_groups(rl.prompts_per_step, rl.updates_per_batch, world)
                step_list = step_prompts(train_prompts, step, rl.prompts_per_step, cfg.seed)
                prompts = [step_list[g] for g in mine]
            if env_task:
                rollouts = play_groups(engine, prompts, sampling, tokenizer, cfg, step=step, round_=0, groups=mine,
                                       stats=stats)
                stats.add("time/generate_s", time.perf_counter() - t)  # the environment's steps included
            else:
                rollouts = generate_groups(engine, prompts, sampling, tokenizer, seed=cfg.seed, step=step, round_=0,
                                           groups=mine)
                stats.add("time/generate_s", time.perf_counter() - t)
                t = time.perf_counter()
                score(rollouts, fns, cfg, stats)
                stats.add("time/reward_s", time.perf_counter() - t)
            for r in rollouts:
                stats.add("reward/mean", r.reward)
                stats.add("train/response_length", r.n_trained)
                stats.add("train/truncated_fraction", r.finish_reason == "length")
            if rl.group_size > 1:  # the spread within groups: what group advantages divide by
                rewards = torch.tensor([r.reward for r in rollouts]).view(-1, rl.group_size)
                stats.add("reward/std", float(rewards.std(dim=1).sum()), rewards.shape[0])
            if dynamic:
                rollouts = keep_informative(rollouts, rl, stats, engine, sampling, tokenizer, fns, cfg, step,
                                            train_prompts, mine, world)
            if rollouts:
                with phase("advantages"):
                    group_advantages(rollouts, rl.group_size, method)

            # ---- the engine sleeps (GPU: KV cache freed, weights offloaded; CPU: a no-op that says so once)
            t = time.perf_counter()
            with phase("engine_sleep"):
                engine.sleep()
            sleep_s = time.perf_counter() - t
            # ---- old / reference log-probs, then the updates on mini-batches of whole groups
            t = time.perf_counter()
            with phase("data"):  # rollouts packed into rows
                all_mbs = micro_batches(rollouts, cfg.data.max_tokens, algo.agg, max_len, world, filler)
            fused_old = on_policy_old(cfg, method)
            if not fused_old or ref_model is not None or critic is not None:
                score_old_and_ref(None if fused_old else model, ref_model, all_mbs, cfg, device, critic)
            stats.add("time/ref_logprobs_s", time.perf_counter() - t)
            with phase("advantages"):
                set_token_advantages(rollouts, method, cfg, world)
            for r in rollouts if not fused_old else []:
                if r.ref_logp is not None and algo.advantage == "teacher_kl":
                    stats.add("train/teacher_kl", float((r.old_logp - r.ref_logp).sum()), r.n_trained)
                gap = (torch.tensor(r.trained_sampler_logp) - r.old_logp).abs()
                stats.add("train/logp_gap_mean", float(gap.sum()), gap.numel())
                stats.add("train/entropy", float(r.entropy.sum()), r.entropy.numel())
            t = time.perf_counter()
            n_groups = len(rollouts) // rl.group_size
            grad_norm = float("nan")
            for u in range(rl.updates_per_batch):
                lo, hi = (u * n_groups // rl.updates_per_batch, (u + 1) * n_groups // rl.updates_per_batch)
                part = rollouts[lo * rl.group_size : hi * rl.group_size]
                with phase("data"):
                    mbs = all_mbs if rl.updates_per_batch == 1 else micro_batches(part, cfg.data.max_tokens,
                                                                                  algo.agg, max_len, world, filler)
                grad_norm = update(model, optimizer, scheduler, mbs, cfg, method, world, device, stats, critic)
            stats.add("time/update_s", time.perf_counter() - t)
            t = time.perf_counter()
            with phase("engine_wake"):
                engine.wake()  # before the sync: the reload writes into the engine's weights
            stats.add("time/sleep_wake_s", sleep_s + time.perf_counter() - t)
            sync_and_check(stats, step)
        clock.add(sum(len(r.prompt.ids) + len(r.token_ids) for r in rollouts))
        metrics = stats.means(world)
        metrics.update({"train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm})
        for k, v in metrics.items():
            window.setdefault(k, []).append(v)
        if step % tc.log_every == 0 or step == tc.max_steps:
            logged = {k: sum(v) / len(v) for k, v in window.items()}
            log.log(step, logged)
            gen_s, update_s = logged.get("time/generate_s", 0), logged.get("time/update_s", 0)
            progress.update(step, f"reward {logged.get('reward/mean', float('nan')):.3f}  gen {gen_s:.1f}s  "
                                  f"update {update_s:.1f}s")
            window = {}
        if checkpoint_due(tc, step):
            save_training_checkpoint(out_dir, step, cfg, world, model=trained, optimizer=optimizer, scheduler=scheduler,
                                     fingerprint=fingerprint, clock=clock, position=(step, 0), summary=summary,
                                     counters={}, window=window)
    progress.close()
    summary.update(clock.totals(loss=metrics.get("train/loss", float("nan")), steps=tc.max_steps))
    summary.update({k: v for k, v in metrics.items() if k.startswith(("reward/", "time/", "sync/"))})
    if env_task and cfg.eval.after:
        play_eval("after", step)
    if cfg.eval.after:
        accuracy("after", step)
    save_final_model(model, tokenizer, out_dir, cfg, world, precision)  # ends at a barrier under torchrun
    close_run(log, summary, device=device, t_start=t_start, out_dir=out_dir)
    barrier(world)
    engine.close()  # last: under torchrun vLLM's shutdown also destroys the default process group
    return summary if world.is_main else None


def keep_informative(rollouts, rl, stats, engine, sampling, tokenizer, fns, cfg, step, train_prompts,
                     mine: list[int], world) -> list[Rollout]:
    """DAPO dynamic sampling: keep groups whose rewards differ, refilling from extra rounds up to rl.max_refills.
    Every rank runs a refill round while any rank still needs one (the HF engine under FSDP must make the same
    generate calls on every rank)."""
    def informative(rs):
        g = torch.tensor([r.reward for r in rs]).view(-1, rl.group_size)
        keep = informative_groups(g)
        return [r for i, r in enumerate(rs) if keep[i // rl.group_size]]

    kept = informative(rollouts)
    stats.add("train/informative_fraction", len(kept) / max(1, len(rollouts)))
    for round_ in range(1, rl.max_refills + 1):
        (short,) = all_reduce_sum([float(len(kept) < len(mine) * rl.group_size)], world)
        if not short:
            break
        extra = step_prompts(train_prompts, step, len(mine), cfg.seed + mine[0], round_)
        t = time.perf_counter()
        more = generate_groups(engine, extra, sampling, tokenizer, seed=cfg.seed, step=step, round_=round_,
                               groups=mine)
        stats.add("time/generate_s", time.perf_counter() - t)
        score(more, fns, cfg, StepStats())
        kept += informative(more)
    kept = kept[: len(mine) * rl.group_size]
    stats.add("train/kept_groups", len(kept) // rl.group_size)
    return kept  # may be empty: the step then makes no update (FSDP ranks run zero-weight fillers)
