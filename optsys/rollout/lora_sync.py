"""LoRA trainer -> engine sync: the adapter alone (a few MB), or the merged weights (the whole model).

`sync_adapter` sends only the trainer's LoRA A/B matrices, under the names a saved peft adapter uses
(`base_model.model.<module>.lora_A.weight`), with its adapter_config, to `engine.load_adapter`, which
replaces the engine's one adapter in place (VLLMEngine(lora_rank=...); see optsys.rollout.vllm_engine).
`sync_merged` is the path for engines without LoRA: base + scaling * B @ A folded one weight at a time
(no copy of the model) and streamed, bucketed, through optsys.rollout.sync.sync_weights.
Either way the sync canary (optsys.rollout.sync.Canary, on the peft model) checks the result.
"""

from __future__ import annotations

import enum
import time

import torch

from optsys.rollout.engine import SyncReport
from optsys.rollout.sync import sync_weights


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # an FSDP2 shard -> the full tensor (collective)


def _jsonable(v):
    if isinstance(v, (set, frozenset)):
        return sorted(_jsonable(x) for x in v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, enum.Enum):
        return v.value
    return v


def adapter_config(peft_model, adapter: str = "default") -> dict:
    """The adapter's peft config as adapter_config.json holds it (JSON-safe: sets become sorted lists)."""
    return _jsonable(peft_model.peft_config[adapter].to_dict())


def adapter_tensors(peft_model, *, dtype: torch.dtype, report: SyncReport | None = None, skip=(),
                    adapter: str = "default"):
    """(peft saved-adapter name, full tensor in `dtype`) for every LoRA A/B matrix of `adapter`; fills `report`.

    Names drop the adapter name, as peft's get_peft_model_state_dict does:
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight` -> `...q_proj.lora_A.weight`.
    `skip`: names left out (tests: a sync made to miss a tensor)."""
    tag = f".{adapter}."
    for name, param in peft_model.named_parameters():
        if ".lora_" not in name or tag not in name:
            continue
        name = name.replace(tag, ".")
        if name in skip:
            continue
        t = _full(param).to(dtype)
        if report is not None:
            report.tensors += 1
            report.bytes += t.numel() * t.element_size()
            report.names.append(name)
        yield name, t


def sync_adapter(engine, peft_model, *, dtype: torch.dtype | None = None, skip=(), transport: str = "memory",
                 adapter: str = "default") -> SyncReport:
    """Put the trainer's current adapter into the engine in place (same adapter id, previous weights replaced).

    The whole adapter is handed over at once (vLLM builds its LoRA model from the full set), so
    peak_bucket_bytes is the adapter's size. dtype: the engine's (engine.dtype) unless given."""
    dtype = dtype or getattr(engine, "dtype", None) or next(peft_model.parameters()).dtype
    report = SyncReport()
    t0 = time.perf_counter()
    tensors = dict(adapter_tensors(peft_model, dtype=dtype, report=report, skip=skip, adapter=adapter))
    engine.load_adapter(tensors, adapter_config(peft_model, adapter), transport=transport)
    report.peak_bucket_bytes = report.bytes
    report.seconds = time.perf_counter() - t0
    return report


class MergedWeights:
    """A read-only view of a peft model as the plain model base + adapter would be, one weight at a time.

    `named_parameters()` yields (HF checkpoint name, tensor): LoRA-wrapped weights come out merged
    (W + scaling * B @ A, computed in fp32, in W's dtype), the rest as they are; nothing is copied up front,
    so streaming it through optsys.rollout.sync.engine_weights holds one merged weight plus one bucket."""

    def __init__(self, peft_model, adapter: str = "default"):
        self.model = peft_model.get_base_model()
        self.adapter = adapter

    def _delta(self, layer) -> torch.Tensor:
        a = _full(layer.lora_A[self.adapter].weight).float()
        b = _full(layer.lora_B[self.adapter].weight).float()
        delta = b @ a
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T
        return delta * layer.scaling[self.adapter]

    def named_parameters(self):
        for name, param in self.model.named_parameters():
            if ".lora_" in name:
                continue
            if ".base_layer." not in name:
                yield name, _full(param)
                continue
            path, leaf = name.split(".base_layer.")
            layer = self.model.get_submodule(path)
            t = _full(param)
            adapted = (leaf == "weight" and self.adapter in getattr(layer, "lora_A", {})
                       and self.adapter not in getattr(layer, "merged_adapters", ()))
            if adapted:
                t = (t.float() + self._delta(layer)).to(t.dtype)
            yield f"{path}.{leaf}", t

    def parameters(self):
        return (t for _, t in self.named_parameters())


def sync_merged(engine, peft_model, *, dtype: torch.dtype, bucket_mb: float, skip=(),
                adapter: str = "default") -> SyncReport:
    """Merge-and-push: stream base + adapter as full weights into the engine (bucketed, in place), then drop the
    engine's prefix cache (its blocks hold KV of the old weights; VLLMEngine.reset_prefix_cache)."""
    report = sync_weights(engine, MergedWeights(peft_model, adapter), dtype=dtype, bucket_mb=bucket_mb, skip=skip)
    reset = getattr(engine, "reset_prefix_cache", None)
    if reset is not None:
        t0 = time.perf_counter()
        reset()
        report.seconds += time.perf_counter() - t0
    return report
