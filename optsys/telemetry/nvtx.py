"""NVTX ranges for Nsight Systems timelines (domain "optsys"); near-free when no profiler is attached.

Uses the `nvtx` package (ranges carry a colour and a domain, so optsys's ranges can be filtered from
PyTorch's and NCCL's); falls back to torch.cuda.nvtx where the package is missing (e.g. a GPU box where
optsys is installed with --no-deps), and to a no-op on a machine without either.
"""

from __future__ import annotations

import contextlib

import torch

try:
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - the package is a dependency; kept for --no-deps installs
    _nvtx = None


@contextlib.contextmanager
def nvtx_range(name: str, color: str | None = None):
    if _nvtx is not None:
        with _nvtx.annotate(name, color=color, domain="optsys"):
            yield
    elif torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield
