"""Pieces every trainer calls: device, seeding, output folder, optimizer, schedule, precision."""

from __future__ import annotations

import contextlib
import math
import os
import random
import resource
import sys
import time
from pathlib import Path

import torch
import yaml

from optsys.config import ConfigError, TrainConfig, dump_yaml, to_dict


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def prepare_output_dir(cfg: TrainConfig) -> Path:
    """Create the run folder and write the resolved config; refuse to mix two runs in one folder.

    resume=true instead requires the folder to hold a run whose config equals this one except `resume`,
    and keeps its config.yaml, metrics.jsonl (rewound by the trainer) and checkpoints.
    """
    if cfg.resume:
        return _check_resume_dir(cfg)
    if cfg.output_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg.output_dir = os.path.join("runs", f"{cfg.recipe}-{stamp}")
    out = Path(cfg.output_dir)
    resolved = dump_yaml(cfg)
    existing = out / "config.yaml"
    if existing.exists() and not cfg.overwrite:
        same = existing.read_text() == resolved
        raise ConfigError(
            f"output_dir {out} already holds a {'run of this same config' if same else 'different run'} "
            f"(see {existing}). Pick a new output_dir=..., or pass overwrite=true to replace it."
        )
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "summary.json"):  # overwrite=true: start the history afresh
        (out / stale).unlink(missing_ok=True)
    existing.write_text(resolved)
    return out


def _check_resume_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.output_dir)
    existing = out / "config.yaml"
    if not existing.exists():
        raise ConfigError(
            f"resume=true, but output_dir {out} holds no run to continue (no {existing.name}). Check the "
            "path, or drop resume=true to start a new run there.")
    old = yaml.safe_load(existing.read_text()) or {}
    new = to_dict(cfg)
    old.pop("resume", None)
    new.pop("resume", None)
    diff = config_diff(old, new)
    if diff:
        raise ConfigError(
            f"resume=true continues the run in {out} with its own config ({existing}), but this command "
            "changes it:\n  " + "\n  ".join(diff) + "\nResume with the run's settings, or drop resume=true "
            "and pick a new output_dir to start a new run with these.")
    return out


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key.sub: old -> new` for every dotted key whose value differs between two nested dicts."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<missing>"), new.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and norm weights (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused or None)


def clip_and_step(model: torch.nn.Module, optimizer, scheduler, grad_clip: float) -> float:
    """Clip the global grad norm (0 disables), step optimizer and schedule, clear grads; returns the
    pre-clip norm (NaN when clipping is off). Works on FSDP2's DTensor parameters too."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0 else float("nan")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def warmup_cosine(warmup_steps: int, max_steps: int, min_ratio: float):
    """LR multiplier: linear warmup from ~0 to 1, then cosine down to min_ratio at max_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast where the device runs it fast (CUDA with bf16); fp32 elsewhere."""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def close_run(log, summary: dict, *, device: torch.device, t_start: float, out_dir: Path) -> dict:
    """Add peak memory, total wall time and the output dir to `summary`, write summary.json, close the log."""
    summary["memory/peak_mb"] = peak_memory_mb(device)
    summary["time/total_s"] = time.time() - t_start
    summary["output_dir"] = str(out_dir)
    log.write_summary(summary)
    log.close()
    return summary


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
