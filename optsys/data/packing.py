"""Pack tokenized examples into [1, T] rows without padding, and the padded collation baselines use.

A packed row concatenates whole sequences; `position_ids` restart at 0 per sequence and
`seq_lens` / `cu_seqlens()` tell attention where each sequence starts, so no token attends
across a boundary (varlen flash-attention on GPU; without it the block-diagonal mask built in
optsys/models/packed.py, or sdpa once per sequence, optsys/models/attention.py). Targets are already
shifted per sequence (see tokenize.py), so concatenation leaks no label either.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import numpy as np
import torch

from optsys import csrc
from optsys.data.tokenize import IGNORE, TokenizedExample

AUTO_CPP_MIN = 20_000  # backend="auto" builds the C++ op only for this many lengths or more (see below)


def pack_best_fit_decreasing(lengths, max_tokens: int, backend: str = "auto") -> list[list[int]]:
    """Bins of example indices, each summing to <= max_tokens; every index exactly once.

    Best-fit decreasing: longest first, each into the open bin with the least room that still fits it.
    Deterministic: ties go to the lower index and to the earlier-opened bin; bins come in the order they
    opened, each with its indices ascending. `lengths`: a list or tuple of ints, or a 1-D integer tensor or
    array. Backends return the same bins in the same order: "python" is the reference below, "cpp" the op in
    csrc/packing.cpp (built on first use by optsys.csrc; 37-77x faster on 1M-10M lengths), "auto" the C++
    op for >= AUTO_CPP_MIN lengths (or once it is loaded), with the Python twin when it cannot be built.
    Below AUTO_CPP_MIN the reference takes < 0.1 s, less than a first build, so auto does not start one.
    """
    if backend not in ("auto", "cpp", "python"):
        raise ValueError(f"backend must be 'auto', 'cpp' or 'python', got {backend!r}")
    array = _as_int64_array(lengths)  # None for a list or tuple
    ext = _packing_op(backend, len(lengths))
    if ext is not None:
        try:
            bins, bad = ext.pack_bfd(lengths if array is None else array, max_tokens)
        except (TypeError, OverflowError) as e:  # not plain ints (floats, huge values): the reference decides
            if backend == "cpp":
                raise TypeError(f"backend='cpp' needs integer lengths and max_tokens ({e}); backend='python' "
                                f"takes any numbers") from e
        else:
            if bad >= 0:
                raise _length_error(bad, (lengths if array is None else array)[bad], max_tokens)
            return bins
    return pack_best_fit_decreasing_reference(lengths if array is None else array.tolist(), max_tokens)


def _packing_op(backend: str, n: int):
    """The C++ op if `backend` asks for it (auto: and n is worth a build), else None; None too if it cannot build."""
    if backend == "python" or (backend == "auto" and n < AUTO_CPP_MIN and not csrc.is_loaded("packing")):
        return None
    if n >= 2**31:  # the op's indices are int32
        if backend == "cpp":
            raise ValueError(f"backend='cpp' takes fewer than 2**31 lengths, got {n}")
        return None
    return csrc.load("packing", required=backend == "cpp")


def pack_best_fit_decreasing_reference(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """The readable reference of pack_best_fit_decreasing (the Python backend; csrc/packing.cpp is its twin).

    Open bins are kept sorted by (remaining room, bin id), so each placement is a bisect.
    """
    _check_lengths(lengths, max_tokens)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (remaining capacity, bin id), sorted; full bins dropped
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(room, (n, -1))  # tightest bin with remaining >= n, earliest-opened among equals
        if k == len(room):
            b, left = len(bins), max_tokens - n
            bins.append([i])
        else:
            rem, b = room.pop(k)
            bins[b].append(i)
            left = rem - n
        if left > 0:
            bisect.insort(room, (left, b))
    return [sorted(b) for b in bins]


def _as_int64_array(lengths):
    """A tensor or numpy array of lengths as a contiguous 1-D int64 numpy array (what the C++ op reads), else None."""
    if not isinstance(lengths, (torch.Tensor, np.ndarray)):
        return None
    t = torch.as_tensor(lengths)
    if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"lengths must be 1-D integers, got a {tuple(t.shape)} {t.dtype} {type(lengths).__name__}")
    return t.to("cpu", torch.int64).contiguous().numpy()


def pack_first_fit(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """First-fit in the given order: the naive baseline BFD is measured against (O(n * bins))."""
    _check_lengths(lengths, max_tokens)
    bins: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        for b, r in enumerate(room):
            if r >= n:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_tokens - n)
    return bins


def _check_lengths(lengths: list[int], max_tokens: int) -> None:
    for i, n in enumerate(lengths):
        if not 0 < n <= max_tokens:
            raise _length_error(i, n, max_tokens)


def _length_error(i: int, n, max_tokens: int) -> ValueError:
    return ValueError(
        f"example {i} has {n} tokens; packing needs 1..{max_tokens} (data.max_tokens). Tokenize with "
        f"the same max_tokens, and data.overlong=truncate or skip for longer rows."
    )


@dataclass
class PackedBatch:
    """One packed row of whole sequences: tensors are [1, T], T = sum(seq_lens), no padding."""

    input_ids: torch.Tensor  # [1, T] long
    targets: torch.Tensor  # [1, T] long, -100 ignored, already shifted per sequence
    position_ids: torch.Tensor  # [1, T] long, restarting at 0 per sequence
    seq_lens: list[int]
    num_target_tokens: int

    def cu_seqlens(self) -> torch.Tensor:
        """Cumulative sequence starts, int32 [S+1] (0, l0, l0+l1, ..., T): varlen flash-attention's layout."""
        out = torch.zeros(len(self.seq_lens) + 1, dtype=torch.int32)
        out[1:] = torch.tensor(self.seq_lens, dtype=torch.int32).cumsum(0)
        return out

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def max_seqlen(self) -> int:
        """Longest sequence in the row (flash-attention's max_seqlen_q/k)."""
        return max(self.seq_lens)

    def to(self, device) -> PackedBatch:
        return PackedBatch(
            input_ids=self.input_ids.to(device, non_blocking=True),
            targets=self.targets.to(device, non_blocking=True),
            position_ids=self.position_ids.to(device, non_blocking=True),
            seq_lens=list(self.seq_lens),
            num_target_tokens=self.num_target_tokens,
        )


def collate_packed(examples: list[TokenizedExample]) -> PackedBatch:
    """Concatenate examples into one [1, T] row (no padding), positions restarting per sequence."""
    if not examples:
        raise ValueError("collate_packed needs at least one example")
    seq_lens = [len(ex.input_ids) for ex in examples]
    input_ids = torch.tensor([t for ex in examples for t in ex.input_ids], dtype=torch.long)
    targets = torch.tensor([t for ex in examples for t in ex.targets], dtype=torch.long)
    position_ids = torch.cat([torch.arange(n, dtype=torch.long) for n in seq_lens])
    return PackedBatch(
        input_ids=input_ids[None],
        targets=targets[None],
        position_ids=position_ids[None],
        seq_lens=seq_lens,
        num_target_tokens=int((targets != IGNORE).sum()),
    )


def packed_batches(
    examples: list[TokenizedExample], max_tokens: int, *, shuffle_seed: int | None
) -> list[PackedBatch]:
    """Pack with best-fit decreasing, one PackedBatch per bin; bins shuffled deterministically if seeded."""
    bins = pack_best_fit_decreasing([len(ex.input_ids) for ex in examples], max_tokens)
    if shuffle_seed is not None:
        # BFD emits bins longest-first; shuffle so a run does not see all long rows first.
        random.Random(shuffle_seed).shuffle(bins)
    return [collate_packed([examples[i] for i in b]) for b in bins]


def collate_padded(examples: list[TokenizedExample], pad_id: int) -> dict:
    """Right-padded [B, L] batch for baselines and benchmarks: input_ids, attention_mask, targets."""
    if not examples:
        raise ValueError("collate_padded needs at least one example")
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[b, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[b, :n] = 1
        targets[b, :n] = torch.tensor(ex.targets, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets}


def packing_efficiency(batches: list[PackedBatch], max_tokens: int) -> float:
    """Real tokens / (num_batches * max_tokens): 1.0 means no row has room left."""
    if not batches:
        return 0.0
    return sum(b.num_tokens for b in batches) / (len(batches) * max_tokens)
