"""Dataclass configs filled from a recipe or YAML file plus dotted `key.sub=value` overrides.

Validation is strict and happens before any model loads: an unknown key (with a did-you-mean),
a value of the wrong type, or a missing required field raises ConfigError naming the key. This module is a
leaf (it imports only optsys.errors and optsys.methods): the checks that need other modules live in
optsys.validation, whose load_config is what a run uses.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from optsys.errors import ConfigError, did_you_mean

RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass
class LoraConfig:
    """LoRA / QLoRA adapters through peft. r = 0 trains the full model."""

    r: int = 0
    alpha: int = 16
    dropout: float = 0.0
    # None: the attention and MLP projections of the architecture (see optsys.models.lora).
    target_modules: Optional[list[str]] = None
    quantize: Literal["none", "nf4"] = "none"  # nf4 = QLoRA: 4-bit frozen base via bitsandbytes
    save_merged: bool = False  # also write <output_dir>/final-merged/, base + adapter as one HF model


@dataclass
class ModelConfig:
    # "tiny:<preset>" (built by optsys.models.tiny), "stage:<recipe>" (that shipped recipe's final model, trained
    # first or reused from the cache: optsys/stages.py), a local Hugging Face folder, or a hub id.
    name_or_path: str = "tiny:quickstart"
    revision: Optional[str] = None
    # How weights are stored: loaded in this dtype and final/ written in it. Training keeps fp32 master weights
    # and optimizer state whatever it is; trainer.precision says what the matmuls run in.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # "auto": flash_attention_2 on CUDA when installed (varlen, packing by position_ids), else sdpa: one call per
    # packed row under a dense block-diagonal mask (T^2 work for a row of T tokens). "sdpa_varlen": sdpa once per
    # packed sequence (optsys.models.attention; 1.71x faster SFT steps in bench/e2e.py, not yet the default: see
    # there). "eager" works too (additive mask).
    attn_implementation: Literal["auto", "sdpa", "sdpa_varlen", "eager", "flash_attention_2"] = "auto"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    # Either a built-in task (optsys.data.tasks) or a dataset: file (.jsonl/.json/.parquet),
    # local folder, or hub id, with rows in `messages`, `prompt`/`completion` or `text` form.
    task: Optional[str] = "arithmetic"
    dataset: Optional[str] = None
    split: str = "train"
    eval_dataset: Optional[str] = None
    eval_split: str = "test"
    num_train: int = 5000  # built-in tasks: rows generated for training
    num_eval: int = 200  # built-in tasks: held-out rows for accuracy / eval loss
    difficulty: int = 2  # built-in tasks: digits (arithmetic), list length (sorting), steps (word_problems)
    # Tokens per packed micro-batch row, the unit a rank runs forward+backward on (the per-rank micro-batch);
    # also the per-sequence (per-pair, for preference data) limit.
    max_tokens: int = 2048
    overlong: Literal["error", "truncate", "skip"] = "error"
    train_on_prompt: bool = False  # loss on prompt tokens too (default: assistant tokens only)
    packing: bool = True  # False: padded batches (a baseline; slower)
    # Preference / reward data: a bad pair (chosen == rejected, empty completion, prompts that differ,
    # a non-boolean KTO label) is an error, or with "skip" dropped and counted (data/skipped_bad_pair).
    on_bad_pair: Literal["error", "skip"] = "error"


@dataclass
class TrainerConfig:
    max_steps: int = 300
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    # GLOBAL tokens per optimizer step, all ranks together: each step packs micro-batches of <= data.max_tokens
    # up to this many tokens, and each rank runs its round-robin share of them (so about batch_tokens /
    # world_size tokens per rank). The measured numbers are printed at start and written as batch/* in summary.
    batch_tokens: int = 4096
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # Compute dtype (optsys/trainers/precision.py): bf16 = mixed precision (fp32 master weights and AdamW state,
    # bf16 matmuls: autocast on one device, FSDP2 bf16 all-gathers + fp32 reduce-scatter under torchrun);
    # fp32 = all fp32; auto = bf16 on a CUDA device with bf16, else fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    kernel_backend: Literal["auto", "torch", "hybrid", "triton"] = "auto"
    log_every: int = 10
    # steps between held-out evals (SFT, preference, reward: eval/loss and the method's eval metrics; RL: greedy
    # held-out accuracy eval/accuracy, or a multi-turn task's success rates); 0 = only at the end
    eval_every: int = 0
    progress: bool = True
    # Telemetry besides metrics.jsonl (optsys/telemetry), all on rank 0: TensorBoard event files in
    # <output_dir>/tensorboard/ (the same metric names), PNG curves in <output_dir>/plots/ when the run ends, and a
    # W&B run (needs `pip install wandb`; offline, files in <output_dir>/wandb/, unless WANDB_MODE is set).
    tensorboard: bool = True
    plots: bool = True
    wandb: bool = False
    wandb_project: str = "optsys"  # W&B project (with trainer.wandb=true); the run is named after output_dir
    # Named phases (data, forward, loss.*, backward, optimizer, generate, weight_sync, ...) as NVTX ranges and
    # torch.profiler ranges (optsys/telemetry/nvtx.py; ~1 us each); false removes them.
    telemetry: bool = True
    save_every: int = 0  # steps between checkpoints (<output_dir>/checkpoints/); 0 = only at the end
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted after each save


@dataclass
class ParallelConfig:
    """How the ranks torchrun starts share the model (one process is a world of one)."""

    # fsdp2: torch's fully_shard, one unit per decoder layer (every method). deepspeed: DeepSpeed ZeRO
    # (method=sft; `pip install deepspeed`), its generated config in <output_dir>/deepspeed_config.json.
    backend: Literal["fsdp2", "deepspeed"] = "fsdp2"
    # backend=deepspeed: 2 partitions AdamW state and gradients over the ranks, 3 the weights too.
    zero_stage: int = 2


@dataclass
class EvalConfig:
    before: bool = True  # greedy task accuracy before training (eval/accuracy_before)
    after: bool = True  # and after (eval/accuracy_after)
    max_new_tokens: int = 16
    batch_size: int = 100
    # method=sft: the held-out loss (eval/loss, at the end and every trainer.eval_every steps) runs on the first
    # this many held-out rows; 0 = all of them. A forward over every row of a large held-out set would make the
    # run's tail long (500 rows of a 135M model, each with its template's system prompt: ~5 min on 2 cores).
    loss_max_rows: int = 200


@dataclass
class PreferenceConfig:
    """Preference optimization (method dpo | ipo | robust | simpo | orpo | cpo | kto); see optsys.losses.preference."""

    beta: float = 0.1  # DPO/IPO/rDPO/CPO/KTO temperature; SimPO reward scale (its paper uses ~2)
    label_smoothing: float = 0.0  # cDPO / rDPO label-flip rate eps, in [0, 0.5)
    gamma: float = 1.0  # SimPO target reward margin
    lam: float = 0.1  # ORPO odds-ratio weight
    alpha: float = 1.0  # CPO NLL weight
    # RPO (Pang et al. 2024; TRL's rpo_alpha): dpo | robust | ipo | simpo add rpo_alpha x the mean NLL per chosen
    # token of each optimizer step (logged as train/nll_chosen). None = off. Keeps the chosen answers likely when
    # DPO alone pushes both sides of near-miss pairs down. (orpo and cpo have their own NLL term.)
    rpo_alpha: Optional[float] = None
    desirable_weight: float = 1.0  # KTO lambda_D
    undesirable_weight: float = 1.0  # KTO lambda_U
    # Methods with a reference model: "precompute" scores the training pairs once with the initial model
    # and caches them in <output_dir>/ref_logps.safetensors; "copy" keeps a frozen copy in memory;
    # "adapters_off" (LoRA only) runs the same model with its adapters disabled.
    reference: Literal["precompute", "copy", "adapters_off"] = "precompute"
    # The reference checkpoint (hub id, folder, tiny:<preset>, stage:<recipe>) for precompute / copy; None = the
    # policy's initial weights. It must share the policy's tokenizer and architecture (checked at load).
    reference_model: str | None = None
    # Where the training pairs come from: "task" = the data's own (a built-in task's correct answer vs a near miss,
    # or a dataset's chosen/rejected rows); "on_policy" = the start model's own samples of each training prompt,
    # checked against its answer by the task's match rule: a correct one is chosen, an incorrect one rejected
    # (optsys.trainers.pairs; a built-in task, or data.dataset rows with `prompt` and `answer`). The pairs are
    # written to <output_dir>/pairs.jsonl and reused on resume.
    pairs: Literal["task", "on_policy"] = "task"
    pair_samples: int = 8  # on_policy: completions per prompt (>= 2: a pair needs a correct and an incorrect one)
    # on_policy: sampling temperature. 0.7 keeps samples near what the model decodes greedily (its real errors, not
    # T=1 noise) while leaving enough spread that a prompt's samples disagree; raise it when most prompts come
    # back all correct.
    pair_temperature: float = 0.7
    pair_max_new_tokens: Optional[int] = None  # on_policy: None = eval.max_new_tokens (the held-out answer budget)
    # on_policy: the sampler. auto: vLLM in this process when installed (HF generate under torchrun or QLoRA)
    pair_engine: Literal["auto", "vllm", "hf"] = "auto"


@dataclass
class RewardConfig:
    """Reward model (method rm): Bradley-Terry -log sigma(r_c - r_r - margin) + center_coef * (r_c + r_r)^2."""

    margin: float = 0.0  # used where a row has no `margin` field
    center_coef: float = 0.0  # keeps rewards centred at 0 (0.01 is common)


@dataclass
class RLConfig:
    """Reinforcement learning (methods grpo | dr_grpo | dapo | gspo | cispo | rloo | reinforce_pp | distill | ppo); see
    optsys.trainers.rl. A rollout step samples rl.group_size completions for each of rl.prompts_per_step prompts,
    scores them, and makes rl.updates_per_batch optimizer steps on them; trainer.max_steps counts rollout steps."""

    engine: Literal["auto", "vllm", "hf"] = "auto"  # auto: vLLM in this process when installed, else HF generate
    prompts_per_step: int = 16  # GLOBAL prompts per rollout step (split over ranks)
    group_size: int = 8  # completions per prompt (the group GRPO normalizes over)
    updates_per_batch: int = 1  # optimizer steps per rollout step: its groups split into this many mini-batches
    max_new_tokens: int = 16
    temperature: float = 1.0  # sampling temperature; the trainer's log-probs use the same one
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    # Reward functions (optsys.rollout.rewards registry names, or a dotted path "pkg.module.fn"), summed with
    # reward_weights (None: all 1). A function that raises or exceeds reward_timeout_s stops the run naming it and
    # the sample, or with on_reward_error=zero scores 0 and is counted (reward/errors_<name>).
    rewards: list[str] = field(default_factory=lambda: ["correct"])
    reward_weights: Optional[list[float]] = None
    reward_timeout_s: float = 30.0
    on_reward_error: Literal["error", "zero"] = "error"
    clip_eps: Optional[float] = None  # None: the method's default (0.2; GSPO 3e-4)
    clip_eps_high: Optional[float] = None  # None: the method's default (= clip_eps; DAPO 0.28; GSPO 4e-4)
    # KL to the initial policy (0: no reference model is kept). GRPO family: kl_coef x an estimate per token in the
    # loss; ppo and reinforce_pp: -kl_coef x k1 in every token's reward instead (never both).
    kl_coef: float = 0.0
    # None: the method's. In the loss k2 (expected gradient: grad KL(pi||ref)) or k3 (GRPO's, the default: grad
    # KL(ref||pi)); k1 is refused there, its expected gradient is 0. In the reward (ppo, reinforce_pp) k1 only:
    # a reward's gradient E[k grad log pi] is grad KL(pi||ref) for k1 alone.
    kl_estimator: Optional[Literal["k1", "k2", "k3"]] = None
    # Sampler-vs-trainer mismatch: importance weights old / sampler per token, truncated above correction_cap (tis)
    # or masked outside [1 / correction_cap, correction_cap] per token (mis_token) or per sequence's geometric mean
    # (mis_seq); "none" trusts the sampler (see optsys.losses.policy.sampler_correction).
    sampler_correction: Literal["none", "tis", "mis_token", "mis_seq"] = "tis"
    correction_cap: float = 2.0
    # DAPO's dynamic sampling (None: DAPO only): drop the groups whose completions are all right or all wrong
    # (eq. 11), refill. Right = the answer check: rl.rewards' `correct` (else its `numeric`), else the `correct`
    # rule; rows without an answer: the groups whose rl.rewards sum is all equal. Never on the overlong penalty.
    dynamic_sampling: Optional[bool] = None
    max_refills: int = 2  # extra generation rounds per step for dynamic sampling
    overlong_buffer: int = 0  # DAPO soft overlong punishment over the last this-many tokens (0: off)
    sync_bucket_mb: float = 256.0  # weight-sync bucket: the most extra memory a sync holds
    # the canary (engine vs trainer log-probs of a fixed completion) checks the sync before the first rollout, the
    # first after an update, every canary_every-th and the last (optsys.trainers.rl.canary_due); 1: every sync.
    # 10, not 1: a sync that does not take shows at its first check after an update, and each check costs a
    # trainer forward and an engine call (13 ms of a 0.2 s step in bench/e2e.py's GRPO, 6%)
    canary_every: int = 10
    canary_tolerance: float = 1e-4  # max |log-prob difference| (fp32; a bf16 engine needs ~5e-2)
    # completions written to <output dir>/completions.jsonl every trainer.log_every steps, with their prompt, reward
    # (and each reward function's value) and advantage: a sample of rank 0's rollouts of that step. 0: off
    log_completions: int = 4
    engine_memory_fraction: float = 0.3  # GPU memory vLLM may take (weights + KV cache)
    # vLLM engines split over this many consecutive ranks (tensor parallel); each group of ranks generates its
    # ranks' prompts together. 1: an engine per rank holding the whole policy
    engine_tensor_parallel: int = 1
    # LoRA: "merged" folds the adapter into the base weights and streams those, a full-weight sync a step, so vLLM
    # generates with no LoRA kernels (2.5x faster on CPU, bench/README.md "Generation"; vLLM's LoRA path costs
    # ~1.35x per output token on GPUs; TRL also merges before its vLLM sync). "adapter" syncs only the adapter
    # (a few MB, in memory, in place): for a policy too large to re-sync every step
    lora_sync: Literal["adapter", "merged"] = "merged"
    max_turns: int = 4  # multi-turn tasks (data.task=guess): model turns per episode before it is cut (counted)
    # method=ppo: the critic (a copy of the policy with a value head) and GAE; rl.kl_coef goes into the reward
    critic_lr: Optional[float] = None  # None: trainer.lr
    value_clip: float = 0.2
    gamma: float = 1.0
    gae_lambda: float = 0.95
    # method=distill: the teacher (folder, hub id, tiny:<preset> or stage:<recipe>) that scores the student's
    # samples; it must share the student's tokenizer
    teacher: Optional[str] = None


@dataclass
class TrainConfig:
    recipe: str = "quickstart"
    # a name in optsys.methods.METHODS: sft, dpo, ipo, robust, simpo, orpo, cpo, kto, rm, grpo, dr_grpo, dapo,
    # gspo, cispo, rloo, reinforce_pp, distill, ppo
    method: str = "sft"
    output_dir: Optional[str] = None  # default ./runs/<recipe>-<timestamp>/
    overwrite: bool = False  # allow writing into a folder that holds another run
    resume: bool = False  # continue the run in output_dir from its latest complete checkpoint
    seed: int = 0
    device: str = "auto"  # auto: cuda if available, else cpu
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pref: PreferenceConfig = field(default_factory=PreferenceConfig)
    rm: RewardConfig = field(default_factory=RewardConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def validate(self) -> None:
        """Refuse, naming the key, every setting that this config alone shows to be out of range, contradictory
        or ignored by the method. The checks that need other modules (tasks, rewards, model sources and
        stages, W&B, DeepSpeed) run in optsys.validation, whose load_config runs both before any model loads."""
        check_method_name(self)
        for check in LOCAL_VALIDATORS:
            check(self)


# ---------------------------------------------------------------------------- validation
# Each check takes the whole TrainConfig and raises ConfigError naming the key(s) and what to do.

def _at_least(low):
    return lambda v: v >= low, f">= {low}"


def _positive():
    return lambda v: v > 0, "positive (> 0)"


def _in(low, high, closed_high=False):
    if closed_high:
        return lambda v: low <= v <= high, f"in [{low}, {high}]"
    return lambda v: low <= v < high, f"in [{low}, {high})"


# (dotted key, (test, wording)): numeric ranges. Task-only keys (data.num_train, ...) are checked with the task.
RANGES = [
    ("model.lora.r", _at_least(0)),
    ("model.lora.alpha", _positive()),
    ("model.lora.dropout", _in(0, 1)),
    ("data.max_tokens", _positive()),
    ("trainer.max_steps", _positive()),
    ("trainer.lr", _positive()),
    ("trainer.min_lr_ratio", _in(0, 1, closed_high=True)),
    ("trainer.warmup_steps", _at_least(0)),
    ("trainer.weight_decay", _at_least(0)),
    ("trainer.betas[0]", _in(0, 1)),
    ("trainer.betas[1]", _in(0, 1)),
    ("trainer.batch_tokens", _positive()),
    ("trainer.grad_clip", _at_least(0)),
    ("trainer.log_every", _positive()),
    ("trainer.eval_every", _at_least(0)),
    ("trainer.save_every", _at_least(0)),
    ("trainer.keep_last", _at_least(1)),
    ("eval.max_new_tokens", _positive()),
    ("eval.batch_size", _positive()),
    ("eval.loss_max_rows", _at_least(0)),
    ("pref.beta", _positive()),
    ("pref.label_smoothing", _in(0, 0.5)),
    ("pref.gamma", _at_least(0)),
    ("pref.lam", _positive()),
    ("pref.alpha", _at_least(0)),
    ("pref.desirable_weight", _at_least(0)),
    ("pref.undesirable_weight", _at_least(0)),
    ("pref.pair_samples", _at_least(2)),
    ("pref.pair_temperature", _positive()),
    ("rm.center_coef", _at_least(0)),
    ("rl.prompts_per_step", _positive()),
    ("rl.updates_per_batch", _positive()),
    ("rl.max_new_tokens", _positive()),
    ("rl.temperature", _positive()),
    ("rl.top_p", (lambda v: 0 < v <= 1, "in (0, 1]")),
    ("rl.top_k", _at_least(0)),
    ("rl.reward_timeout_s", _positive()),
    ("rl.kl_coef", _at_least(0)),
    ("rl.correction_cap", _positive()),
    ("rl.max_refills", _at_least(0)),
    ("rl.overlong_buffer", _at_least(0)),
    ("rl.sync_bucket_mb", _positive()),
    ("rl.canary_every", _at_least(0)),
    ("rl.canary_tolerance", _positive()),
    ("rl.log_completions", _at_least(0)),
    ("rl.engine_memory_fraction", _in(0, 1)),
    ("rl.engine_tensor_parallel", _at_least(1)),
    ("rl.max_turns", _at_least(1)),
    ("rl.value_clip", _positive()),
    ("rl.gamma", _in(0, 1, closed_high=True)),
    ("rl.gae_lambda", _in(0, 1, closed_high=True)),
]
RANGE_HINTS = {
    "trainer.grad_clip": " (0 disables clipping)",
    "trainer.save_every": " (0 = checkpoint only at the end)",
    "trainer.keep_last": " (a resume needs a checkpoint)",
    "trainer.min_lr_ratio": " (the cosine schedule ends at lr * min_lr_ratio)",
    "pref.label_smoothing": " (the label-flip rate eps; 0.5 makes chosen and rejected interchangeable)",
    "pref.beta": " (beta = 0 makes every preference loss constant)",
    "pref.pair_samples": " (a pair needs a correct and an incorrect sample of the same prompt)",
    "pref.pair_temperature": " (at 0 every sample of a prompt is the same greedy answer: no pairs)",
    "model.lora.r": " (0 trains the full model)",
    "rl.canary_every": " (0 turns the sync check off)",
    "rl.log_completions": " (0 writes no completions.jsonl)",
    "rl.top_p": " (1 = no truncation)",
}


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.replace("[", ".").replace("]", "").split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def _float_fields(obj, prefix: str = ""):
    """(dotted key, value) of every float in the config tree, tuples included."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _float_fields(value, f"{key}.")
        elif isinstance(value, tuple):
            yield from ((f"{key}[{i}]", v) for i, v in enumerate(value) if isinstance(v, float))
        elif isinstance(value, float):
            yield key, value


def check_ranges(cfg: TrainConfig) -> None:
    import math

    for key, value in _float_fields(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
    for key, (ok, wording) in RANGES:
        value = _get(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key} must be {wording}{RANGE_HINTS.get(key, '')}, got {value!r}")
    if cfg.trainer.batch_tokens < cfg.data.max_tokens and not is_rl(cfg):
        raise ConfigError(
            f"trainer.batch_tokens={cfg.trainer.batch_tokens} is less than data.max_tokens={cfg.data.max_tokens}: "
            "a step holds at least one packed row of up to data.max_tokens tokens, so the step would be bigger "
            "than trainer.batch_tokens. Raise trainer.batch_tokens or lower data.max_tokens.")


def check_method_name(cfg: TrainConfig) -> None:
    from optsys.methods import METHODS

    if cfg.method not in METHODS:
        raise ConfigError(f"method={cfg.method!r} is not a training method{did_you_mean(cfg.method, METHODS)}")


def check_data_source(cfg: TrainConfig) -> None:
    """Exactly one data source (the task's own checks are in optsys.validation)."""
    d = cfg.data
    if (d.task is None) == (d.dataset is None):
        raise ConfigError(
            "set exactly one of data.task (a built-in task) and data.dataset (a file, folder "
            f"or hub id); got data.task={d.task!r}, data.dataset={d.dataset!r}"
        )


def check_method(cfg: TrainConfig) -> None:
    """Settings this method would ignore are refused (a setting that is accepted is honoured)."""
    from optsys.methods import METHODS

    d, m, defaults = cfg.data, cfg.method, TrainConfig()
    method = METHODS[m]
    if m != "sft":
        if d.train_on_prompt:
            raise ConfigError(f"data.train_on_prompt=true applies to method=sft; method={m} scores completions "
                              "only (the prompt is shared by both sides of a pair). Drop data.train_on_prompt.")
        if not d.packing:
            raise ConfigError(f"data.packing=false (padded batches) is implemented for method=sft only; method={m} "
                              "always packs whole pairs. Drop data.packing=false.")
        if cfg.eval.loss_max_rows != defaults.eval.loss_max_rows:
            raise ConfigError(f"eval.loss_max_rows sizes the held-out loss of method=sft; method={m} computes no "
                              "eval/loss. Drop eval.loss_max_rows.")
    elif d.on_bad_pair != defaults.data.on_bad_pair:
        users = ", ".join(n for n, spec in METHODS.items() if spec.section)
        raise ConfigError(f"data.on_bad_pair applies to preference and reward data (methods {users}); "
                          "method=sft does not use it. Drop it.")
    refuse_unused_settings(cfg, method, METHODS)
    if method.section == "pref":
        _check_pref_keys(cfg, method)


def is_rl(cfg: TrainConfig) -> bool:
    from optsys.methods import METHODS

    return cfg.method in METHODS and METHODS[cfg.method].section == "rl"


def refuse_unused_settings(cfg: TrainConfig, method, methods) -> None:
    """A family setting the chosen method would ignore is an error naming the key: another family's section
    changed from its defaults (rm.margin with method=dpo), a loss hyper-parameter of its own family that its
    loss does not take (pref.label_smoothing with method=ipo, pref.gamma with method=dpo), or a reference
    setting for a reference-free method. The families and hyper-parameters come from optsys.methods."""
    from optsys.methods import FAMILY_SECTIONS

    for name in FAMILY_SECTIONS:
        section = getattr(cfg, name)
        default = type(section)()
        changed = [f"{name}.{f.name}={getattr(section, f.name)!r}" for f in dataclasses.fields(section)
                   if getattr(section, f.name) != getattr(default, f.name)]
        if not changed:
            continue
        if name != method.section:
            users = sorted(m for m, spec in methods.items() if spec.section == name)
            drop = " ".join(f"{c.split('=', 1)[0]}=null" for c in changed)
            raise ConfigError(f"{', '.join(changed)}: method={cfg.method} does not read the {name} section "
                              f"(its methods: {', '.join(users)}); drop the setting (from the command line: {drop} "
                              "resets it to its default) or pick one of those methods")
        family_hyper = {k for spec in methods.values() if spec.section == name for k in spec.hyper}
        for key in sorted(family_hyper - set(method.hyper)):
            if getattr(section, key) != getattr(default, key):
                users = [m for m, spec in methods.items() if spec.section == name and key in spec.hyper]
                raise ConfigError(
                    f"{name}.{key}={getattr(section, key)!r} is not used by method={cfg.method} (methods whose "
                    f"loss takes it: {', '.join(users)}); drop it (from the command line: {name}.{key}=null resets "
                    "a recipe's value to the default), or pick one of those methods")


def _check_pref_keys(cfg: TrainConfig, method) -> None:
    m, p, defaults = cfg.method, cfg.pref, PreferenceConfig()
    _check_pair_keys(cfg)
    _check_rpo_alpha(cfg, method)
    if m == "kto" and p.desirable_weight == 0 and p.undesirable_weight == 0:
        raise ConfigError("pref.desirable_weight and pref.undesirable_weight are both 0, so the KTO loss is 0; "
                          "set at least one > 0")
    if not method.reference:
        if p.reference_model is not None:
            raise ConfigError(f"method={m} is reference-free: drop pref.reference_model")
        if p.reference != defaults.reference:
            raise ConfigError(f"pref.reference={p.reference} has no effect: method={m} is reference-free; "
                              "drop pref.reference")
        return
    if p.reference == "adapters_off" and cfg.model.lora.r == 0:
        raise ConfigError("pref.reference=adapters_off needs LoRA (model.lora.r > 0); use "
                          "pref.reference=precompute or copy for full fine-tuning")
    if p.reference_model is not None and p.reference == "adapters_off":
        raise ConfigError("pref.reference_model cannot be used with pref.reference=adapters_off (the "
                          "reference is the policy with its adapters disabled); use precompute or copy")


def _check_rpo_alpha(cfg: TrainConfig, method) -> None:
    """pref.rpo_alpha: a number > 0, with a paired loss that has no NLL term of its own."""
    import math

    from optsys.methods import METHODS

    alpha, m = cfg.pref.rpo_alpha, cfg.method
    if alpha is None:
        return
    if not method.rpo:
        takers = ", ".join(n for n, spec in METHODS.items() if spec.rpo)
        why = {"orpo": "method=orpo already has an NLL term on the chosen responses (its L_SFT, always on)",
               "cpo": "method=cpo already has an NLL term on the chosen responses, weighted by pref.alpha (set that "
                      "instead)",
               "kto": "method=kto is unpaired: its rows have no chosen response"}.get(m, f"method={m} does not take it")
        raise ConfigError(f"pref.rpo_alpha={alpha!r} (an NLL term on the chosen responses, for methods {takers}): "
                          f"{why}. Drop pref.rpo_alpha (from the command line: pref.rpo_alpha=null)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"pref.rpo_alpha must be a finite number > 0, got {alpha!r} (null turns the NLL term off; "
                          "1.0 is the RPO paper's)")


PAIR_KEYS = ("pair_samples", "pair_temperature", "pair_max_new_tokens", "pair_engine")


def _check_pair_keys(cfg: TrainConfig) -> None:
    """pref.pair_* only with pref.pairs=on_policy, and a sampling budget that fits data.max_tokens."""
    p, defaults = cfg.pref, PreferenceConfig()
    if p.pairs != "on_policy":
        changed = [f"pref.{k}={getattr(p, k)!r}" for k in PAIR_KEYS if getattr(p, k) != getattr(defaults, k)]
        if changed:
            raise ConfigError(f"{', '.join(changed)} applies to pref.pairs=on_policy (pairs sampled from the start "
                              f"model); pref.pairs={p.pairs} takes the data's own pairs. Drop it, or set "
                              "pref.pairs=on_policy")
        return
    budget = p.pair_max_new_tokens or cfg.eval.max_new_tokens
    if p.pair_max_new_tokens is not None and p.pair_max_new_tokens < 1:
        raise ConfigError(f"pref.pair_max_new_tokens must be >= 1 (or null: eval.max_new_tokens), got "
                          f"{p.pair_max_new_tokens}")
    if budget >= cfg.data.max_tokens:
        raise ConfigError(f"pref.pair_max_new_tokens={budget} leaves no room for the prompt in data.max_tokens="
                          f"{cfg.data.max_tokens} (a sampled completion and its prompt must fit a sequence); raise "
                          "data.max_tokens or lower pref.pair_max_new_tokens")
    if p.pair_engine == "vllm" and launcher_world_size() > 1:
        raise ConfigError("pref.pair_engine=vllm under torchrun is not supported (vLLM's shutdown after sampling would "
                          "end the trainer's process group); use pref.pair_engine=hf or auto")
    if p.pair_engine == "vllm" and cfg.model.lora.quantize != "none":
        raise ConfigError(f"pref.pair_engine=vllm with model.lora.quantize={cfg.model.lora.quantize}: vLLM would "
                          "sample the unquantized base, not the 4-bit start model; use pref.pair_engine=hf or auto")


def check_lora(cfg: TrainConfig) -> None:
    lora = cfg.model.lora
    if lora.quantize != "none" and lora.r == 0:
        raise ConfigError(f"model.lora.r must be > 0 for QLoRA (model.lora.quantize={lora.quantize!r}); got 0")
    if lora.target_modules is not None and not lora.target_modules:
        raise ConfigError("model.lora.target_modules is an empty list; name modules (e.g. [q_proj, v_proj]) or "
                          "set it to null for the architecture's attention and MLP projections")
    if lora.save_merged:
        if lora.r == 0:
            raise ConfigError("model.lora.save_merged=true merges LoRA adapters, but model.lora.r=0 trains the full "
                              "model (final/ already holds plain weights). Drop model.lora.save_merged.")
        if cfg.method == "rm":
            raise ConfigError("method=rm always writes merged weights to final/ (the adapter to final-adapter/); "
                              "drop model.lora.save_merged")
        if launcher_world_size() > 1:
            raise ConfigError("model.lora.save_merged=true is not supported under torchrun yet (final/ is written "
                              "from the gathered shards); drop it and merge afterwards in one process, or train "
                              "in one process.")


def launcher_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 without a launcher)."""
    import os

    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def check_device(cfg: TrainConfig) -> None:
    import re

    name = cfg.device
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if name not in ("auto", "cpu") and match is None:
        raise ConfigError(f"device={name!r} is not supported; use auto, cpu, cuda or cuda:<index>")
    if match is None:
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available here; use device=auto or device=cpu")
    if match.group(1) is not None:
        index, count = int(match.group(1)), torch.cuda.device_count()
        if index >= count:
            raise ConfigError(f"device={name}, but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        if launcher_world_size() > 1:
            raise ConfigError(f"device={name}: under torchrun each rank uses cuda:<LOCAL_RANK>; set device=cuda "
                              "or auto (choose GPUs with CUDA_VISIBLE_DEVICES)")


def check_run(cfg: TrainConfig) -> None:
    if cfg.output_dir is not None and not cfg.output_dir.strip():
        raise ConfigError("output_dir is empty (output_dir=); name a folder, e.g. output_dir=runs/a, or leave the key "
                          "out for runs/<recipe>-<timestamp>")
    if cfg.resume and cfg.output_dir is None:
        raise ConfigError("resume=true needs output_dir=<the folder of the run to continue>")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("resume=true continues the run in output_dir and overwrite=true replaces it; "
                          "pass only one of them")


def check_folder_creatable(path: str, key: str) -> None:
    """ConfigError naming `key` unless folder `path` exists or can be made: no file in its place or above it,
    and the nearest existing folder writable (a filesystem that refuses anyway is caught where the folder is made)."""
    p = Path(os.path.expanduser(str(path))).absolute()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}={path} is a file; point it at a folder (it is created if missing)")
    above = p
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise ConfigError(f"{key}={path} cannot be created: {above} is a file, not a folder; pick another {key}")
    if not os.access(above, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path} cannot be created: {above} is not writable by this user; pick another "
                          f"{key}")


def check_parallel_keys(cfg: TrainConfig) -> None:
    """parallel.zero_stage only with parallel.backend=deepspeed (the backend's own checks: optsys.validation)."""
    par = cfg.parallel
    if par.backend != "deepspeed" and par.zero_stage != ParallelConfig().zero_stage:
        raise ConfigError(f"parallel.zero_stage={par.zero_stage} applies to parallel.backend=deepspeed; "
                          f"parallel.backend={par.backend} does not read it. Drop it, or set "
                          "parallel.backend=deepspeed")


# The checks that need only the config, in the order optsys.validation runs them among its own.
LOCAL_VALIDATORS = (check_ranges, check_lora, check_data_source, check_method, check_device, check_run,
                    check_parallel_keys)


# ---------------------------------------------------------------------------- loading


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the annotated type, or raise naming the key."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        if isinstance(value, str):  # "a,b" or "[a, b]" on the command line
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} expects a list like [q_proj, v_proj], got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        inner = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(inner):
            raise ConfigError(f"{key} expects a list of {len(inner)} values like [0.9, 0.95], got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, inner)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} expects true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key} expects a number, got {value!r}")
        try:
            # YAML reads 2e-5 as a string (YAML 1.1 wants 2.0e-5): parse numbers ourselves.
            out = tp(value) if not isinstance(value, str) else tp(float(value) if tp is float else int(value))
        except (TypeError, ValueError):
            raise ConfigError(f"{key} expects {'an integer' if tp is int else 'a number'}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{key} expects an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key} expects a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported config type {tp}")  # a bug in this file, not user input


def merge_into(obj: Any, data: dict, prefix: str = "") -> None:
    """Set fields of dataclass `obj` from a nested dict, strictly."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} expects a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}{did_you_mean(key, names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            merge_into(current, value, prefix=f"{full}.")
        elif _is_null(value) and not _allows_none(hints[key]):  # key=null drops a recipe's value: the default
            setattr(obj, key, getattr(type(obj)(), key))
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() == "null")


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _set_dotted(data: dict, dotted: str, value: str) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides, *, example: str) -> None:
    """Set each `key.sub=value` override into the nested dict (values are coerced later, by merge_into)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like {example}")
        key, value = item.split("=", 1)
        _set_dotted(data, key.strip(), value)


def recipe_path(name: str) -> Path:
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.exists():
        if (RECIPES_DIR / "eval" / f"{name}.yaml").exists():
            raise ConfigError(f"{name!r} is an eval recipe, not a training one: run it with "
                              f"python -m optsys.eval --recipe {name}")
        names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown recipe {name!r}{did_you_mean(name, names)}. Recipes live in {RECIPES_DIR}.")
    return path


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (safe_load keeps the last, silently)."""


def _mapping_without_duplicates(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping (lines {seen[key] + 1} and "
                f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        with open(path, encoding="utf-8") as f:  # a stream: YAML's error marks name the file
            data = yaml.load(f, Loader=_StrictLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 ({e}); save it as UTF-8") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; pass a YAML file to --config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def read_config(recipe: str | None = None, config_file: str | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults <- recipe (or config file) <- overrides, with the config's own checks (TrainConfig.validate).
    A run loads its config through optsys.validation.load_config, which adds the checks that need other modules."""
    if recipe and config_file:
        raise ConfigError("pass either --recipe or --config, not both")
    if config_file:
        data, name = read_yaml(Path(config_file)), Path(config_file).stem
    else:
        name = recipe or "quickstart"
        data = read_yaml(recipe_path(name))
    data.setdefault("recipe", name)
    apply_overrides(data, overrides, example="key.sub=value (e.g. trainer.lr=2e-5)")
    cfg = TrainConfig()
    merge_into(cfg, data)
    cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts; a TrainConfig keeps only its own method family's section (a DPO run's
    config.yaml has `pref`, not `rm`)."""
    out = dataclasses.asdict(cfg)
    if isinstance(cfg, TrainConfig):
        out = drop_other_sections(out)

    def fix(x):  # tuples -> lists so YAML stays plain
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        return list(x) if isinstance(x, tuple) else x

    return fix(out)


def drop_other_sections(data: dict) -> dict:
    """A config dict without the family sections its `method` does not read."""
    from optsys.methods import FAMILY_SECTIONS, METHODS

    method = METHODS.get(data.get("method", "sft"))
    own = method.section if method else None
    return {k: v for k, v in data.items() if k not in FAMILY_SECTIONS or k == own}


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
