"""Training stages: `model.name_or_path: stage:<recipe>` (or `pref.reference_model: stage:<recipe>`) names
another shipped recipe whose final model this run starts from. The stage is trained first, or reused when
the same run already finished in the cache, so `python -m optsys.train --recipe X` on a fresh machine runs
the SFT stage and then X.

Cache layout: `<cache root>/stages/<recipe>-<key>/` is the stage's ordinary run folder (config.yaml,
metrics.jsonl, summary.json, final/). The cache root is $OPTSYS_CACHE_DIR, else $XDG_CACHE_HOME/optsys or
~/.cache/optsys (tiny models live beside it in tiny/). <key> is the first 16 hex digits of the sha256 of the
stage's resolved config minus the keys that do not change the trained weights (STAGE_KEY_IGNORES), with a
nested stage, a tiny preset or a local model folder replaced by its own identity, and the optsys version:
change a setting of the stage's recipe and a new stage is trained beside the old one. A local
data.dataset file is named by its path only: edit it in place and the stale stage is reused (delete its folder).

A cached stage is complete when its summary.json (written last) and its final/*.safetensors exist; a folder
without them (a killed run) is moved aside to `<folder>.old-<timestamp>` and trained again. A lock file
beside the folder makes a second process wait for the one training the stage, then reuse it.

Under torchrun (WORLD_SIZE > 1) every rank calls resolve_stage inside the trainer's process group (the
trainers resolve the model inside `torchrun_world`): rank 0 decides reuse or train and tells the others, and
the stage is trained by the same ranks (FSDP2, the nested `torchrun_world` leaves the group open) before
the main run continues. The cache root must be one folder that every rank sees at the same path (multi-node: a
shared disk, OPTSYS_CACHE_DIR on every node); a rank that does not see the stage complete stops every rank with
a ConfigError saying so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import time
from pathlib import Path

import yaml

from optsys.config import ConfigError, TrainConfig, load_config, recipe_path, to_dict

PREFIX = "stage:"
MAX_STAGE_DEPTH = 3  # stages below a run: run <- a <- b <- c
# Settings that change how a run is logged, where it is written or how it is spread over ranks (like the world
# size: the same weights to rounding), not the weights it trains.
STAGE_KEY_IGNORES = ("output_dir", "overwrite", "resume", "trainer.progress", "trainer.telemetry",
                     "trainer.log_every", "trainer.save_every", "trainer.keep_last", "trainer.tensorboard",
                     "trainer.plots", "trainer.wandb", "trainer.wandb_project", "parallel")

_chain: list[str] = []  # the recipes whose validation is in progress, outermost first (cycle detection)
_announced: set[tuple[str, int]] = set()  # (folder, summary mtime) already reported "reusing" in this process


def is_stage(value) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def stage_name(value: str) -> str:
    return value[len(PREFIX):].strip()


def stage_root() -> Path:
    from optsys.models.tiny import cache_root

    return cache_root() / "stages"


# ---------------------------------------------------------------------------- config and validation


def check_stage_source(key: str, value: str, owner: str | None = None) -> None:
    """Config validation of `key: stage:<recipe>` (cheap, nothing loads): the recipe exists, its own config
    validates (nested stages too), no cycle and at most MAX_STAGE_DEPTH stages deep, and its final model
    is a plain model folder. Errors name `key` and the stage."""
    name = stage_name(value)
    if not name:
        raise ConfigError(f"{key}={value!r} names no recipe; write stage:<recipe>, e.g. stage:quickstart")
    try:
        recipe_path(name)
    except ConfigError as e:
        raise ConfigError(f"{key}={value!r}: {e}") from None
    chain = list(_chain) or ([owner] if owner else [])
    if name in chain:
        raise ConfigError(f"{key}={value!r}: the stages form a cycle {' -> '.join([*chain, name])}; a stage "
                          "must not (through its own stages) start from the run that names it")
    if len(chain) > MAX_STAGE_DEPTH:
        raise ConfigError(f"{key}={value!r}: stages nest more than {MAX_STAGE_DEPTH} deep "
                          f"({' -> '.join([*chain, name])}); train an inner stage on its own and name its "
                          "final/ folder instead")
    try:
        stage_config(name, _parents=chain)
    except ConfigError as e:
        raise ConfigError(f"{key}={value!r}: {e}") from None


def stage_config(name: str, *, _parents: list[str] | None = None) -> TrainConfig:
    """The stage's recipe as a TrainConfig (validated), its output_dir set to its cache folder.

    A validation error inside the stage's recipe is re-raised naming the stage and the key."""
    path = recipe_path(name)  # an unknown recipe: its own error (did you mean ...)
    saved = list(_chain)
    _chain[:] = [*(saved if _parents is None else _parents), name]
    try:
        cfg = load_config(name)
    except ConfigError as e:
        raise ConfigError(f"in stage recipe {name} ({path}): {e}") from None
    finally:
        _chain[:] = saved
    if cfg.model.lora.r > 0 and cfg.method != "rm" and not cfg.model.lora.save_merged:
        raise ConfigError(f"stage recipe {name} trains LoRA adapters (model.lora.r={cfg.model.lora.r}), so its "
                          "final/ is an adapter folder a later stage cannot start from; set "
                          f"model.lora.save_merged=true in {path} (the merged model is used)")
    cfg.output_dir = str(stage_root() / f"{name}-{stage_key(cfg)}")
    return cfg


def stage_key(cfg: TrainConfig) -> str:
    """16 hex digits identifying what the stage trains (see the module docstring)."""
    from optsys import __version__

    data = to_dict(cfg)
    for dotted in STAGE_KEY_IGNORES:
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    data["model"]["name_or_path"] = _source_identity(cfg.model.name_or_path)
    if "pref" in data and data["pref"].get("reference_model"):
        data["pref"]["reference_model"] = _source_identity(cfg.pref.reference_model)
    if "rl" in data and data["rl"].get("teacher"):
        data["rl"]["teacher"] = _source_identity(cfg.rl.teacher)
    data["optsys_version"] = __version__
    return hashlib.sha256(yaml.safe_dump(data, sort_keys=False).encode()).hexdigest()[:16]


def _source_identity(value: str) -> str:
    """A model source with what pins its weights: a nested stage's cache folder, a tiny preset's shape key,
    a local folder's weight-file stamp; a hub id is its own name (model.revision is in the config)."""
    if is_stage(value):
        return f"{value}@{Path(stage_config(stage_name(value)).output_dir).name}"
    if value.startswith("tiny:"):
        from optsys.models.tiny import PRESETS, _spec_key

        preset = value.split(":", 1)[1]
        return f"{value}@{_spec_key(PRESETS[preset], 0)}" if preset in PRESETS else value
    from optsys.checkpoint import weights_stamp

    stamp = weights_stamp(os.path.expanduser(value))
    return f"{value}@{stamp}" if stamp else value


def final_dir(cfg: TrainConfig) -> Path:
    """The model folder a stage hands on: final/, or final-merged/ for a LoRA stage."""
    merged = cfg.model.lora.r > 0 and cfg.method != "rm"
    return Path(cfg.output_dir) / ("final-merged" if merged else "final")


def is_complete(cfg: TrainConfig) -> bool:
    """summary.json is written after final/ (trainers' close_run): both present = the run finished."""
    return (Path(cfg.output_dir) / "summary.json").is_file() and any(final_dir(cfg).glob("*.safetensors"))


# ---------------------------------------------------------------------------- resolving (reuse or train)


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
                from optsys.trainers.common import move_aside

                aside = move_aside(out)
                print(f"stage {cfg.recipe}: {out} is incomplete (no summary.json or final weights: a run that did "
                      f"not finish); moved it to {aside} and training again", flush=True)
            print(f"stage {cfg.recipe}: training it first into {out} (the run `python -m optsys.train --recipe "
                  f"{cfg.recipe}` would do; later runs reuse it)", flush=True)
        _barrier(size)
        import importlib

        from optsys.methods import METHODS

        trainer = importlib.import_module(METHODS[cfg.method].trainer)
        with _rng_kept():
            trainer.train(cfg)
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
    import torch

    from optsys.parallel.dist import World, rank0_mismatch

    world = World(rank, size, 0, torch.device("cpu"))  # only for the object collectives
    view = {"folder": cfg.output_dir, "complete": is_complete(cfg)}
    mismatch = rank0_mismatch(f"stage {cfg.recipe}: the ranks' views of its cache folder (folder, complete)",
                              view, world)
    folder = _broadcast(cfg.output_dir, size)  # rank 0's, so that every rank raises the same message
    if mismatch:
        raise ConfigError(f"{mismatch}. Rank 0 has the stage complete in {folder}; every rank must see that folder "
                          "at the same path: under torchrun --nnodes, point OPTSYS_CACHE_DIR at one folder on a "
                          "filesystem every node shares")


def stage_provenance(cfg: TrainConfig) -> dict:
    """Summary entries naming the stage folders a run starts from (`model/stage`, `model/reference_stage`)."""
    out = {}
    for key, value in (("model/stage", cfg.model.name_or_path), ("model/reference_stage", cfg.pref.reference_model),
                       ("model/teacher_stage", cfg.rl.teacher)):
        if is_stage(value):
            out[key] = str(final_dir(stage_config(stage_name(value))))
    return out


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


def read_summary(cfg: TrainConfig) -> dict:
    return json.loads((Path(cfg.output_dir) / "summary.json").read_text())


@contextlib.contextmanager
def _rng_kept():
    import torch

    state = random.getstate()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(state)


@contextlib.contextmanager
def _lock(out: Path, enabled: bool):
    """An exclusive flock on `<folder>.lock`: one process trains a stage, a second waits and then reuses it."""
    if not enabled:
        yield
        return
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"stage: waiting for another process that is training {out}", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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


