"""Dataclass configs filled from a recipe or YAML file plus dotted `key.sub=value` overrides.

Validation is strict and happens before any model loads: an unknown key (with a did-you-mean),
a value of the wrong type, or a missing required field raises ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

RECIPES_DIR = Path(__file__).parent / "recipes"


class ConfigError(ValueError):
    """A config problem, with the key and what to do."""


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
    # "tiny:<preset>" (built by optsys.models.tiny), a local Hugging Face folder, or a hub id.
    name_or_path: str = "tiny:quickstart"
    revision: Optional[str] = None
    # How weights are stored: loaded in this dtype and final/ written in it. Training keeps fp32 master weights
    # and optimizer state whatever it is; trainer.precision says what the matmuls run in.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # "auto": flash_attention_2 on CUDA when installed (varlen, packing by position_ids), else sdpa
    # with a block-diagonal mask. "eager" works too (additive mask).
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
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
    difficulty: int = 2  # built-in tasks: digits (arithmetic) or list length (sorting)
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
    eval_every: int = 0  # steps between eval-loss runs; 0 = only at the end
    progress: bool = True
    save_every: int = 0  # steps between checkpoints (<output_dir>/checkpoints/); 0 = only at the end
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted after each save


@dataclass
class EvalConfig:
    before: bool = True  # greedy task accuracy before training (eval/accuracy_before)
    after: bool = True  # and after (eval/accuracy_after)
    max_new_tokens: int = 16
    batch_size: int = 100


@dataclass
class PreferenceConfig:
    """Preference optimization (method dpo | ipo | robust | simpo | orpo | cpo | kto); see optsys.losses.preference."""

    beta: float = 0.1  # DPO/IPO/rDPO/CPO/KTO temperature; SimPO reward scale (its paper uses ~2)
    label_smoothing: float = 0.0  # cDPO / rDPO label-flip rate eps, in [0, 0.5)
    gamma: float = 1.0  # SimPO target reward margin
    lam: float = 0.1  # ORPO odds-ratio weight
    alpha: float = 1.0  # CPO NLL weight
    desirable_weight: float = 1.0  # KTO lambda_D
    undesirable_weight: float = 1.0  # KTO lambda_U
    # Methods with a reference model: "precompute" scores the training pairs once with the initial model
    # and caches them in <output_dir>/ref_logps.safetensors; "copy" keeps a frozen copy in memory;
    # "adapters_off" (LoRA only) runs the same model with its adapters disabled.
    reference: Literal["precompute", "copy", "adapters_off"] = "precompute"
    # The reference checkpoint (hub id, folder, tiny:<preset>) for precompute / copy; None = the policy's
    # initial weights. It must share the policy's tokenizer and architecture (checked at load).
    reference_model: str | None = None


@dataclass
class RewardConfig:
    """Reward model (method rm): Bradley-Terry -log sigma(r_c - r_r - margin) + center_coef * (r_c + r_r)^2."""

    margin: float = 0.0  # used where a row has no `margin` field
    center_coef: float = 0.0  # keeps rewards centred at 0 (0.01 is common)


@dataclass
class TrainConfig:
    recipe: str = "quickstart"
    method: str = "sft"  # a name in optsys.methods.METHODS: sft, dpo, ipo, robust, simpo, orpo, cpo, kto, rm
    output_dir: Optional[str] = None  # default ./runs/<recipe>-<timestamp>/
    overwrite: bool = False  # allow writing into a folder that holds another run
    resume: bool = False  # continue the run in output_dir from its latest complete checkpoint
    seed: int = 0
    device: str = "auto"  # auto: cuda if available, else cpu
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pref: PreferenceConfig = field(default_factory=PreferenceConfig)
    rm: RewardConfig = field(default_factory=RewardConfig)

    def validate(self) -> None:
        from optsys.methods import METHODS

        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not a training method{_did_you_mean(self.method, METHODS)}")
        method = METHODS[self.method]
        self._refuse_unused_settings(method, METHODS)
        d, t, lora = self.data, self.trainer, self.model.lora
        if lora.r < 0 or (lora.quantize != "none" and lora.r == 0):
            raise ConfigError(f"model.lora.r must be > 0 for LoRA/QLoRA (quantize={lora.quantize!r}); got {lora.r}")
        if (d.task is None) == (d.dataset is None):
            raise ConfigError(
                "set exactly one of data.task (a built-in task) and data.dataset (a file, folder "
                f"or hub id); got data.task={d.task!r}, data.dataset={d.dataset!r}"
            )
        if d.task is not None:
            from optsys.data.tasks import TASKS

            if d.task not in TASKS:
                raise ConfigError(f"data.task={d.task!r} is not a built-in task{_did_you_mean(d.task, TASKS)}")
        for key, value in [("data.max_tokens", d.max_tokens), ("trainer.batch_tokens", t.batch_tokens),
                           ("trainer.max_steps", t.max_steps), ("trainer.log_every", t.log_every)]:
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if t.lr <= 0:
            raise ConfigError(f"trainer.lr must be positive, got {t.lr}")
        if t.warmup_steps < 0 or t.eval_every < 0:
            raise ConfigError("trainer.warmup_steps and trainer.eval_every must be >= 0")
        if t.save_every < 0:
            raise ConfigError(f"trainer.save_every must be >= 0 (0 = checkpoint only at the end), got {t.save_every}")
        if t.keep_last < 1:
            raise ConfigError(f"trainer.keep_last must be >= 1 (a resume needs a checkpoint), got {t.keep_last}")
        if self.pref.reference == "adapters_off" and lora.r == 0 and method.section == "pref":
            raise ConfigError("pref.reference=adapters_off needs LoRA (model.lora.r > 0); use "
                              "pref.reference=precompute or copy for full fine-tuning")
        if self.pref.reference_model is not None and method.section == "pref":
            if self.pref.reference == "adapters_off":
                raise ConfigError("pref.reference_model cannot be used with pref.reference=adapters_off (the "
                                  "reference is the policy with its adapters disabled); use precompute or copy")
            if not method.reference:
                raise ConfigError(f"method={self.method} is reference-free: drop pref.reference_model")
        if self.resume and self.output_dir is None:
            raise ConfigError("resume=true needs output_dir=<the folder of the run to continue>")
        if self.resume and self.overwrite:
            raise ConfigError("resume=true continues the run in output_dir and overwrite=true replaces it; "
                              "pass only one of them")


    def _refuse_unused_settings(self, method, methods) -> None:
        """A family setting the chosen method would ignore is an error naming the key: another family's section
        changed from its defaults (rm.margin with method=dpo), or a loss hyper-parameter of its own family that
        its loss does not take (pref.label_smoothing with method=ipo, pref.gamma with method=dpo)."""
        from optsys.methods import FAMILY_SECTIONS

        for name in FAMILY_SECTIONS:
            section = getattr(self, name)
            default = type(section)()
            changed = [f"{name}.{f.name}={getattr(section, f.name)!r}" for f in dataclasses.fields(section)
                       if getattr(section, f.name) != getattr(default, f.name)]
            if not changed:
                continue
            if name != method.section:
                users = sorted(m for m, spec in methods.items() if spec.section == name)
                raise ConfigError(f"{', '.join(changed)}: method={self.method} does not read the {name} section "
                                  f"(its methods: {', '.join(users)}); drop the setting or pick one of those methods")
            family_hyper = {k for spec in methods.values() if spec.section == name for k in spec.hyper}
            for key in sorted(family_hyper - set(method.hyper)):
                if getattr(section, key) != getattr(default, key):
                    users = [m for m, spec in methods.items() if key in spec.hyper]
                    raise ConfigError(
                        f"{name}.{key}={getattr(section, key)!r} is not used by method={self.method} (methods whose "
                        f"loss takes it: {', '.join(users)}); drop it, or pick one of those methods")
            if not method.reference and (section is self.pref) and self.pref.reference != default.reference:
                raise ConfigError(f"pref.reference={self.pref.reference} has no effect: method={self.method} is "
                                  "reference-free; drop pref.reference")


# ---------------------------------------------------------------------------- loading


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f"; valid: {', '.join(sorted(options))}"


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


def _merge(obj: Any, data: dict, prefix: str = "") -> None:
    """Set fields of dataclass `obj` from a nested dict, strictly."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} expects a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}{_did_you_mean(key, names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _set_dotted(data: dict, dotted: str, value: str) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
    node[parts[-1]] = value


def recipe_path(name: str) -> Path:
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown recipe {name!r}{_did_you_mean(name, names)}. Recipes live in {RECIPES_DIR}.")
    return path


def read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(recipe: str | None = None, config_file: str | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults <- recipe (or config file) <- overrides; then validate."""
    if recipe and config_file:
        raise ConfigError("pass either --recipe or --config, not both")
    if config_file:
        data, name = read_yaml(Path(config_file)), Path(config_file).stem
    else:
        name = recipe or "quickstart"
        data = read_yaml(recipe_path(name))
    data.setdefault("recipe", name)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. trainer.lr=2e-5)")
        key, value = item.split("=", 1)
        _set_dotted(data, key.strip(), value)
    cfg = TrainConfig()
    _merge(cfg, data)
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
