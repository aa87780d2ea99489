"""DeepSpeed ZeRO-2/3 as a training backend (parallel.backend=deepspeed; method=sft), beside FSDP2.

The trainer keeps its own loop, data, loss normalization, schedule and checkpoint folder; DeepSpeed's
engine owns what ZeRO partitions: ZeRO-2 splits AdamW state and gradients over the ranks, ZeRO-3 the weights
too. Four things differ from the FSDP2 path, each a function here:

- `zero_engine`: `deepspeed.initialize` on the model, with optsys's own AdamW and LR schedule (no DeepSpeed
  C++ op is built, so `DS_BUILD_OPS=0 pip install deepspeed` is enough) and the config of `deepspeed_config`,
  also written to <output_dir>/deepspeed_config.json.
- The losses run through the engine's forward (its ZeRO-3 hooks gather the weights, its backward hooks need
  the forward): the engine wraps `ForwardMethods`, and `engine.token_loss_sum(...)` calls
  `engine("token_loss_sum", ...)`, so trainer code written for `model.token_loss_sum(...)` runs unchanged.
- `zero_backward` / `zero_step`: one optimizer step is a variable number of packed micro-batches (steps are
  counted in tokens, trainer.batch_tokens), so the trainer marks the accumulation boundary itself and scales
  the loss itself; DeepSpeed's batch fields are bookkeeping (see `deepspeed_config`).
- `full_fp32_state_dict`: final/ from the fp32 master weights (DeepSpeed's own gather; every rank calls).

Checkpoints go through DeepSpeed's save_checkpoint / load_checkpoint inside optsys's atomic checkpoint folder
(optsys/checkpoint.py), which adds the per-rank RNG state, data position and counters.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import torch

DEEPSPEED_INSTALL = "pip install deepspeed (DS_BUILD_OPS=0 pip install deepspeed skips its C++ ops: optsys needs none)"
SUPPORTED_METHODS = ("sft",)
ZERO_STAGES = (2, 3)


def deepspeed_missing() -> bool:
    return importlib.util.find_spec("deepspeed") is None


def deepspeed_config(*, zero_stage: int, batch_tokens: int, max_tokens: int, world_size: int, grad_clip: float,
                     bf16: bool) -> dict:
    """The DeepSpeed config of a run (JSON-ready).

    Batch sizes: DeepSpeed counts samples, optsys counts tokens. A DeepSpeed micro-batch here is one packed row
    (<= data.max_tokens tokens), and gradient_accumulation_steps is the micro-batches each rank runs in a step of
    full rows, ceil(trainer.batch_tokens / (data.max_tokens x world size)), so train_batch_size is the rows of
    such a step. A real step holds however many packed rows fit in trainer.batch_tokens (rows are often shorter
    than max_tokens), so the trainer sets the accumulation boundary at each step's last micro-batch and scales
    the loss by the step's target-token count itself: these three fields only feed DeepSpeed's own counters.
    Precision: bf16 = DeepSpeed's bf16 mode (bf16 weights and compute, fp32 master weights and AdamW state in
    the ZeRO optimizer); otherwise fp32 throughout. Clipping: trainer.grad_clip on the global norm (0: off)."""
    gas = max(1, -(-batch_tokens // (max_tokens * world_size)))
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": gas,
        "train_batch_size": gas * world_size,
        "gradient_clipping": float(grad_clip),
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        "zero_optimization": {"stage": int(zero_stage)},
        # torch.optim.AdamW, built by optsys (DeepSpeed's fused / CPU Adam would need a C++ build)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # optsys logs the steps (metrics.jsonl, progress bar)
        "wall_clock_breakdown": False,
    }


def write_deepspeed_config(out_dir: Path, config: dict) -> Path:
    path = Path(out_dir) / "deepspeed_config.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def import_deepspeed(device: torch.device):
    """`deepspeed`, with its accelerator matching `device` (cpu: gloo; cuda: NCCL).

    DeepSpeed picks its accelerator when first imported (DS_ACCELERATOR, else by probing); set it from the
    run's device instead. Its CPU accelerator JIT-compiles a shared-memory all-reduce op when its comm backend
    starts (~2 min with g++ on 2 cores); only DeepSpeed-inference's tensor-parallel all-reduce calls it, so it
    is marked unavailable and training uses gloo's all-reduce."""
    name = "cuda" if device.type == "cuda" else "cpu"
    if "deepspeed" not in sys.modules:
        os.environ.setdefault("DS_ACCELERATOR", name)
    import deepspeed
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if get_accelerator().device_name() != name:
        if name == "cpu":
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accelerator
        else:
            from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accelerator
        set_accelerator(Accelerator())
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines repeat the config on every rank
    # ZeRO calls torch.distributed's all_gather_into_tensor / reduce_scatter_tensor, which torch 2.13 deprecates
    # with a FutureWarning on every call (dozens per step); they are DeepSpeed's to change, not the user's.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                            r"is deprecated", category=FutureWarning)
    return deepspeed


class ForwardMethods(torch.nn.Module):
    """The module DeepSpeed wraps: forward(name, ...) runs the model's attached loss method `name`
    (optsys.models.packed.attach_forward_methods), so the losses pass through the engine's forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, method: str, *args, **kwargs):
        return getattr(self.model, method)(*args, **kwargs)


def zero_engine(model, optimizer, scheduler, config: dict, device: torch.device, head: torch.nn.Module):
    """The DeepSpeed engine around `model` (with its forward methods attached), stepping `optimizer` and
    `scheduler` (a per-step LambdaLR) itself. `head` is the model's output layer (optsys.models.heads.output_head).
    Every rank calls; torch.distributed must be up (a 1-rank group in one process:
    optsys.parallel.dist.init_world(group_of_one=True))."""
    deepspeed = import_deepspeed(device)
    os.environ.setdefault("LOCAL_RANK", "0")  # what torchrun sets; DeepSpeed asserts it, in one process too
    engine, *_ = deepspeed.initialize(model=ForwardMethods(model), optimizer=optimizer, lr_scheduler=scheduler,
                                      config=config)
    if config["zero_optimization"]["stage"] == 3:
        # The fused losses read the output layer's weight (and bias) directly instead of calling lm_head:
        # ZeRO-3 gathers them around the wrapper's forward and backward like the layers' own.
        for p in (head.weight, head.bias):
            if isinstance(p, torch.nn.Parameter):
                deepspeed.zero.register_external_parameter(engine.module, p)
    for name in getattr(model, "optsys_forward_methods", ()):
        setattr(engine, name, functools.partial(engine, name))
    return engine


def zero_backward(engine, loss: torch.Tensor, last: bool) -> None:
    """Backward of one micro-batch's (already step-normalized) loss; `last`: the step's last micro-batch, where
    ZeRO finishes reducing the step's gradients. No 1/gradient_accumulation_steps scaling: the loss already
    carries the step's normalization."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)


def zero_step(engine) -> float:
    """Clip (gradient_clipping), AdamW step, LR schedule step, clear grads; returns the pre-clip global norm."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def full_fp32_state_dict(engine, model) -> dict:
    """`model`'s state dict on CPU with every parameter taken from the ZeRO optimizer's fp32 master copy (under
    bf16 the module's own weights are bf16 roundings of those). A collective: every rank calls, in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param

    full: dict[int, torch.Tensor] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # tied weights: both names, one gather
        if id(p) not in full:
            value = safe_get_full_fp32_param(p) if p.requires_grad else None
            full[id(p)] = (value if value is not None else p.detach()).detach().cpu().clone()
        out[name] = full[id(p)]
    params = set(out)
    for name, b in model.state_dict().items():  # buffers (not partitioned)
        if name not in params:
            out[name] = b.detach().cpu()
    return out


@dataclasses.dataclass(frozen=True)
class EngineState:
    """The sharded-state saver optsys.checkpoint takes for a DeepSpeed run (it knows nothing of DeepSpeed):
    the engine owns model, optimizer partitions and LR schedule, and saves and loads them itself."""

    engine: object
    backend: str = "deepspeed"

    def save(self, folder: Path) -> None:
        save_engine(self.engine, folder)

    def load(self, folder: Path) -> None:
        load_engine(self.engine, folder)


def save_engine(engine, folder: Path) -> None:
    """DeepSpeed's checkpoint of model, optimizer partitions and LR schedule into `folder`/deepspeed/ (plus its
    zero_to_fp32.py converter beside it). Every rank calls."""
    engine.save_checkpoint(str(folder), tag="deepspeed", save_latest=False)


def load_engine(engine, folder: Path) -> None:
    """The inverse of save_engine. Every rank calls."""
    path, _ = engine.load_checkpoint(str(folder), tag="deepspeed", load_module_strict=True,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {folder}/deepspeed")
