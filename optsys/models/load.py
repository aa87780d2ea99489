"""Load a causal LM and its tokenizer from a local HF folder or a hub id (or what `resolve` turns a source into:
optsys.models.sources.local_source builds `tiny:` presets; the entry points pass optsys.sources.resolve_source,
which also trains or reuses `stage:` recipes). Loading never trains anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from optsys.config import ConfigError, ModelConfig
from optsys.models.lora import apply_lora, quantization_config
from optsys.models.sources import local_source

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_attn_implementation(requested: str, device: torch.device) -> str:
    if requested == "sdpa_varlen":
        from optsys.models.attention import register

        return register()  # sdpa, once per packed sequence (optsys.models.attention)
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def from_pretrained(loader, path: str, **kwargs):
    """loader.from_pretrained(path, ...), with transformers' OSError (a hub id that does not exist or cannot be
    reached, a folder missing files) turned into a ConfigError naming the setting."""
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ConfigError(
            f"cannot load model {path!r} (model.name_or_path, or pref.reference_model for a reference): {e} "
            "Use a local Hugging Face folder (config.json, tokenizer and *.safetensors), or a hub id that exists "
            "and is reachable from here (check the name, model.revision and network access).") from None


def load_tokenizer(path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = from_pretrained(AutoTokenizer, path, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        # Training packs and never pads; generation needs some pad id and eos is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def load_model_and_tokenizer(cfg: ModelConfig, device: torch.device, seed: int = 0, resolve=local_source):
    """Weights are read from safetensors only; remote code runs only if the config allows it. `resolve(source,
    seed, dtype=)` gives the folder or hub id of cfg.name_or_path (a GGUF source dequantized into cfg.dtype)."""
    from transformers import AutoModelForCausalLM

    path = resolve(cfg.name_or_path, seed, dtype=cfg.dtype)
    if Path(path).is_dir() and not any(Path(path).glob("*.safetensors")):
        raise ConfigError(
            f"model folder {path} holds no *.safetensors weights; optsys reads safetensors only "
            "(convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True))"
        )
    tokenizer = load_tokenizer(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    quant = quantization_config(cfg.lora, compute_dtype=DTYPES[cfg.dtype])
    model = from_pretrained(
        AutoModelForCausalLM, path,
        revision=cfg.revision,
        dtype=DTYPES[cfg.dtype],
        attn_implementation=pick_attn_implementation(cfg.attn_implementation, device),
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,
        quantization_config=quant,
        # a 4-bit model is placed at load time (bitsandbytes quantizes as it moves weights)
        device_map={"": device} if quant is not None else None,
    )
    if quant is None:
        model = model.to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora.r > 0:
        model = apply_lora(model, cfg.lora)
    return model, tokenizer
