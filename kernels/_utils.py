"""Shared helpers for the fused linear-softmax ops: input checks, backend choice, chunk sizing, test hooks."""

from __future__ import annotations

import os

import torch

# Chunk sizing for the chunked torch path. Larger chunks run the matmuls at a better rate and amortize
# the read-modify-write of the [V, H] fp32 grad_weight accumulator (one pass per chunk); smaller ones
# use less memory. So the rows follow a memory budget rather than a fixed byte count: all live fp32
# [rows, V] tiles together take at most MEM_FRACTION of the naive path's [N, V] buffers (logits,
# log-softmax, and with grads their grad: 8 or 12 N V bytes) less the fixed gradient buffers, clamped
# to [MIN_CHUNK_BYTES, CHUNK_BYTES] per tile (the floor keeps small problems' matmuls efficient). On
# the 2-core CPU at N = 4096, H = 512, V = 32000 fp32 that is ~50 MiB (405 rows) for a training step
# and 64 MiB (524 rows) in forward, and a step's peak extra memory stays under 10% of the naive
# path's (bench/README.md). CHUNK_BYTES is also the tests' knob for forcing many small chunks.
CHUNK_BYTES = 64 << 20
MIN_CHUNK_BYTES = 16 << 20
MEM_FRACTION = 0.08
# On a GPU the matmuls want many rows (a [rows, H] @ [H, V] product runs near the cuBLAS peak only from
# ~1k rows) and the budget is absolute: all live [rows, V] tiles together take at most CUDA_TILE_BYTES,
# whatever N is. At Llama-3-8B's V = 128256 that is 1024 rows per chunk for the hybrid path's fp32
# logits tile plus its bf16 d_logits tile (6 bytes an element); the [V, H] fp32 grad_weight accumulator
# (2 GiB there) comes on top, as it does for any path that accumulates it in fp32.
CUDA_TILE_BYTES = 768 << 20

_DEBUG_CHECKS = False
# Tests set this so fresh output buffers start as NaN: an element the op forgets to write then fails.
_POISON = False


def set_debug_checks(enabled: bool = True) -> None:
    """Also check target values and finiteness of hidden on CUDA (each check is a device sync).

    On CPU tensors these checks are cheap and always run.
    """
    global _DEBUG_CHECKS
    _DEBUG_CHECKS = bool(enabled)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 before triton's import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def patch_interpreter() -> None:
    """Make the Triton interpreter's tensor -> int (`range()` over runtime bounds) work on numpy >= 2.4.

    triton 3.6's interpreter (the GPU machines' version) does int(data) on a shape-[1] array, which numpy
    2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); triton 3.9 squeezes
    first, and so does this. Idempotent; the interpreter only runs on CPU (tests, bench --device cpu)."""
    from triton.runtime import interpreter

    orig = getattr(interpreter, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_optsys_squeeze", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._optsys_squeeze = True
    interpreter._patch_lang_tensor = patched


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in fp32 whatever the input dtype; fp64 inputs (gradcheck) stay fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, or NaN-filled under the tests' poison flag."""
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def chunk_rows(n_rows: int, n_cols: int, *, tiles: int = 1, grads: bool = False, fixed_bytes: int = 0,
               elem_bytes: int = 4, cuda: bool = False) -> int:
    """Rows per chunk: `tiles` [rows, n_cols] tiles of `elem_bytes` elements within the budget above.

    grads: the pass also produces gradients (the naive path then holds 12, not 8, N V bytes);
    fixed_bytes: the pass's own O(N H + V H) buffers (gradient accumulators), taken off the budget.
    cuda: the GPU rule instead (CUDA_TILE_BYTES over all tiles, rows a multiple of 128 when there are many).
    """
    n_cols = max(n_cols, 1)
    if cuda:
        rows = CUDA_TILE_BYTES // (tiles * elem_bytes * n_cols)
        return max(1, min(n_rows, rows - rows % 128 if rows >= 256 else rows))
    budget = (MEM_FRACTION * (12 if grads else 8) * n_rows * n_cols - fixed_bytes) / tiles
    tile_bytes = min(CHUNK_BYTES, max(MIN_CHUNK_BYTES, int(budget)))
    return max(1, min(n_rows, tile_bytes // (elem_bytes * n_cols)))


def autocast_inputs(*tensors):
    """Cast floating-point inputs to the autocast dtype when autocast is on for their device, as F.linear
    would: a custom autograd.Function is not autocast itself, so under bf16 autocast the fp32 hidden
    states of a final norm and an fp32 lm_head would otherwise run the fused kernel in fp32."""
    first = next(t for t in tensors if t is not None)
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


BACKENDS = ("auto", "torch", "hybrid", "triton")


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """auto: the hybrid path on CUDA (library matmuls + Triton row kernels), the chunked torch path on CPU.

    Why hybrid and not the all-Triton tiles on CUDA: the tile kernels' backward adds its [BLOCK, D]
    products into grad_hidden and grad_weight with fp32 atomics, N D V (1 / BLOCK_V + 1 / BLOCK_N) of
    them: ~1e11 at Llama-3-8B's shape, by our estimate more time than the 6 N H V matmul FLOPs take at the
    cuBLAS rate. The hybrid path runs the three matmuls in cuBLAS on [~1024, V] chunks and only the
    memory-bound softmax math in Triton (two reads of an fp32 tile, one bf16 write). Neither is measured
    on a GPU yet: bench/kernels.py times both there, and this default should follow its numbers.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "hybrid" if tensor.is_cuda else "torch"
    if backend in ("triton", "hybrid") and not tensor.is_cuda and not interpreting():
        raise ValueError(
            f"backend={backend!r} on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return backend


def check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int | None = None,
) -> None:
    """Raise ValueError naming the argument on bad shapes, dtypes, devices or (when cheap) values."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H], got shape {tuple(hidden.shape)}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be floating point, got {hidden.dtype}")
    n, h = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != h:
        raise ValueError(f"weight must be [V, H] with H={h} (hidden is {tuple(hidden.shape)}), "
                         f"got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if target.shape != (n,):
        raise ValueError(f"target must be [N] with N={n} (hidden is {tuple(hidden.shape)}), "
                         f"got shape {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise ValueError(f"target must be an integer tensor, got {target.dtype}")
    v = weight.shape[0]
    if bias is not None:
        if bias.shape != (v,):
            raise ValueError(f"bias must be [V] with V={v} (weight is {tuple(weight.shape)}), "
                             f"got shape {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
    for name, t in (("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    # Value checks read the data back: free on CPU, a device sync on CUDA (debug mode only).
    if hidden.is_cuda and not _DEBUG_CHECKS:
        return
    bad = (target < 0) | (target >= v)
    if ignore_index is not None:
        bad &= target != ignore_index
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        allowed = f"[0, {v})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
        raise ValueError(f"target[{i}] = {int(target[i])} is outside {allowed}")
    if not torch.isfinite(hidden).all():
        i = int((~torch.isfinite(hidden)).nonzero()[0, 0])
        raise ValueError(f"hidden has non-finite values (first in row {i}) of shape {tuple(hidden.shape)}")
