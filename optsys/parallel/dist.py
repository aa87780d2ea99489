"""torchrun process groups and FSDP2 sharding, the same code path on gloo (CPU) and NCCL (GPU).

A single process (no WORLD_SIZE in the environment) gets a world of one and no process group, so
trainers call these helpers unconditionally.

Multi-node (`torchrun --nnodes N`): RANK orders the whole job, LOCAL_RANK only picks this node's device, and
nothing else here depends on where a rank runs. Every rank loads the model and data itself (FSDP2 shards what
each rank loaded; nothing is broadcast), so `rank0_mismatch` checks that the ranks agree before they train.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device
    nodes: int = 1  # torchrun's GROUP_WORLD_SIZE: how many launchers (machines) the job spans

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device_name: str = "auto", timeout_s: int = 600, group_of_one: bool = False) -> World:
    """Join the torchrun group if launched by torchrun (NCCL on CUDA, gloo on CPU). With `group_of_one`, a
    single process opens a 1-rank group of its own (in-memory store, no port): DeepSpeed needs
    torch.distributed even in one process (without it, it looks for MPI)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # this node's device index, not a rank in the job
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1")) if size > 1 else 1
    use_cuda = torch.cuda.is_available() if device_name == "auto" else device_name.startswith("cuda")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu" if device_name == "auto" else device_name)
    if size > 1 and not dist.is_initialized():
        # A rank that dies makes the others fail at their next collective after `timeout`,
        # with a message naming the collective, instead of hanging forever.
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                 timeout=datetime.timedelta(seconds=timeout_s))
    elif size == 1 and group_of_one and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, timeout=datetime.timedelta(seconds=timeout_s))
    return World(rank, size, local_rank, device, nodes)


def close_world(clean: bool = True) -> None:
    """Leave the torchrun group. After a normal end (`clean`) every rank first meets the others at a barrier,
    so that no rank destroys its group and exits while a peer still has collectives in flight on the same
    connections (a rank that left early took its gloo pairs down under a peer's last all-gather; under load
    that ended in SIGABRT, "terminate called without an active exception"). After an error the group goes at
    once: the other ranks may never reach a barrier, and torchrun tears the job down anyway."""
    if not dist.is_initialized():
        return
    if clean and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


@contextlib.contextmanager
def torchrun_world(device_name: str = "auto", group_of_one: bool = False):
    """`with torchrun_world(cfg.device) as world:` init_world, and close_world on the way out (a barrier first
    only when the body ended normally). Nested in an open group (a trainer training a stage:<recipe> first,
    optsys.stages), it joins that group and leaves it open for the outer run: only its opener closes it.
    `group_of_one`: see init_world (parallel.backend=deepspeed)."""
    was_open = dist.is_available() and dist.is_initialized()
    world = init_world(device_name, group_of_one=group_of_one)
    if was_open or not dist.is_initialized():
        # Not ours to close: an outer run's group, or none at all in one process (where an in-process vLLM
        # engine may open a 1-rank group of its own, which its shutdown destroys).
        yield world
        return
    try:
        yield world
    except BaseException:
        close_world(clean=False)
        raise
    close_world(clean=True)


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    """Sum a few scalars over ranks (one collective for all of them)."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_sum_tensor(t: torch.Tensor, world: World) -> torch.Tensor:
    """Elementwise sum of a tensor over ranks (a CPU tensor in, a CPU tensor out)."""
    if not world.distributed:
        return t
    moved = t.to(world.device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    return moved.to(t.device)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shard_model(model, world: World, param_dtype: torch.dtype | None = None):
    """FSDP2: `fully_shard` each decoder layer, then the root (embeddings, final norm, lm_head).

    Per-layer units let FSDP all-gather one layer's weights at a time, so a rank holds its 1/W
    shard of everything plus one full layer during forward/backward. With `param_dtype` (bf16 mixed
    precision) the shards stay as they are (fp32 master weights) while the all-gathered copies used
    for compute are `param_dtype`, and gradients are reduce-scattered in fp32.
    """
    if not world.distributed:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for layer in model.get_decoder().layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # The trainers' losses run backbone + fused lm_head loss (or the reward head) without calling forward:
    # register those methods so FSDP unshards the root's parameters around them (and reduce-scatters
    # their grads in backward). See optsys.models.packed.attach_forward_methods.
    for name in getattr(model, "optsys_forward_methods", ()):
        register_fsdp_forward_method(model, name)
    if hasattr(model, "peft_config"):
        # A peft model's generate calls the wrapped model's forward, not its own: same treatment.
        register_fsdp_forward_method(model, "generate")
    return model


def reshard(model) -> None:
    """Put an FSDP2 model's parameters back into their sharded form (a no-op otherwise).

    FSDP2 keeps the root's parameters unsharded after a forward that no backward follows (an eval, a
    reference pass, generation); while they are, `model.parameters()` yields the unsharded tensors, which
    an optimizer built or a state dict taken then would not match. Call it before either."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()


def full_state_dict(model, world: World) -> dict:
    """The whole model's weights on CPU (gathered from shards under FSDP2; every rank must call)."""
    if not world.distributed:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    reshard(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def broadcast_object(obj, world: World):
    """Rank 0's value of a small picklable object on every rank (e.g. a timestamped output dir)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj, world: World | None = None, group=None) -> list:
    """Every rank's value of a small picklable object, in rank order (one process: [obj]); with `group`, the
    ranks of that process group only."""
    if group is None and not world.distributed:
        return [obj]
    out = [None] * (world.size if group is None else dist.get_world_size(group))
    dist.all_gather_object(out, obj, group=group)
    return out


def rank0_mismatch(what: str, value: dict, world: World) -> str | None:
    """None when every rank's `value` equals rank 0's; else (on every rank alike) a line naming the ranks that
    differ, their hosts and the first keys where they do. Two small collectives: rank 0's dict is broadcast and
    each rank sends back only its verdict, so the cost does not grow with the number of ranks times the dict."""
    if not world.distributed:
        return None
    reference = broadcast_object(value, world)
    keys = sorted(str(k) for k in set(reference) | set(value) if reference.get(k) != value.get(k))
    verdicts = all_gather_objects((socket.gethostname(), keys[:3], len(keys), len(value)), world)
    bad = [(r, *verdict) for r, verdict in enumerate(verdicts) if verdict[2]]
    if not bad:
        return None
    shown = "; ".join(f"rank {r} on {host}: {n} of {total} entries differ ({', '.join(first)}"
                      f"{', ...' if n > len(first) else ''})" for r, host, first, n, total in bad[:4])
    more = f"; and {len(bad) - 4} more ranks" if len(bad) > 4 else ""
    return f"{what} differ from rank 0's (on {verdicts[0][0]}) on {len(bad)} of {world.size} ranks: {shown}{more}"


def weight_checksums(model) -> dict[str, int]:
    """{parameter name: integer sum of its raw bits}: exact and independent of summation order (unlike a float
    sum), so two ranks holding the same weights always agree and different random inits or checkpoints do not.
    One pass over the weights on their device; one transfer."""
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    names, sums = [], []
    for name, p in model.named_parameters():
        as_int = bits.get(p.element_size())
        if as_int is None or p.is_meta:
            continue
        names.append(name)
        sums.append(p.detach().view(as_int).sum(dtype=torch.int64))
    return dict(zip(names, torch.stack(sums).cpu().tolist())) if sums else {}


def rank_share(items: list, world: World) -> list:
    """This rank's items of a step: round-robin, so the ranks' shares are disjoint and cover all."""
    return items[world.rank :: world.size]


def local_steps(num_items: int, world: World) -> int:
    """Micro-batches every rank runs for a step: the same count on all ranks, or FSDP's collectives
    would wait forever on the rank with fewer. Ranks short of data run a zero-weighted filler."""
    return -(-num_items // world.size)


def shared_batches(batches: list, world: World):
    """(batch, real) for this rank's round-robin share of `batches`. Ranks short of batches get fillers
    (real=False: run with weight 0 and not counted, only to keep FSDP's collectives in step), so every rank
    runs local_steps(len(batches)) of them."""
    mine = rank_share(batches, world)
    for i in range(local_steps(len(batches), world)):
        yield (mine[i], True) if i < len(mine) else (batches[0], False)

