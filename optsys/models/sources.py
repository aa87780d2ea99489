"""Model sources below the entry points: `tiny:<preset>` (the factory), `gguf:<file>` and named GGUF models such as
`smollm2-135m-instruct` (dequantized once into a cached folder: optsys.models.gguf), a local folder, a hub id.

`stage:<recipe>` sources are trained (or reused) by optsys.sources at the top: a model load never trains a
run. Loaders take a `resolve` callable, `local_source` by default; `python -m optsys.train`, `optsys.eval` and
`optsys.serve` pass optsys.sources.resolve_source, which adds `stage:`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from optsys.errors import ConfigError, did_you_mean
from optsys.models.gguf import GGUF_PREFIX, NAMED, gguf_folder, gguf_path, inspect_gguf, is_gguf_source

STAGE_PREFIX = "stage:"
TINY_PREFIX = "tiny:"


def local_source(value: str, seed: int = 0, dtype: str = "float32") -> str:
    """`tiny:<preset>` -> its built (cached) folder; `gguf:<file>` or a named GGUF model -> its dequantized folder,
    weights stored in `dtype` (the loader's model.dtype); a folder or hub id as it is. `stage:` is refused: only
    the entry points resolve it."""
    if value.startswith(STAGE_PREFIX):
        raise ConfigError(f"{value!r} is a training stage, which only the entry points train or reuse: run it "
                          "through python -m optsys.train (or optsys.train.run(cfg), python -m optsys.eval, "
                          "python -m optsys.serve), or pass resolve=optsys.sources.resolve_source")
    if value.startswith(TINY_PREFIX):
        from optsys.models.tiny import build_tiny

        return str(build_tiny(value[len(TINY_PREFIX):], seed=seed))
    if is_gguf_source(value):
        return str(gguf_folder(value, dtype))
    return value


def check_not_run_or_adapter(key: str, value: str, path: Path) -> None:
    """Two folders optsys writes that are not models: a run's folder (its model is <run>/final) and a LoRA adapter
    (final/ of a LoRA run), which would load over its base with every weight frozen."""
    if (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        final = path / "final"
        where = (f"use {final}" if final.is_dir() else f"it has no final/ yet (resume the run with resume=true "
                 f"output_dir={value})")
        raise ConfigError(f"{key}={value!r} is a training run's folder, not a model: its model is in final/, so "
                          f"{where} (a LoRA run's full model is final-merged/, written with "
                          "model.lora.save_merged=true)")
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        try:
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            base = None
        raise ConfigError(f"{key}={value!r} is a LoRA adapter (adapter_config.json), not a model: it would load "
                          f"over its base model{f' ({base})' if base else ''} with every weight frozen. Use the "
                          "full model its run writes with model.lora.save_merged=true (<run>/final-merged), or "
                          "continue that run with resume=true output_dir=<run>")


def check_local_source(key: str, value: str) -> None:
    """Config check of model source `value` of setting `key` (nothing loads): tiny:<preset> names a preset, a
    local path exists and holds *.safetensors, a path-like name that does not exist is refused. A `stage:` value
    is checked here only for a recipe name (optsys.validation checks the recipe itself)."""
    if value.startswith(STAGE_PREFIX):
        if not value[len(STAGE_PREFIX):].strip():
            raise ConfigError(f"{key}={value!r} names no recipe; write stage:<recipe>, e.g. stage:quickstart")
        return
    if value.startswith(TINY_PREFIX):
        from optsys.models.tiny import PRESETS

        preset = value.split(":", 1)[1]
        if preset in NAMED or preset.startswith(GGUF_PREFIX) or preset.endswith(".gguf"):
            real = preset if not preset.endswith(".gguf") or preset.startswith(GGUF_PREFIX) else GGUF_PREFIX + preset
            raise ConfigError(f"{key}={value!r}: tiny: builds a random-init toy model from a preset "
                              f"({', '.join(sorted(PRESETS))}); a real model is named without it: {key}={real}")
        if preset not in PRESETS:
            raise ConfigError(f"{key}={value!r}: no tiny preset {preset!r}{did_you_mean(preset, PRESETS)}")
        return
    if is_gguf_source(value):
        inspect_gguf(gguf_path(value, key), key)  # header only: missing, truncated, unsupported, extra not installed
        return
    path = Path(os.path.expanduser(value))
    if path.exists():
        if not path.is_dir() and path.suffix.lower() == ".gguf":
            raise ConfigError(f"{key}={value!r} is a GGUF file; write {key}={GGUF_PREFIX}{value} to dequantize it "
                              "into a cached Hugging Face folder")
        if not path.is_dir():
            raise ConfigError(f"{key}={value!r} is a file; point it at a Hugging Face model folder (config.json and "
                              "*.safetensors) or a hub id")
        check_not_run_or_adapter(key, value, path)
        if not any(path.glob("*.safetensors")):
            raise ConfigError(f"{key}={value!r}: the folder holds no *.safetensors weights; optsys reads safetensors "
                              "only (convert .bin checkpoints with save_pretrained(safe_serialization=True))")
        return
    if value.lower() in NAMED or value.lower().endswith(".gguf"):
        hint = value.lower() if value.lower() in NAMED else GGUF_PREFIX + value
        raise ConfigError(f"{key}={value!r} does not exist as a folder; did you mean {key}={hint}?")
    if value.startswith((".", "/", "~")) or "\\" in value or value.count("/") > 1:
        raise ConfigError(f"{key}={value!r} does not exist (resolved to {path.resolve()}); point it at a local "
                          "Hugging Face model folder, a hub id such as 'org/name', or tiny:<preset>")


def source_context_length(value: str) -> int | None:
    """The longest sequence the model of source `value` was trained for (max_position_embeddings; a GGUF's
    context_length), read without loading it; None where that needs a download or a stage run (hub ids, stage:)
    and for tiny: presets, random-init models with no trained context (their rotary positions go on)."""
    if value.startswith((STAGE_PREFIX, TINY_PREFIX)):
        return None
    if is_gguf_source(value):
        return inspect_gguf(gguf_path(value)).context_length
    config = Path(os.path.expanduser(value)) / "config.json"
    if not config.is_file():
        return None
    import json

    n = json.loads(config.read_text()).get("max_position_embeddings")
    return n if isinstance(n, int) else None
