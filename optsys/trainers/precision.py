"""Mixed precision: the dtype weights are stored in, kept in for the optimizer, and computed in.

- `model.dtype` is storage: weights are loaded in it and `final/` is written in it.
- Trainable parameters, their gradients and the AdamW state are fp32 ("master weights"), always. An
  AdamW step moves a weight by about lr (5e-7 in the 8B DPO recipe), while half a bf16 ulp of a weight of
  magnitude 0.02 is 2^-8 * 2^-6 / 2 ~ 3e-5: a bf16 parameter updated in place does not move at all.
- `trainer.precision` is compute: `bf16` runs the matmuls in bf16 (autocast on one device; under FSDP2
  a `MixedPrecisionPolicy` all-gathers bf16 copies of the fp32 shards and reduce-scatters fp32 gradients),
  `fp32` runs everything in fp32, `auto` is bf16 on a CUDA device that has it and fp32 elsewhere.
- Frozen weights (a LoRA base, a reference model) are never updated: with bf16 compute they stay in the
  storage dtype (half the memory of fp32); with fp32 compute they are upcast so fp32 matmuls can use them.

There is no pure-bf16 mode (bf16 parameters and optimizer state): at 16 bytes per parameter an 8B model
fits 8 GPUs (16 GB each), and a pure-bf16 update needs Kahan summation or stochastic rounding to move
at all; see the recipes' headers for the arithmetic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from optsys.models.load import DTYPES


@dataclass(frozen=True)
class Precision:
    compute: torch.dtype  # matmuls and activations
    storage: torch.dtype  # weights as loaded and as saved (model.dtype)
    master: torch.dtype = torch.float32  # trainable parameters, gradients, optimizer state

    @property
    def mixed(self) -> bool:
        return self.compute != torch.float32

    def describe(self) -> str:
        name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
        return (f"precision: weights stored as {name(self.storage)}, trained as {name(self.master)} master "
                f"weights + {name(self.master)} AdamW state, computed in {name(self.compute)}")


def resolve_precision(precision: str, model_dtype: str, device: torch.device) -> Precision:
    """trainer.precision (auto | fp32 | bf16) and model.dtype -> the three dtypes of a run."""
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16" if bf16 else "fp32"
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    return Precision(compute=compute, storage=DTYPES[model_dtype])


def to_master(model: torch.nn.Module, p: Precision) -> torch.nn.Module:
    """Trainable floating-point parameters -> fp32 master weights, in place (tied weights stay tied);
    frozen ones too when compute is fp32. 4-bit (QLoRA) weights are not floating point and stay as they are."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != p.master and (param.requires_grad or not p.mixed):
            param.data = param.data.to(p.master)
    return model


def frozen_for_compute(model: torch.nn.Module, p: Precision) -> torch.nn.Module:
    """A frozen model (a reference) in the dtype its forward needs: storage dtype under bf16 compute
    (autocast or FSDP2 casts it for the matmuls), fp32 under fp32 compute."""
    return model.to(p.storage if p.mixed else torch.float32)


def fsdp_param_dtype(p: Precision) -> torch.dtype | None:
    """The dtype FSDP2 all-gathers parameters in (None: as stored, i.e. fp32)."""
    return p.compute if p.mixed else None


def storage_state_dict(state_dict: dict, p: Precision) -> dict:
    """A state dict with its floating-point tensors in the storage dtype, for final/."""
    return {k: v.to(p.storage) if v.is_floating_point() else v for k, v in state_dict.items()}


def mark_storage_dtype(folder: Path, p: Precision) -> None:
    """transformers writes the in-memory parameter dtype (fp32 master weights) into config.json; the file
    holds `p.storage` tensors, so say that (vLLM and `dtype="auto"` loads read it)."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = str(p.storage).removeprefix("torch.")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
