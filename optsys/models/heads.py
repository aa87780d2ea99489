"""The output layer of a causal LM as the fused losses see it: logits = softcap(scale * (h @ W.T + b)).

Most models form logits with a plain matrix (the lm_head weight). Some do more after it, in their
`forward`, from config attributes (read from transformers 5.19's modeling_*.py):
  Gemma 2/3/3n/4, VaultGemma, nanochat  final_logit_softcapping: cap * tanh(z / cap)
  Cohere, Cohere2                        logit_scale: z * logit_scale
  Granite family, MiniCPM3               logits_scaling: z / logits_scaling (MiniCPM3 divides h first: same)
  HyperCLOVA X                           logits_scaling: z * logits_scaling (the same name, the other way)
  Falcon-H1                              lm_head_multiplier: z * lm_head_multiplier
  Phi, CTRL                              an lm_head bias
`output_head(model)` reads these into one `OutputHead`; a head attribute set on an architecture it does
not know how to apply is refused by name rather than dropped (the loss would not be the model's loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optsys.config import ConfigError


@dataclass(frozen=True)
class OutputHead:
    """logits = softcap(scale * (hidden @ weight.T + bias)), softcap(x) = cap * tanh(x / cap)."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None = None  # [V]
    scale: float = 1.0
    softcap: float | None = None

    def scaled(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale * hidden, scale * bias): the scale moved before the matmul, for ops that take no scale.

        s (h W^T + b) = (s h) W^T + s b. Exact for a power-of-two scale (Granite's 8 / 16, Command-R's
        1/16); otherwise one rounding of h in its dtype replaces the model's rounding of the logits."""
        if self.scale == 1.0:
            return hidden, self.bias
        return hidden * self.scale, None if self.bias is None else self.bias * self.scale


# attribute -> {model type (of the text config): how forward applies it to z = lm_head(h)}.
# An attribute listed with {} is known to change the logits somewhere but is not represented here.
HEAD_ATTRIBUTES: dict[str, dict[str, str]] = {
    "final_logit_softcapping": dict.fromkeys(
        ["gemma2", "gemma3_text", "gemma3n_text", "gemma4_text", "gemma4_unified_text", "vaultgemma", "nanochat"],
        "softcap"),
    "logit_scale": dict.fromkeys(["cohere", "cohere2", "cohere2_moe", "cohere_compass_text"], "multiply"),
    "logits_scaling": {
        **dict.fromkeys(["granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid",
                         "granitemoeshared", "granite4_vision_text", "minicpm3"], "divide"),
        "hyperclovax": "multiply",
    },
    "lm_head_multiplier": {"falcon_h1": "multiply"},
    "output_multiplier": {},  # MuseGlimmer: z * output_multiplier before its softcap
    "logits_mup_width_multiplier": {},  # Inkling: h / multiplier
    "unpadded_vocab_size": {},  # Inkling: logits cut to the first unpadded_vocab_size columns
}


def output_head(model) -> OutputHead:
    """The model's output layer (weight, bias, scale, softcap); ConfigError for one it cannot describe."""
    module = model.get_output_embeddings()
    if module is None or not isinstance(module, torch.nn.Linear) or hasattr(module, "base_layer"):
        # peft's LoRA / modules_to_save wrappers keep the base weight under .weight: the adapter would be lost
        raise ConfigError(
            f"the model's output layer (get_output_embeddings) is {type(module).__name__}, not a plain "
            "torch.nn.Linear, so the fused losses cannot read it; if model.lora.target_modules names lm_head, "
            "drop it from the list"
        )
    cfg = model.config.get_text_config(decoder=True)
    scale, softcap = 1.0, None
    for attr, meaning_by_type in HEAD_ATTRIBUTES.items():
        value = getattr(cfg, attr, None)
        if _neutral(attr, value, module.weight.shape[0]):
            continue
        meaning = meaning_by_type.get(cfg.model_type)
        if meaning is None:
            raise ConfigError(
                f"the model config sets {attr}={value!r} (model type {cfg.model_type!r}), which changes its "
                f"logits in a way optsys's fused losses do not represent for this architecture, so training "
                f"would use a different loss than the model's forward. Use a model whose config leaves {attr} "
                f"unset, or add {cfg.model_type!r} to optsys.models.heads.HEAD_ATTRIBUTES['{attr}'] after "
                f"checking its modeling file"
            )
        if meaning == "softcap":
            softcap = float(value)
        elif meaning == "multiply":
            scale *= float(value)
        else:
            scale /= float(value)
    return OutputHead(module.weight, module.bias, scale, softcap)


def _neutral(attr: str, value, vocab_rows: int) -> bool:
    """Whether the attribute leaves the logits as they are (unset, a unit scale, an unpadded vocab)."""
    if value is None:
        return True
    if attr == "unpadded_vocab_size":
        return value >= vocab_rows
    if attr == "final_logit_softcapping":
        return False
    return value == 1
