"""A trainer's run around its loop, the same for every trainer (the skeleton they call, top to bottom):

    run = start_run(cfg, world)             # seed, run folder, the checkpoint to resume from, precision
    ... load the model and data; summary = {..., **run_summary(run, model)}
    ... build optimizer and schedule; fingerprint = run_fingerprint(...)
    loop = resume_loop(run, summary, ...)   # restore a checkpoint (or start fresh), open the metrics log
    for step in range(loop.start_step + 1, max_steps + 1):
        ... the trainer's own step; log train_metrics(...); stop_if_not_finite(...); save_training_checkpoint(...)
    ... final evals and the final model
    return finish_run(run, loop.log, summary)   # summary.json, plots, rank 0 reports

Also the run folder's rules (a new folder, overwrite=true moving the old run aside, resume=true continuing one
with the same config) and the metric stream's sinks.
"""

from __future__ import annotations

import math
import os
import random
import resource
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from optsys.checkpoint import (
    CHECKPOINTS,
    CheckpointError,
    load_checkpoint,
    move_aside,
    resume_checkpoint,
    rewind_metrics,
    save_checkpoint,
)
from optsys.config import ConfigError, TrainConfig, check_folder_creatable, drop_other_sections, dump_yaml, to_dict
from optsys.parallel.dist import World, broadcast_object, rank0_mismatch
from optsys.parallel.zero import EngineState
from optsys.stages import stage_provenance
from optsys.telemetry.metrics import MetricsLog
from optsys.telemetry.nvtx import phase
from optsys.trainers.common import SAME_INPUTS_HINT, MetricWindow, RunClock
from optsys.trainers.precision import Precision, resolve_precision


@dataclass(frozen=True)
class Run:
    """What a trainer opens before its model loads and closes after its loop."""

    cfg: TrainConfig
    world: World
    out_dir: Path
    resume_from: Path | None  # the checkpoint to continue from; None for a new run
    precision: Precision
    t_start: float


def start_run(cfg: TrainConfig, world: World) -> Run:
    """The opening every trainer shares, before any model loads: the seed, the run folder (rank 0 prepares it;
    a refused folder stops every rank), the checkpoint to resume from (an unusable one is refused now), and the
    precision plan (printed by rank 0)."""
    t_start = time.time()
    set_seed(cfg.seed)
    out_dir = run_output_dir(cfg, world)
    resume_from = locate_resume(cfg, out_dir, world)  # fails before anything loads
    precision = resolve_precision(cfg.trainer.precision, cfg.model.dtype, world.device)
    return Run(cfg, world, out_dir, resume_from, precision, t_start)


def run_summary(run: Run, model) -> dict:
    """The summary entries every run has: the model's size, the world, the stage folders it starts from
    (`model/stage`, ...); prints the precision plan on rank 0."""
    if run.world.is_main:
        print(run.precision.describe())
    return {"model/parameters": sum(p.numel() for p in model.parameters()),
            "parallel/world_size": run.world.size, "parallel/nodes": run.world.nodes, **stage_provenance(run.cfg)}


@dataclass
class Loop:
    """Where the loop starts: fresh, or as the checkpoint left it (the clock, the last loss and the open metric
    window ride in every checkpoint, so logged means and totals match an uninterrupted run)."""

    log: MetricsLog
    start_step: int
    position: tuple[int, int]  # (epoch, index) of the step stream
    clock: RunClock
    loss: float
    meter: MetricWindow


def resume_loop(run: Run, summary: dict, *, model, optimizer, scheduler, fingerprint: dict, keys: tuple[str, ...],
                engine=None) -> Loop:
    """Restore run.resume_from into model / optimizer / scheduler (or the DeepSpeed `engine`) after its checks, or
    start fresh; add the saved before-training summary (those evals are not measured again) and open the metrics
    log (after a resume rewound metrics.jsonl). A saved metric window holds every rank's sums: rank 0 takes it
    back, the others start empty."""
    state = restore_run(run.resume_from, run.out_dir, run.world, model=model, optimizer=optimizer,
                        scheduler=scheduler, fingerprint=fingerprint, max_steps=run.cfg.trainer.max_steps,
                        engine=engine)
    summary.update(state["summary"])
    log = open_metrics(run.cfg, run.out_dir, run.world, start_step=state["step"])
    return Loop(log=log, start_step=state["step"], position=(state["data"]["epoch"], state["data"]["index"]),
                clock=RunClock(state["counters"]), loss=state["counters"].get("loss", float("nan")),
                meter=MetricWindow.from_state(keys, state["window"] if run.world.is_main else None))


def train_metrics(meter: MetricWindow, world: World, *, scheduler, grad_norm: float, epoch: int,
                  clock: RunClock) -> dict[str, float]:
    """What a supervised trainer logs every trainer.log_every steps: the window's means (`train/<key>`), the
    learning rate, the gradient norm, the epoch, the tokens so far and the window's throughput."""
    return {**meter.all_reduce(world).means("train/"), "train/lr": scheduler.get_last_lr()[0],
            "train/grad_norm": grad_norm, "train/epoch": epoch, "train/tokens": clock.total_tokens,
            "throughput/tokens_per_s": clock.window_tokens_per_s()}


def stop_if_not_finite(loss: float, step: int, progress, *, hint: str) -> None:
    """A FloatingPointError (after closing the progress bar) when the step's loss is nan or inf; `hint` says what
    to change."""
    if not math.isfinite(loss):
        progress.close()
        raise FloatingPointError(f"train/loss became {loss} at step {step}; {hint}")


def finish_run(run: Run, log: MetricsLog, summary: dict) -> dict | None:
    """Close the run: peak memory, wall time and the folder into summary.json, the log closed (plots drawn).
    Rank 0 reports for the job; the other ranks return None."""
    close_run(log, summary, device=run.world.device, t_start=run.t_start, out_dir=run.out_dir)
    return summary if run.world.is_main else None


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def prepare_output_dir(cfg: TrainConfig) -> Path:
    """Create the run folder and write the resolved config; refuse to mix two runs in one folder.

    overwrite=true moves a previous run's folder aside to `<dir>.old-<timestamp>` (one rename, said in the log),
    so the new run starts from an empty folder: none of the old checkpoints can be pruned as the new run's or
    picked up by a later resume, and nothing of the user's is deleted. resume=true instead requires the folder
    to hold a run whose config equals this one except `resume`, and keeps its config.yaml, metrics.jsonl
    (rewound by the trainer) and checkpoints.
    """
    if cfg.resume:
        return _check_resume_dir(cfg)
    if cfg.output_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg.output_dir = os.path.join("runs", f"{cfg.recipe}-{stamp}")
    check_output_dir(cfg)
    out = Path(cfg.output_dir)
    existing = out / "config.yaml"
    if existing.exists():  # overwrite=true (checked above)
        aside = move_aside(out)
        print(f"overwrite=true: moved the previous run in {out} to {aside}; this run starts in an empty folder "
              f"(delete {aside} when you no longer need it)", flush=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        existing.write_text(dump_yaml(cfg))
    except OSError as e:  # what check_output_dir cannot see without writing (a read-only or virtual filesystem)
        raise ConfigError(f"output_dir {out} cannot be written: {e.strerror or e}; pick another output_dir") from None
    return out


def run_output_dir(cfg: TrainConfig, world: World) -> Path:
    """The run folder on every rank: rank 0 prepares it (prepare_output_dir; the default name has rank 0's
    timestamp) and the others take its path. Under torchrun each rank then looks for a file rank 0 just made there
    (a fresh name, so no cached lookup answers): a folder that is not shared (a node-local disk, or a relative
    path on ranks in different working directories) stops every rank now, not at the first checkpoint, where
    each rank writes its own shards."""
    if not world.distributed:
        return prepare_output_dir(cfg)
    if world.is_main:
        out_dir, probe = prepare_output_dir(cfg), f".rank0-probe-{secrets.token_hex(4)}"
        (out_dir / probe).touch()
    out_dir, probe = broadcast_object((out_dir, probe) if world.is_main else None, world)  # after the touch
    sees = (out_dir / probe).exists()
    mismatch = rank0_mismatch(f"the ranks' views of output_dir {out_dir}", {"sees rank 0's files": sees}, world)
    if world.is_main:
        (out_dir / probe).unlink()
    if mismatch:
        raise ConfigError(f"{mismatch}. Every rank writes its checkpoint shards into output_dir: under torchrun "
                          "--nnodes give an absolute output_dir on a filesystem every node shares (the default "
                          "runs/<recipe>-<timestamp> is relative to each rank's working directory)")
    return out_dir


def check_output_dir(cfg: TrainConfig) -> None:
    """The ConfigErrors prepare_output_dir would raise, without writing anything. python -m optsys.train runs it
    on every rank before training, so a refused folder stops all ranks alike (prepare_output_dir runs on rank 0)."""
    if cfg.resume:
        _check_resume_dir(cfg)
        return
    if cfg.output_dir is None:
        return  # a new timestamped folder
    out = Path(cfg.output_dir)
    existing = out / "config.yaml"
    check_folder_creatable(cfg.output_dir, "output_dir")
    if existing.exists():
        if not cfg.overwrite:
            same = existing.read_text() == dump_yaml(cfg)
            raise ConfigError(
                f"output_dir {out} already holds a {'run of this same config' if same else 'different run'} "
                f"(see {existing}). Pick a new output_dir=..., or pass overwrite=true to replace it."
            )
        if out.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):  # out holds the cwd
            raise ConfigError(f"overwrite=true would move {out} aside, but it holds the current directory; run "
                              "from elsewhere or pick another output_dir")
    elif (out / CHECKPOINTS).exists():
        raise ConfigError(f"output_dir {out} holds {CHECKPOINTS}/ but no config.yaml (a run whose config was "
                          "removed): a new run would prune or resume those checkpoints. Move them away, or pick "
                          "another output_dir.")


def _check_resume_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.output_dir)
    existing = out / "config.yaml"
    if not existing.exists():
        raise ConfigError(
            f"resume=true, but output_dir {out} holds no run to continue (no {existing.name}). Check the "
            "path, or drop resume=true to start a new run there.")
    old = drop_other_sections(yaml.safe_load(existing.read_text()) or {})  # runs from before sections were dropped
    new = to_dict(cfg)
    # a run from before a setting existed ran with that setting's default (e.g. trainer.tensorboard)
    old = with_defaults(old, to_dict(TrainConfig(method=cfg.method)))
    for key in ("resume", "overwrite"):  # how a run was started, not what it is
        old.pop(key, None)
        new.pop(key, None)
    for d in (old, new):  # profiler ranges on or off: a resumed run may be profiled
        d.get("trainer", {}).pop("telemetry", None)
    diff = config_diff(old, new)
    if diff:
        raise ConfigError(
            f"resume=true continues the run in {out} with its own config ({existing}), but this command "
            "changes it:\n  " + "\n  ".join(diff) + "\nResume with the run's settings, or drop resume=true "
            "and pick a new output_dir to start a new run with these.")
    return out


def with_defaults(old: dict, defaults: dict) -> dict:
    """`old` with the keys it lacks (at any depth) taken from `defaults`."""
    out = dict(old)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = with_defaults(out[key], value)
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


def open_metrics(cfg: TrainConfig, out_dir: Path, world: World, start_step: int = 0) -> MetricsLog:
    """The run's MetricsLog with the sinks trainer.* turns on (rank 0 only writes). Open it after a resume
    rewound metrics.jsonl; `start_step` is the step the run continues from (0 for a new run)."""
    tc = cfg.trainer
    return MetricsLog(out_dir, enabled=world.is_main, tensorboard=tc.tensorboard, plots=tc.plots,
                      wandb_project=tc.wandb_project if tc.wandb else None,
                      run_config=to_dict(cfg) if tc.wandb else None, start_step=start_step)


def close_run(log, summary: dict, *, device: torch.device, t_start: float, out_dir: Path) -> dict:
    """Add peak memory, total wall time and the output dir to `summary`, write summary.json, close the log (which
    draws the run's plots with trainer.plots)."""
    summary["memory/peak_mb"] = peak_memory_mb(device)
    summary["time/total_s"] = time.time() - t_start
    summary["output_dir"] = str(out_dir)
    log.write_summary(summary)
    log.close()
    return summary


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on CUDA; peak resident set size of the process on CPU.

    On Linux this reads VmHWM (this process's own high-water mark): getrusage's ru_maxrss is not reset by
    exec, so a process started by a bigger one would report its parent's peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


# ---------------------------------------------------------------------------- steps, metrics, resume


def locate_resume(cfg: TrainConfig, out_dir: Path, world: World) -> Path | None:
    """The checkpoint a resume=true run continues from (None without resume), or a CheckpointError.

    Call it before loading anything. Rank 0 picks, so every rank loads the same checkpoint."""
    if not cfg.resume:
        return None
    found, error = None, None
    if world.is_main:
        try:
            found = resume_checkpoint(out_dir)
        except CheckpointError as e:
            error = str(e)
    found, error = broadcast_object((found, error), world)
    if error is not None:
        raise CheckpointError(error)
    return found


def restore_run(path: Path | None, out_dir: Path, world: World, *, model, optimizer, scheduler,
                fingerprint: dict, max_steps: int, engine=None) -> dict:
    """The trainer state to start from: a fresh one when `path` is None; else load checkpoint `path` into
    model / optimizer / scheduler (or the DeepSpeed `engine` that owns them) after its fingerprint and hashes
    check, drop the metrics rows a killed run logged after it, and return its trainer state."""
    mismatch = rank0_mismatch("the run fingerprints (model, data, settings)", fingerprint, world)
    if mismatch:  # e.g. a node with another copy of data.dataset: its ranks would train on other batches
        raise ConfigError(f"{mismatch}. {SAME_INPUTS_HINT}.")
    if path is None:
        return {"step": 0, "data": {"epoch": 0, "index": 0}, "counters": {}, "window": None, "summary": {}}
    state = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, fingerprint=fingerprint,
                            saver=EngineState(engine) if engine is not None else None)
    if world.is_main:
        for log_file in ("metrics.jsonl", "completions.jsonl"):  # rows written after the checkpoint go
            rewind_metrics(out_dir / log_file, state["step"])
        print(f"resuming {out_dir} from {path.name} (step {state['step']} of {max_steps})")
    return state


def eval_due(tc, step: int) -> bool:
    """Every trainer.eval_every steps, whatever log_every is; not at the last step (the final eval runs there)."""
    return bool(tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps)


def checkpoint_due(tc, step: int) -> bool:
    """Every trainer.save_every steps, and at the last step."""
    return bool(tc.save_every and step % tc.save_every == 0) or step == tc.max_steps


def save_training_checkpoint(out_dir: Path, step: int, cfg: TrainConfig, world: World, *, model, optimizer,
                             scheduler, fingerprint: dict, clock: RunClock, position: tuple[int, int],
                             counters: dict, summary: dict, window: dict | None = None, engine=None) -> None:
    """Checkpoint `step` with what the loop needs to continue: data position, the clock plus `counters`
    (JSON), an open metric window, the before-training summary. Every rank calls under torchrun (DCP shards or
    the DeepSpeed `engine`'s checkpoint, per-rank RNG; rank 0 writes the rest). The write's time is taken out of
    the training time."""
    t0 = time.time()
    with phase("checkpoint"):
        save_checkpoint(out_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                        saver=EngineState(engine) if engine is not None else None,
                        fingerprint=fingerprint, keep_last=cfg.trainer.keep_last, sharded=world.distributed,
                        trainer_state={"data": {"epoch": position[0], "index": position[1]},
                                       "counters": {**clock.state(), **counters}, "window": window,
                                       "summary": before_summary(summary)})
    clock.pause(time.time() - t0)


def before_summary(summary: dict) -> dict:
    """The summary entries measured before training (kept through a resume, not measured again)."""
    return {k: v for k, v in summary.items() if k.endswith("_before") or k.endswith("before_s")}
