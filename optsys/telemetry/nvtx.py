"""Named ranges for profilers: one `phase(name)` shows as an NVTX range (Nsight Systems) and a torch.profiler range.

`with phase("forward"):` opens the NVTX range "optsys.forward" in domain "optsys" and, while a torch.profiler is
recording, a `record_function` of the same name, so an Nsight timeline and a Chrome trace read like the trainer
code. NVTX goes through the `nvtx` package (a domain keeps optsys's ranges apart from PyTorch's and NCCL's), or
torch.cuda.nvtx where the package is missing (the GPU box installs optsys with --no-deps), or nowhere. With no
profiler attached both are near no-ops (a few microseconds a range; profiling/README.md has the measurement).
trainer.telemetry=false turns every phase off (`telemetry(False)`); step hooks still run (the profilers'
schedules count steps through them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

try:
    import nvtx as _nvtx
except ImportError:  # the GPU machine has no nvtx package: torch.cuda.nvtx there
    _nvtx = None

PREFIX = "optsys."
_enabled = [True]  # a list: one mutable cell, read on every phase
_step_hooks: list[Callable[[int], None]] = []
_backend: list = []  # [(push, pop)] once chosen (lazily: torch.cuda.is_available() is not free)
_attributes: dict = {}  # (name, color) -> the nvtx package's EventAttributes


def _choose_backend():
    if _nvtx is not None:
        domain = _nvtx.get_domain("optsys")  # a no-op DummyDomain when no tool is attached

        def push(name, color):
            key = (name, color)
            attrs = _attributes.get(key)
            if attrs is None:
                attrs = _attributes[key] = domain.get_event_attributes(message=name, color=color)
            domain.push_range(attrs)

        return push, domain.pop_range
    if torch.cuda.is_available():
        return (lambda name, color: torch.cuda.nvtx.range_push(name)), torch.cuda.nvtx.range_pop
    return (lambda name, color: None), (lambda: None)


def _nvtx_backend():
    if not _backend:
        _backend.append(_choose_backend())
    return _backend[0]


class phase:
    """`with phase("backward"):` an NVTX range and (while torch.profiler records) a record_function named
    "optsys.backward"; nothing when telemetry is off. A class, not a generator, to keep the cost down."""

    __slots__ = ("name", "color", "_record", "_pushed")

    def __init__(self, name: str, color: str | None = None):
        self.name = PREFIX + name
        self.color = color
        self._record = None
        self._pushed = False

    def __enter__(self):
        if not _enabled[0]:
            return self
        push, _ = _nvtx_backend()
        push(self.name, self.color)
        self._pushed = True
        if torch.autograd._profiler_enabled():
            self._record = torch.autograd.profiler.record_function(self.name)
            self._record.__enter__()
        return self

    def __exit__(self, *exc):
        if self._record is not None:
            self._record.__exit__(*exc)
            self._record = None
        if self._pushed:
            _nvtx_backend()[1]()
            self._pushed = False
        return False


class step_phase(phase):
    """The range of one training step ("optsys.step"); on a normal exit it calls the step hooks with the step
    number (torch_profile.py advances its profiler schedule there), whether telemetry is on or off."""

    __slots__ = ("step",)

    def __init__(self, step: int):
        super().__init__("step")
        self.step = step

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if exc[0] is None:
            for hook in tuple(_step_hooks):
                hook(self.step)
        return False


def telemetry_enabled() -> bool:
    return _enabled[0]


@contextlib.contextmanager
def telemetry(enabled: bool):
    """Phases on or off inside the block (trainer.telemetry); the previous setting comes back after."""
    before = _enabled[0]
    _enabled[0] = bool(enabled)
    try:
        yield
    finally:
        _enabled[0] = before


@contextlib.contextmanager
def on_step_end(hook: Callable[[int], None]):
    """Call `hook(step)` at the end of every training step inside the block."""
    _step_hooks.append(hook)
    try:
        yield hook
    finally:
        _step_hooks.remove(hook)


@contextlib.contextmanager
def nvtx_range(name: str, color: str | None = None):
    """A bare NVTX range (no prefix, no torch.profiler range, not switched by telemetry); trainers use phase."""
    push, pop = _nvtx_backend()
    push(name, color)
    try:
        yield
    finally:
        pop()
