"""Atomic checkpoints and exact resume, shared by every trainer.

A checkpoint is a folder `<out>/checkpoints/step-<step:08d>/`:

    model.safetensors     model.state_dict(), tied tensors stored once (aliases in its metadata)
    optimizer.pt          optimizer.state_dict()   (torch.save; loaded with weights_only=True)
    scheduler.pt          scheduler.state_dict()
    rng-rank-<r>.pt       python / torch CPU / CUDA RNG states, one file per rank
    trainer_state.json    what the loop needs to continue: step, data position, running counters
    manifest.json         written LAST: every file's size and sha256, plus the run fingerprint

Everything is written into `step-XXXXXXXX.tmp-<pid>-<rand>/` and renamed into place, so a kill
during a save leaves either the previous complete checkpoints or a `.tmp-` folder that
`latest_checkpoint` ignores and the next save deletes. A folder counts as complete only if it
holds a manifest; `load_checkpoint` re-hashes every file against it before touching the model.

Sharded (FSDP2, under torchrun) runs save model and optimizer through torch.distributed.checkpoint
instead of model.safetensors + optimizer.pt: `dcp/` holds every rank's shards (`__<r>_0.distcp`) and
DCP's `.metadata`; each rank writes its own `rng-rank-<r>.pt`; rank 0 writes scheduler.pt and
trainer_state.json. After a barrier each rank hashes the files it wrote (`file_owner`), and rank 0 gathers
those (name, size, sha256) lists into the manifest (which also records the world size): no rank reads
another's shards, so a save costs each rank one read of its own 1/W of the state. At load each rank
verifies its share the same way and the verdicts are exchanged, so every rank raises the same error.
The ranks must share the output folder's filesystem. The folder layout, manifest,
fingerprint and trainer_state stay the same, so `latest_checkpoint` and resume logic do not change.

World size at resume: a sharded checkpoint may be resumed with a different number of ranks (one
process included). DCP reshards model and optimizer state exactly, and the data position, schedule
and counters are global, so the run continues; what cannot carry over are the per-rank RNG streams
(rank r takes rng-rank-<r>.pt if it exists, else rank 0's) and the float reduction order, so such a
resume matches an uninterrupted run to rounding, not bit for bit, and says so in a printed line. We
allow it rather than refuse because losing a node should not strand a run, and nothing in the SFT
loop draws random numbers per rank. A single-process checkpoint (model.safetensors) is refused under
torchrun: its optimizer state is keyed by parameter index, not by name, so it cannot be resharded.

DeepSpeed (parallel.backend=deepspeed, optsys/parallel/zero.py) runs take the sharded path with DeepSpeed's own
save_checkpoint in place of DCP: `deepspeed/` holds its files (`mp_rank_00_model_states.pt` with the weights and
LR schedule under ZeRO-2, rank 0's; `zero_pp_rank_<r>_mp_rank_00_{optim,model}_states.pt`, rank r's partitions),
`zero_to_fp32.py` is DeepSpeed's converter to a plain state dict, and scheduler.pt is absent (DeepSpeed saves the
schedule). The manifest records `"backend": "deepspeed"`; such a checkpoint resumes only under DeepSpeed and
with the world size that saved it (ZeRO partitions are not resharded at load).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import shutil
import time
from pathlib import Path

import torch

from optsys.errors import CheckpointError

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_TMP_DIR = re.compile(r"^step-\d{8,}\.tmp-")


def move_aside(out: Path) -> Path:
    """Rename run folder `out` to a free `<out>.old-<timestamp>[-N]` beside it and return the new path."""
    base = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    aside, n = base, 0
    while aside.exists():
        n += 1
        aside = base.with_name(f"{base.name}-{n}")
    os.rename(out, aside)
    return aside


# ---------------------------------------------------------------------------- fingerprint


def model_config_sha256(model) -> str:
    """Hash of the architecture (HF config), without fields that change with paths or versions."""
    config = getattr(model, "config", None)
    raw = config.to_dict() if config is not None else {}
    keep = {k: v for k, v in raw.items()
            if not k.startswith("_") and k not in ("transformers_version", "name_or_path", "dtype", "torch_dtype")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_stamp(name_or_path: str | None) -> str | None:
    """Identity of the weight files in a local model folder: sha256 over each file's relative name, size
    and mtime (cheap: nothing is read), so a checkpoint retrained into the same path no longer matches.
    None for anything that is not a local folder (hub ids are named by id and revision; `tiny:` models
    are rebuilt deterministically). Sources such as `stage:<recipe>` are resolved to their folder by the
    caller (optsys.sources)."""
    if not name_or_path or not Path(name_or_path).is_dir():
        return None
    root = Path(name_or_path)
    h = hashlib.sha256()
    for f in sorted(f for f in root.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES):
        st = f.stat()
        h.update(f"{f.relative_to(root)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def run_fingerprint(cfg, model, *, num_rows: int | None = None, data_sha256: str | None = None) -> dict:
    """What must not change between a run and its resume: model, method, data identity and order.

    `num_rows` is the number of training examples the trainer actually uses (after tokenization and
    skipping); `data_sha256` optionally pins their content. Both default to what the config alone says.
    The data order also depends on data.max_tokens (packing), trainer.batch_tokens (steps) and seed.
    """
    d = cfg.data
    source = f"task:{d.task} difficulty={d.difficulty}" if d.task else f"{d.dataset} split={d.split}"
    fp = {
        "method": cfg.method,
        "recipe": cfg.recipe,
        "model.name_or_path": cfg.model.name_or_path,
        "model.config_sha256": model_config_sha256(model),
        "model.num_parameters": sum(p.numel() for p in model.parameters()),
        "model.dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "data.source": source,
        "data.num_rows": num_rows if num_rows is not None else (d.num_train if d.task else None),
        "data.max_tokens": d.max_tokens,
        "data.train_on_prompt": d.train_on_prompt,
        "trainer.batch_tokens": cfg.trainer.batch_tokens,
        "seed": cfg.seed,
    }
    if data_sha256 is not None:
        fp["data.sha256"] = data_sha256
    return fp


def _fingerprint_diff(saved: dict, now: dict) -> list[str]:
    return [f"{key}: checkpoint has {saved.get(key)!r}, this run has {now.get(key)!r}"
            for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]


# ---------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):  # python's RNG state is nested tuples; make sure a round trip keeps them tuples
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------- files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


_RANK_FILE = re.compile(r"^(?:dcp/__(\d+)_\d+\.distcp|rng-rank-(\d+)\.pt"
                        r"|deepspeed/zero_pp_rank_(\d+)_mp_rank_\d+_(?:optim|model)_states\.pt)$")


def file_owner(name: str) -> int:
    """The rank that writes checkpoint file `name` (a path relative to the checkpoint folder): DCP's shard
    files `dcp/__<r>_<i>.distcp`, `rng-rank-<r>.pt` and DeepSpeed's `deepspeed/zero_pp_rank_<r>_*` are rank r's;
    everything else is rank 0's."""
    m = _RANK_FILE.match(name)
    return int(next(g for g in m.groups() if g is not None)) if m else 0


def rank_share(names, rank: int, world_size: int) -> list[str]:
    """The files rank `rank` of `world_size` hashes or verifies: those it writes. With another world size at
    resume (owner % world_size) every file still has exactly one verifier."""
    return [n for n in names if file_owner(n) % world_size == rank]


def hash_files(root: Path, names) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of files under `root`, each fsynced first (its bytes are on disk)."""
    out = {}
    for name in names:
        path = root / name
        _fsync(path)
        out[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return out


def _relative_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _save_weights(state_dict: dict, path: Path) -> None:
    """safetensors refuses tensors that share storage (tied embeddings): store each storage once and
    record the other names as aliases in the file's metadata."""
    from safetensors.torch import save_file

    tensors, aliases, seen = {}, {}, {}
    for name, t in state_dict.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases), "format": "pt"})


def _load_weights(path: Path) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    state = load_file(str(path), device="cpu")
    for name, target in aliases.items():
        state[name] = state[target]
    return state


def checkpoint_dir(out_dir, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(out_dir) -> list[Path]:
    """Complete checkpoints (manifest present), oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "manifest.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir) -> Path | None:
    """The newest complete checkpoint under <out_dir>/checkpoints/, or None."""
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


# ---------------------------------------------------------------------------- save


def save_checkpoint(out_dir, step: int, *, model, optimizer, scheduler, trainer_state: dict,
                    fingerprint: dict, keep_last: int = 2, rank: int = 0, sharded: bool = False,
                    saver=None) -> Path:
    """Write checkpoint `step` atomically, then keep only the newest `keep_last` complete ones.

    Returns the checkpoint folder. trainer_state must be JSON-serializable (floats round-trip exactly).
    `saver` is the sharded-state saver of a backend that owns model, optimizer and schedule (DeepSpeed:
    optsys.parallel.zero.EngineState): `saver.save(folder)` / `saver.load(folder)`, with `saver.backend` named in
    the manifest. With a saver every rank calls, in one process too.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if sharded or saver is not None:
        return _save_sharded(out_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                             trainer_state=trainer_state, fingerprint=fingerprint, keep_last=keep_last, saver=saver)
    if rank != 0:
        raise ValueError("an unsharded checkpoint is written by rank 0 alone; pass sharded=True under FSDP2")
    tmp = _new_tmp(out_dir, step)
    _save_weights(model.state_dict(), tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / f"rng-rank-{rank}.pt")
    _write_json(tmp / "trainer_state.json", {"step": step, **trainer_state})
    return _publish(tmp, out_dir, step, world_size=1, sharded=False, fingerprint=fingerprint, keep_last=keep_last)


def _new_tmp(out_dir, step: int) -> Path:
    """A fresh `step-XXXXXXXX.tmp-<pid>-<rand>/` folder, after deleting leftovers of killed saves."""
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.iterdir():
        if _TMP_DIR.match(stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f"{checkpoint_dir(out_dir, step).name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, out_dir, step: int, *, world_size: int, sharded: bool, fingerprint: dict,
             keep_last: int, files: dict | None = None, backend: str | None = None) -> Path:
    """Write the manifest LAST, rename into place, prune. `files`: every file's size and sha256 (sharded saves
    gather them from the ranks); None hashes every file under `tmp` (subfolders too) here."""
    if files is None:
        files = hash_files(tmp, _relative_files(tmp))
    for folder in [p for p in tmp.rglob("*") if p.is_dir()]:
        _fsync(folder)  # the shard files' directory entries
    manifest = {"format": FORMAT_VERSION, "step": step, "world_size": world_size, "sharded": sharded,
                "files": files, "fingerprint": fingerprint}
    if backend is not None:
        manifest["backend"] = backend
    _write_json(tmp / "manifest.json", manifest)
    _fsync(tmp / "manifest.json")
    final = checkpoint_dir(out_dir, step)
    if final.exists():  # the same step saved again (e.g. a rerun): the new one wins
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(final.parent)  # make the rename itself durable

    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _dcp_state(model, optimizer) -> dict:
    """Sharded (not gathered) model and optimizer state dicts, keyed by parameter name: DCP writes
    each rank's shards and can reshard them at load time for another world size."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from optsys.parallel.dist import reshard

    reshard(model)  # after a no-grad forward the root may hold unsharded params, which the optimizer does not know
    options = StateDictOptions(full_state_dict=False)
    return {"model": get_model_state_dict(model, options=options),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}


def _save_sharded(out_dir, step: int, *, model, optimizer, scheduler, trainer_state: dict, fingerprint: dict,
                  keep_last: int, saver=None) -> Path:
    """Every rank must call. Rank 0 makes the tmp folder and tells the others its name; every rank writes its DCP
    shards (or the saver's: DeepSpeed's engine checkpoint) and its RNG state; after a barrier rank 0 writes the
    rest and the manifest, renames and prunes; a last barrier keeps ranks from racing ahead of the rename."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    rank, world_size = dist.get_rank(), dist.get_world_size()
    box = [str(_new_tmp(out_dir, step)) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    tmp = Path(box[0])
    if saver is not None:
        saver.save(tmp)  # collective: weights, optimizer partitions and LR schedule
    else:
        dcp.save(_dcp_state(model, optimizer), checkpoint_id=tmp / "dcp")  # collective
    torch.save(rng_state(), tmp / f"rng-rank-{rank}.pt")
    if rank == 0:
        if saver is None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        _write_json(tmp / "trainer_state.json", {"step": step, **trainer_state})
    dist.barrier()  # every rank's files are in tmp
    names = _relative_files(tmp)
    mine = hash_files(tmp, rank_share(names, rank, world_size))  # each rank reads only what it wrote
    shares = [None] * world_size if rank == 0 else None
    dist.gather_object(mine, shares, dst=0)
    if rank == 0:
        files = {name: meta for share in shares for name, meta in share.items()}
        if sorted(files) != names:
            raise CheckpointError(f"the ranks saw different files in {tmp} (hashed {sorted(files)}, rank 0 sees "
                                  f"{names}): the ranks must share the output folder's filesystem")
        _publish(tmp, out_dir, step, world_size=world_size, sharded=True, fingerprint=fingerprint,
                 keep_last=keep_last, files=files, backend=saver.backend if saver is not None else None)
    dist.barrier()
    return checkpoint_dir(out_dir, step)


# ---------------------------------------------------------------------------- load


def read_manifest(path) -> dict:
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no manifest.json, so it is incomplete (a save that "
                              f"was interrupted). Delete {path} to resume from the previous checkpoint.")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        manifest = {"error": str(e)}
    if not isinstance(manifest, dict) or not {"files", "fingerprint"} <= manifest.keys():
        raise CheckpointError(f"{manifest_path} is unreadable or incomplete. {_fallback_hint(path)}")
    return manifest


def verify_checkpoint(path, rank: int = 0, world_size: int = 1) -> dict:
    """Check the files against the manifest (size, then sha256); return the manifest. With a world size,
    only rank `rank`'s share (`rank_share`): the ranks together check every file once."""
    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest, rank_share(manifest["files"], rank, world_size))
    return manifest


def verify_files(path: Path, manifest: dict, names) -> None:
    """CheckpointError naming the first of `names` that is missing, has the wrong size or the wrong sha256."""
    fallback = _fallback_hint(path)
    for name in names:
        meta = manifest["files"][name]
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing. {fallback}")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"checkpoint file {f} has {size} bytes, its manifest says {meta['bytes']} "
                                  f"(truncated or overwritten). {fallback}")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"checkpoint file {f} does not match the sha256 in its manifest (corrupt). "
                                  f"{fallback}")


def _fallback_hint(path: Path) -> str:
    older = [p for p in list_checkpoints(path.parent.parent) if p.name < path.name]
    then = f"resume from {older[-1].name}" if older else "start the run again (it has no older checkpoint)"
    return f"Delete the folder {path} to {then}."


def load_checkpoint(path, *, model, optimizer, scheduler, fingerprint: dict, restore_rng: bool = True,
                    saver=None) -> dict:
    """Verify checkpoint `path` (fingerprint, then file hashes), then restore model, optimizer,
    scheduler and RNG in place; return its trainer_state (with "step"). Under torchrun every rank calls
    it: rank 0 checks the manifest and fingerprint, each rank verifies the files it owns, and each restores
    its own shards and RNG (see the module docstring). A `saver` (see save_checkpoint) restores its own state."""
    path = Path(path)
    rank, world_size = _rank_and_size()
    # Under torchrun rank 0 checks the fingerprint and tells the others; then each rank hashes its share of the
    # files and the verdicts are exchanged, so all ranks fail with the same message, or go on, together.
    manifest, error = None, None
    if rank == 0:
        try:
            manifest = _fingerprint_checked(path, fingerprint, world_size,
                                            backend=saver.backend if saver is not None else None)
        except CheckpointError as e:
            error = str(e)
    manifest, error = _shared_from_rank0((manifest, error), world_size)
    if error is None:
        try:
            verify_files(path, manifest, rank_share(manifest["files"], rank, world_size))
        except CheckpointError as e:
            error = str(e)
        error = _first_error(error, world_size)
    if error is not None:
        raise CheckpointError(error)
    if manifest.get("sharded"):
        return _load_sharded(path, manifest, model=model, optimizer=optimizer, scheduler=scheduler,
                             restore_rng=restore_rng, saver=saver)

    state = _load_weights(path / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path / 'model.safetensors'} does not fit the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    if restore_rng:
        set_rng_state(torch.load(path / "rng-rank-0.pt", map_location="cpu", weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())


def _rank_and_size() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _shared_from_rank0(obj, world_size: int):
    if world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _first_error(error: str | None, world_size: int) -> str | None:
    """The lowest rank's error message (None if no rank has one), on every rank."""
    if world_size == 1:
        return error
    import torch.distributed as dist

    errors = [None] * world_size
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def _checked_manifest(path: Path, fingerprint: dict, world_size: int) -> dict:
    """The manifest after the fingerprint and layout checks and a check of every file (one process)."""
    manifest = _fingerprint_checked(path, fingerprint, world_size)
    verify_files(path, manifest, manifest["files"])
    return manifest


def _fingerprint_checked(path: Path, fingerprint: dict, world_size: int, backend: str | None = None) -> dict:
    """The manifest after the fingerprint check and the layout checks: a single-process checkpoint is not
    resharded; a DeepSpeed one (backend="deepspeed") resumes only under DeepSpeed, with the world that saved it."""
    manifest = read_manifest(path)
    diff = _fingerprint_diff(manifest["fingerprint"], fingerprint)
    if diff:
        raise CheckpointError(
            f"checkpoint {path} belongs to a different run, so resuming would not continue it:\n  "
            + "\n  ".join(diff)
            + "\nResume only with the settings the run started with, or drop resume=true and pick a new "
              "output_dir to start a new run.")
    saved = manifest.get("backend")
    if saved != backend:
        ran = {"deepspeed": "parallel.backend=deepspeed", None: "parallel.backend=fsdp2"}
        raise CheckpointError(f"checkpoint {path} was saved by a {ran.get(saved, saved)} run; this run has "
                              f"{ran[backend]}, which cannot read it. Resume with {ran.get(saved, saved)}.")
    if world_size > 1 and not manifest.get("sharded"):
        raise CheckpointError(
            f"checkpoint {path} was saved by a single process (model.safetensors, optimizer state keyed by "
            f"parameter index), so it cannot be resharded over this job's {world_size} ranks. Resume it with "
            f"one process (python -m optsys.train ... resume=true), or start a new run under torchrun.")
    if saved == "deepspeed" and int(manifest.get("world_size", 1)) != world_size:
        raise CheckpointError(
            f"checkpoint {path} was saved by {manifest.get('world_size')} DeepSpeed rank(s) and this job has "
            f"{world_size}: ZeRO partitions are not resharded at load. Resume with {manifest.get('world_size')} "
            f"rank(s) in all, or start a new run from the weights (zero_to_fp32.py beside them converts them).")
    return manifest


def _load_sharded(path: Path, manifest: dict, *, model, optimizer, scheduler, restore_rng: bool,
                  saver=None) -> dict:
    """Every rank must call (DCP reads the shards it needs, resharding for another world size; DeepSpeed reads
    its own files)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    rank, world_size = _rank_and_size()
    if saver is not None:  # same world size (checked with the fingerprint); schedule restored by the saver
        saver.load(path)
        if restore_rng:
            set_rng_state(torch.load(path / f"rng-rank-{rank}.pt", map_location="cpu", weights_only=True))
        return json.loads((path / "trainer_state.json").read_text())
    saved = int(manifest.get("world_size", 1))
    if saved != world_size and rank == 0:
        print(f"checkpoint {path.name} was saved by {saved} ranks and resumes with {world_size}: model and "
              f"optimizer state are resharded exactly, but per-rank RNG streams cannot be carried over exactly "
              f"(rank r takes rng-rank-r.pt if present, else rank 0's) and the reduction order changes, so the "
              f"run continues to rounding, not bit for bit.", flush=True)
    state = _dcp_state(model, optimizer)  # this world's layout; dcp.load fills it in place
    dcp.load(state, checkpoint_id=path / "dcp")
    options = StateDictOptions(full_state_dict=False)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    if restore_rng:
        own = path / f"rng-rank-{rank}.pt"
        set_rng_state(torch.load(own if own.is_file() else path / "rng-rank-0.pt", map_location="cpu",
                                 weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())


def resume_checkpoint(out_dir) -> Path:
    """The checkpoint a resume=true run continues from, or a CheckpointError that says what to do."""
    found = latest_checkpoint(out_dir)
    if found is None:
        raise CheckpointError(
            f"resume=true, but {Path(out_dir) / CHECKPOINTS} holds no complete checkpoint (a folder "
            "step-XXXXXXXX with a manifest.json), so there is nothing to continue. Drop resume=true to "
            "start the run over (with overwrite=true to reuse this output_dir), and set trainer.save_every "
            "to checkpoint during training.")
    return found


def rewind_metrics(path, step: int) -> None:
    """Keep only the rows with step <= `step` of a jsonl log (metrics.jsonl, completions.jsonl: rows a killed run
    wrote after its last checkpoint are replaced by the resumed run's); written to a temp file and renamed, so
    atomic."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        if row.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
