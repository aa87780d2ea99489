"""LoRA and QLoRA through peft: which modules get adapters, 4-bit base loading, merged export.

QLoRA keeps the frozen base in bitsandbytes nf4 (4 bits per weight, double-quantized scales) and
trains bf16/fp32 adapters on top; bitsandbytes >= 0.50 runs these layers on CPU too (slowly), which
is how it is tested here.
"""

from __future__ import annotations

import importlib.util

import torch

from optsys.config import ConfigError, LoraConfig

# Attention and MLP projections by architecture (the usual "all linear" choice of QLoRA's paper).
DEFAULT_TARGETS = {
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def quantization_config(cfg: LoraConfig, compute_dtype: torch.dtype):
    """BitsAndBytesConfig for QLoRA, or None. Errors clearly when bitsandbytes is missing."""
    if cfg.quantize == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "model.lora.quantize=nf4 (QLoRA) needs bitsandbytes, which is not installed. Install it with "
            "`pip install bitsandbytes` (0.50+ also runs on CPU), or set model.lora.quantize=none for plain LoRA."
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def target_modules(model, cfg: LoraConfig) -> list[str]:
    """The configured targets, checked against the model's module names (error lists what exists)."""
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Module)}
    targets = cfg.target_modules or DEFAULT_TARGETS.get(model.config.model_type)
    if targets is None:
        raise ConfigError(
            f"no default LoRA target modules for model type {model.config.model_type!r}; set "
            f"model.lora.target_modules=[...] from the model's linear layers"
        )
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) or type(m).__name__.startswith("Linear")})
        raise ConfigError(
            f"model.lora.target_modules names {missing}, which the model ({model.config.model_type}) does not "
            f"have. Its linear layers are: {linear}."
        )
    return list(targets)


def apply_lora(model, cfg: LoraConfig, task_type: str = "CAUSAL_LM"):
    """Wrap `model` with trainable LoRA adapters; every base weight is frozen.

    task_type "SEQ_CLS" (reward models): peft also keeps a trainable copy of the scalar head (`score`)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_modules(model, cfg),
        task_type=task_type,
    )
    if cfg.quantize != "none":
        # Norms and other small fp weights stay trainable=False; inputs need grads so that
        # gradient checkpointing through frozen 4-bit layers still reaches the adapters.
        model.enable_input_require_grads()
    return get_peft_model(model, peft_cfg)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def save_final(model, tokenizer, out_dir, cfg: LoraConfig, dtype: torch.dtype | None = None) -> None:
    """<out_dir>/final/: the full HF model, or the peft adapter folder for LoRA; with save_merged, also
    <out_dir>/final-merged/ (base + adapter folded into plain weights, in `dtype` when given)."""
    final = out_dir / "final"
    model.save_pretrained(final, safe_serialization=True)
    tokenizer.save_pretrained(final)
    if is_peft(model) and cfg.save_merged:
        merged = merged_model(model)
        merged = merged.to(dtype) if dtype is not None else merged
        merged.save_pretrained(out_dir / "final-merged", safe_serialization=True)
        tokenizer.save_pretrained(out_dir / "final-merged")


def merged_model(model):
    """A plain transformers model equal to base + adapter (the trained model is left untouched).

    A 4-bit base cannot hold merged weights, so QLoRA merges into a dequantized fp copy.
    """
    import copy

    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base_path = model.peft_config["default"].base_model_name_or_path
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, use_safetensors=True)
        adapter_state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        fresh = PeftModel(base, model.peft_config["default"])
        missing = fresh.load_state_dict(adapter_state, strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"adapter keys did not match the base model: {missing.unexpected_keys[:5]}")
        return fresh.merge_and_unload()
    return copy.deepcopy(model).merge_and_unload()
