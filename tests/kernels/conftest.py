"""Kernel tests run the Triton kernels on CPU through the interpreter.

TRITON_INTERPRET must be set before triton is imported. optsys.kernels imports triton lazily (at the
first Triton call), so setting it here works even if optsys was imported earlier; only a triton
imported earlier in this process without the variable defeats it, and then the interpreter tests skip.
"""

import os
import sys

import pytest
import torch  # importing torch does not import triton

# With CUDA present the Triton kernels must compile for the GPU tests, and TRITON_INTERPRET is
# process-wide: there the interpreter (CPU-twin) tests skip and the `gpu` classes cover the kernels.
ON_GPU = torch.cuda.is_available()
TRITON_PREIMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

from optsys.kernels import _utils


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Fresh output buffers start as NaN, so an element the op forgets to write fails the comparison."""
    monkeypatch.setattr(_utils, "_POISON", True)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 8 rows for V ~ 1000, so odd N spans several chunks and a ragged last one."""
    monkeypatch.setattr(_utils, "CHUNK_BYTES", 8 * 4 * 1001)


@pytest.fixture(params=["torch", "hybrid", "triton"])
def backend(request, small_chunks):
    """Each fast CPU path: the chunked torch path, and the hybrid and Triton paths under the interpreter."""
    if request.param != "torch":
        _skip_if_no_interpreter()
    return request.param


@pytest.fixture
def triton_cpu():
    """The Triton backend under the interpreter."""
    _skip_if_no_interpreter()
    return "triton"


@pytest.fixture
def hybrid_cpu(monkeypatch):
    """The hybrid backend (torch matmuls + Triton row kernels) under the interpreter, in chunks of 8 rows
    at V = 301 for bf16 inputs (fp32 logits + bf16 d_logits tiles, 6 bytes an element; 12 rows for fp32):
    odd N spans several chunks and a ragged last one."""
    _skip_if_no_interpreter()
    monkeypatch.setattr(_utils, "CHUNK_BYTES", 8 * 6 * 301)
    return "hybrid"


def _skip_if_no_interpreter():
    if ON_GPU:
        pytest.skip("CUDA present: Triton compiles for the GPU here; the `gpu` tests cover the kernels")
    if TRITON_PREIMPORTED:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set in this process")


def _assert_close(actual, expected, dtype, what="", rtol=None):
    """Elementwise tolerance from the dtype, with atol scaled by the reference's magnitude."""
    if rtol is None:
        rtol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=rtol * max(scale, 1e-6),
                               msg=lambda m: f"{what}: {m}")


@pytest.fixture
def assert_close():
    """assert_close(actual, expected, dtype, what): tolerance from the dtype, atol scaled by |expected|."""
    return _assert_close
