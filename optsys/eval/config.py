"""The eval config: one dataclass, filled like training's (recipe or YAML file <- flags <- key=value overrides),
checked strictly before any model loads. Eval recipes live in optsys/recipes/eval/."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from optsys.config import RECIPES_DIR, ConfigError, apply_overrides, check_folder_creatable, merge_into, read_yaml
from optsys.errors import did_you_mean
from optsys.models.sources import check_local_source

EVAL_RECIPES_DIR = RECIPES_DIR / "eval"


@dataclass
class EvalRunConfig:
    model: str | None = None  # HF folder, hub id, tiny:<preset> or stage:<recipe>
    compare: list[str] = field(default_factory=list)  # two models on the same questions and samples: [A, B]
    endpoint: str | None = None  # an OpenAI-compatible server (e.g. python -m optsys.serve) instead of a local model
    endpoint_model: str | None = None  # the served model name (None: the server's only / first model)
    endpoint_retries: int = 3
    endpoint_timeout_s: float = 120.0
    api_key: str | None = None  # the endpoint's API key (None: OPENAI_API_KEY); never written to results
    tasks: list[str] = field(default_factory=lambda: ["arithmetic_reversed"])
    task_files: list[str] = field(default_factory=list)  # YAML task entries (optsys.eval.tasks)
    split: str = "test"  # the built-in tasks' held-out split
    num: int = 200  # questions per task (0 = every row of a dataset task)
    difficulty: int = 2  # built-in tasks
    methods: list[str] = field(default_factory=lambda: ["greedy"])
    n: list[int] = field(default_factory=lambda: [1])  # pool methods: samples per question, the curve's k values
    temperature: float = 1.0  # sampling methods (greedy is temperature 0)
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 0  # 0: the task's own default
    # best_of_n: confidence (the model's mean token log-prob), reward_model:<folder>, a reward function or dotted path
    scorer: str | None = None
    verifier: str | None = None  # self_correct: the same kinds as scorer (None: the model critiques itself)
    rounds: int = 2  # self_correct
    budgets: list[int] = field(default_factory=lambda: [16, 32, 64])  # budget: thinking tokens
    extend: int = 0  # budget: "Wait" extensions
    answer_tokens: int = 16  # budget: tokens of the forced answer
    think_open: str = "<think>\n"
    think_close: str = "</think>"
    engine: str = "auto"  # auto | vllm | hf
    dtype: str = "float32"
    max_model_len: int = 2048
    batch_size: int = 64  # HF engine: greedy prompts per generate call
    seed: int = 0
    level: float = 0.95  # confidence level of every interval
    resamples: int = 2000  # bootstrap resamples
    output_dir: str | None = None  # default: runs/eval-<timestamp>
    plots: bool = True
    progress: bool = True  # a bar with an ETA over each method's generation (vLLM's own, or the HF engine's batches)


def check(cfg: EvalRunConfig) -> None:
    """Every setting that can be refused before a model loads."""
    from optsys.eval.scaling import METHODS
    from optsys.eval.tasks import resolve_tasks

    if cfg.endpoint is not None:
        if cfg.compare:
            raise ConfigError("--compare evaluates two local models; it does not combine with --endpoint")
        # with an endpoint, --model (optional) is where the tokenizer and chat template are read from
    elif (cfg.model is None) == (not cfg.compare):
        raise ConfigError("give one of --model PATH, --compare A B or --endpoint URL "
                          f"(got model={cfg.model!r}, compare={cfg.compare!r})")
    else:
        defaults = EvalRunConfig()
        for key in ("endpoint_model", "endpoint_retries", "endpoint_timeout_s", "api_key"):
            if getattr(cfg, key) != getattr(defaults, key):
                raise ConfigError(f"{key} applies to --endpoint, and this eval has none; drop it or give --endpoint")
    if cfg.compare and len(cfg.compare) != 2:
        raise ConfigError(f"--compare takes two models, got {len(cfg.compare)}: {cfg.compare}")
    for key, value in (("model", cfg.model), *((f"compare[{i}]", m) for i, m in enumerate(cfg.compare))):
        if value is not None:
            check_model_folder(key, value)
    if not cfg.tasks:
        raise ConfigError("tasks is empty; name at least one task (e.g. --tasks arithmetic_reversed)")
    for m in cfg.methods:
        if m not in METHODS:
            raise ConfigError(f"unknown method {m!r}{did_you_mean(m, METHODS)}")
    if not cfg.methods:
        raise ConfigError(f"methods is empty; choose from {', '.join(METHODS)}")
    if not cfg.n or any(k < 1 for k in cfg.n):
        raise ConfigError(f"--n values must be >= 1 (samples per question), got {cfg.n}")
    if any(b < 1 for b in cfg.budgets) or not cfg.budgets:
        raise ConfigError(f"budgets must be >= 1 thinking tokens, got {cfg.budgets}")
    for key in ("num", "rounds", "extend", "top_k", "max_new_tokens"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    for key in ("answer_tokens", "max_model_len", "batch_size", "resamples", "difficulty", "endpoint_retries"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1 or not 0 < cfg.level < 1:
        raise ConfigError(f"temperature must be >= 0, top_p in (0, 1] and level in (0, 1); got {cfg.temperature}, "
                          f"{cfg.top_p}, {cfg.level}")
    if "best_of_n" in cfg.methods and not cfg.scorer:
        raise ConfigError("method best_of_n needs a scorer: --scorer confidence (the model's own mean token "
                          "log-prob), reward_model:<folder> (a reward model trained with method=rm), a reward "
                          "function name (e.g. format) or a dotted path")
    if any(m in ("sample", "self_consistency", "best_of_n") for m in cfg.methods) and cfg.temperature == 0:
        raise ConfigError("the pool methods (sample, self_consistency, best_of_n) need temperature > 0: at 0 every "
                          "sample is the greedy one")
    if cfg.engine not in ("auto", "vllm", "hf"):
        raise ConfigError(f"engine={cfg.engine!r} is not one of auto, vllm, hf")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={cfg.dtype!r} is not one of float32, bfloat16, float16")
    check_settings_are_used(cfg)
    from optsys.rollout.rewards import REFERENCE_REWARDS, check_reward_names

    for key, method, oracle in (("scorer", "best_of_n", "pass@k"),
                                ("verifier", "self_correct", "one that stops exactly at the right answer")):
        if getattr(cfg, key) in REFERENCE_REWARDS:
            raise ConfigError(f"--{key} {getattr(cfg, key)} compares each sample with the reference answer, so "
                              f"{method} would report an oracle ({oracle}), "
                              "not a test-time method; use confidence (best_of_n), reward_model:<folder>, format, "
                              "or a function that judges the completion without the reference (scorers and "
                              "verifiers are called with answer=None). For the oracle itself: --method sample (pass@k)")
    if cfg.verifier == "confidence":
        raise ConfigError("verifier=confidence is not a verifier (it ranks samples, it does not accept or reject "
                          "one); use it as --scorer for best_of_n")
    for key in ("scorer", "verifier"):
        if getattr(cfg, key) and getattr(cfg, key) != "confidence":
            check_reward_names([getattr(cfg, key)], None)
    for path in cfg.task_files:
        if not Path(os.path.expanduser(path)).is_file():
            raise ConfigError(f"--task-file {path} does not exist (resolved to {Path(path).resolve()}); give a YAML "
                              "file of task entries")
    tasks = resolve_tasks(cfg.tasks, cfg.task_files)
    check_sizes(cfg, [t.name for t in tasks])
    if cfg.output_dir is not None:
        check_folder_creatable(cfg.output_dir, "--out")
    if cfg.endpoint is not None:
        local = [t.name for t in tasks if t.kind != "generate"]
        if local:
            raise ConfigError(f"tasks {local} score log-likelihoods, which need a local model; use --model for them")


# Settings read by some methods only, and the methods that read them; one set while none of them runs is refused.
_SAMPLING_METHODS = ("sample", "self_consistency", "best_of_n", "self_correct", "budget")
METHOD_SETTINGS = {
    "n": ("sample", "self_consistency", "best_of_n"),
    "scorer": ("best_of_n",),
    "verifier": ("self_correct",), "rounds": ("self_correct",),
    "budgets": ("budget",), "extend": ("budget",), "answer_tokens": ("budget",), "think_open": ("budget",),
    "think_close": ("budget",),
    "temperature": _SAMPLING_METHODS, "top_p": _SAMPLING_METHODS, "top_k": _SAMPLING_METHODS,
}


def check_settings_are_used(cfg: EvalRunConfig) -> None:
    """A method setting changed from its default while no chosen method reads it would be ignored: refuse it
    (`--method greedy --n 1,4,16`, `--method greedy --scorer confidence`), as training refuses a setting its
    method would ignore."""
    defaults = EvalRunConfig()
    for key, readers in METHOD_SETTINGS.items():
        value = getattr(cfg, key)
        if value != getattr(defaults, key) and not any(m in readers for m in cfg.methods):
            raise ConfigError(f"{key}={value!r} is not used by --method {','.join(cfg.methods)} (methods that read "
                              f"it: {', '.join(readers)}); drop it, or add one of those methods")


def check_sizes(cfg: EvalRunConfig, names: list[str]) -> None:
    """--num against the problems a built-in task has in --split at --difficulty (`<task>_mc` draws the same)."""
    from optsys.data.tasks import TASKS

    for name in names:
        base = name.removesuffix("_mc")
        sizes = TASKS[base].split_sizes(cfg.difficulty) if base in TASKS else None
        if not sizes or cfg.split not in ("train", "test"):
            continue
        has, want = sizes[0] if cfg.split == "train" else sizes[1], cfg.num or 200  # num=0: the tasks' 200
        if want > has:
            raise ConfigError(f"task {name} has {has} distinct {cfg.split} problems at difficulty {cfg.difficulty}; "
                              f"--num {want} asks for more. Lower --num, or raise --difficulty")


def check_model_folder(key: str, value: str) -> None:
    """A local model folder must exist and hold config.json, weights and a tokenizer (tiny:/hub ids pass; a
    `stage:` recipe is checked by the eval CLI, optsys.eval_cli, which resolves it)."""
    check_local_source(key, value)
    path = Path(os.path.expanduser(value))
    if path.is_dir():
        missing = [name for name, ok in (
            ("config.json", (path / "config.json").exists()),
            ("a tokenizer (tokenizer.json or tokenizer_config.json)",
             (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()),
        ) if not ok]
        if missing:
            raise ConfigError(f"{key}={value!r}: the folder lacks {' and '.join(missing)}; evaluate a folder "
                              "written by optsys (<run>/final/) or save_pretrained of a model and its tokenizer")


def recipe_file(name: str) -> Path:
    path = EVAL_RECIPES_DIR / f"{name}.yaml"
    if not path.exists():
        if (RECIPES_DIR / f"{name}.yaml").exists():
            raise ConfigError(f"{name!r} is a training recipe, not an eval one: train it with python -m optsys.train "
                              f"--recipe {name}, then evaluate its model with --model <run>/final")
        names = sorted(p.stem for p in EVAL_RECIPES_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown eval recipe {name!r}{did_you_mean(name, names)}. They live in {EVAL_RECIPES_DIR}")
    return path


def load_eval_config(recipe: str | None = None, config_file: str | None = None, flags: dict | None = None,
                     overrides: list[str] = ()) -> EvalRunConfig:
    """Defaults <- recipe or YAML file <- flags (already parsed values) <- key=value overrides; then check."""
    if recipe and config_file:
        raise ConfigError("pass either --recipe or --config, not both")
    data = read_yaml(Path(config_file)) if config_file else read_yaml(recipe_file(recipe)) if recipe else {}
    data.update({k: v for k, v in (flags or {}).items() if v is not None})
    apply_overrides(data, overrides, example="key=value (e.g. temperature=0.7)")
    cfg = EvalRunConfig()
    merge_into(cfg, data)
    check(cfg)
    return cfg


def to_dict(cfg: EvalRunConfig) -> dict:
    """The config as results.json records it; an API key is recorded as set or not, never its value."""
    out = dataclasses.asdict(cfg)
    if out["api_key"] is not None:
        out["api_key"] = "<set>"
    return out
