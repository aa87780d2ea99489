"""Model sources resolved at the top: the entry points (python -m optsys.train, optsys.eval, optsys.serve) hand
`resolve_source` to the trainers and the eval runner, which call it for each model they load. It trains a
`stage:<recipe>` first (or reuses it from the cache: optsys.stages says where), and builds a `tiny:<preset>`;
below this layer a model load takes a folder and never trains anything.

A lock file beside a stage's folder makes a second process wait for the one training it, then reuse it; a
folder without summary.json or final weights (a killed run) is moved aside to `<folder>.old-<timestamp>` and
trained again. Under torchrun (WORLD_SIZE > 1) every rank resolves inside the trainer's process group (the
trainers load models inside `torchrun_world`): rank 0 decides reuse or train and tells the others, and the
stage is trained by the same ranks (FSDP2, the nested `torchrun_world` leaves the group open) before the main
run continues. The cache root must be one folder that every rank sees at the same path (multi-node: a shared
disk, OPTSYS_CACHE_DIR on every node); a rank that does not see the stage complete stops every rank with a
ConfigError saying so.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import random
import time
from pathlib import Path

import torch

from optsys.checkpoint import move_aside
from optsys.config import TrainConfig
from optsys.errors import ConfigError
from optsys.methods import METHODS
from optsys.models.sources import local_source
from optsys.models.tiny import folder_lock
from optsys.parallel.dist import World, rank0_mismatch
from optsys.stages import final_dir, is_complete, is_stage, stage_config, stage_name, stage_root

_announced: set[tuple[str, int]] = set()  # (folder, summary mtime) already reported "reusing" in this process


def resolve_source(value: str, seed: int = 0, dtype: str = "float32") -> str:
    """A model source as a folder (or hub id): `stage:<recipe>` trained first or reused (resolve_stage), the rest
    as optsys.models.sources.local_source resolves it (`tiny:<preset>` built or reused, `gguf:<file>` and named
    GGUF models dequantized once, stored in `dtype`)."""
    if is_stage(value):
        return resolve_stage(value)
    return local_source(value, seed, dtype)


def resolve_stage(value: str) -> str:
    """`stage:<recipe>` -> the path of its final model folder, training the stage first if needed."""
    return str(ensure_stage(stage_config(stage_name(value))))


def ensure_stage(cfg: TrainConfig) -> Path:
    """Reuse the complete run in cfg.output_dir or train it there (by every rank under torchrun); returns
    final_dir(cfg). The caller's RNG state is kept, so a run continues alike whether its stage was trained
    or reused."""
    out, final = Path(cfg.output_dir), final_dir(cfg)
    rank, size = _rank_size()
    with _lock(out, enabled=rank == 0):
        done = _broadcast(is_complete(cfg) if rank == 0 else None, size)
        if done:
            if rank == 0:
                _announce_reuse(cfg.recipe, out, final)
            _check_every_rank_sees(cfg, rank, size)
            return final
        if rank == 0:
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.exists():
                aside = move_aside(out)
                print(f"stage {cfg.recipe}: {out} is incomplete (no summary.json or final weights: a run that did "
                      f"not finish); moved it to {aside} and training again", flush=True)
            print(f"stage {cfg.recipe}: training it first into {out} (the run `python -m optsys.train --recipe "
                  f"{cfg.recipe}` would do; later runs reuse it)", flush=True)
        _barrier(size)
        trainer = importlib.import_module(METHODS[cfg.method].trainer)
        with _rng_kept():
            trainer.train(cfg, resolve=resolve_source)
        _barrier(size)  # rank 0 writes summary.json after the others have left the trainer
    if not _broadcast(is_complete(cfg) if rank == 0 else None, size):  # every rank raises alike
        raise RuntimeError(f"stage {cfg.recipe}: training ended but {out} lacks summary.json or {final.name}/")
    _check_every_rank_sees(cfg, rank, size)
    _announced.add((str(out), _summary_mtime(out)))
    return final


def _check_every_rank_sees(cfg: TrainConfig, rank: int, size: int) -> None:
    """Rank 0 decided reuse or trained the stage (into its own folder: trainers use rank 0's output_dir), but every
    rank loads the model from its own path: the same one, complete, on every rank, else a ConfigError on all of
    them (a cache root that is not one shared folder across nodes) instead of a missing-folder error on a few."""
    if size <= 1:
        return
    world = World(rank, size, 0, torch.device("cpu"))  # only for the object collectives
    view = {"folder": cfg.output_dir, "complete": is_complete(cfg)}
    mismatch = rank0_mismatch(f"stage {cfg.recipe}: the ranks' views of its cache folder (folder, complete)",
                              view, world)
    folder = _broadcast(cfg.output_dir, size)  # rank 0's, so that every rank raises the same message
    if mismatch:
        raise ConfigError(f"{mismatch}. Rank 0 has the stage complete in {folder}; every rank must see that folder "
                          "at the same path: under torchrun --nnodes, point OPTSYS_CACHE_DIR at one folder on a "
                          "filesystem every node shares")


def _announce_reuse(recipe: str, out: Path, final: Path) -> None:
    mark = (str(out), _summary_mtime(out))
    if mark in _announced:  # the same stage resolved again in this run (e.g. policy and reference)
        return
    _announced.add(mark)
    trained = time.strftime("%Y-%m-%d %H:%M", time.localtime(mark[1] / 1e9))
    print(f"stage {recipe}: reusing {final} (trained {trained})", flush=True)


def _summary_mtime(out: Path) -> int:
    try:
        return (out / "summary.json").stat().st_mtime_ns
    except OSError:
        return 0


@contextlib.contextmanager
def _rng_kept():
    state = random.getstate()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(state)


@contextlib.contextmanager
def _lock(out: Path, enabled: bool):
    """One process trains a stage, a second waits and then reuses it (rank 0 only under torchrun)."""
    if not enabled:
        yield
        return
    with folder_lock(out, f"stage: waiting for another process that is training {out}"):
        yield


def _rank_size() -> tuple[int, int]:
    """(rank, world size); under torchrun the trainer's process group must be open (see the module doc)."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ConfigError("a stage:<recipe> model is resolved under torchrun outside a trainer's process group; "
                          "train the stage first in one process (python -m optsys.train --recipe <stage>; it is "
                          f"cached in {stage_root()}) or let a trainer resolve it")
    return dist.get_rank(), dist.get_world_size()


def _broadcast(obj, size: int):
    if size <= 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(size: int) -> None:
    if size > 1:
        import torch.distributed as dist

        dist.barrier()


