"""Lazy builds of the C++ ops in csrc/ (torch.utils.cpp_extension); each op has a pure-Python twin that runs
when the build is unavailable.

`load("packing")` compiles csrc/packing.cpp on first use, once per process, and returns the module. Any failure
(no compiler or ninja, a compile error, a .so that does not import) gives one warning that says what failed and
that the Python twin runs instead, and returns None; `load(name, required=True)` raises CsrcBuildError instead.

Sources: the checkout's csrc/, or optsys/_csrc/ in a regular install (csrc/ ships as package data, see
pyproject.toml). Builds are cached under torch's extensions dir ($TORCH_EXTENSIONS_DIR, else
~/.cache/torch_extensions), in a folder per Python and torch version, so later processes load the built .so
without compiling (on the 2-core CI machine: ~4 s cold, ~0.03 s warm). Editing a source rebuilds it.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

_loaded: dict[str, ModuleType | Exception] = {}  # name -> module, or the error its build raised
_warned: set[str] = set()  # ops whose failure was already reported
_lock = threading.Lock()  # one build per op and process, even if threads ask at once


class CsrcBuildError(RuntimeError):
    """A C++ op was asked for explicitly (backend="cpp") and could not be built or loaded."""


def source_dir() -> Path:
    """optsys/_csrc/ of a regular install, else csrc/ of the checkout (PYTHONPATH or an editable install)."""
    here = Path(__file__).resolve().parent
    installed = here / "_csrc"
    return installed if installed.is_dir() else here.parent / "csrc"


def build_dir(name: str) -> Path:
    """Where op `name` is built: torch's extensions root (as torch.utils.cpp_extension.load picks it), then a
    folder per Python and torch version, so a .so is never loaded by an interpreter it was not built for."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    tag = f"optsys-py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
    return Path(root) / tag / name


def is_loaded(name: str) -> bool:
    """Whether op `name` is already built and imported in this process (so using it costs nothing more)."""
    return isinstance(_loaded.get(name), ModuleType)


def load(name: str, *, required: bool = False) -> ModuleType | None:
    """The built op csrc/<name>.cpp (built on the first call), or None after one warning if it cannot be built."""
    with _lock:
        if name not in _loaded:
            try:
                _loaded[name] = _build(name)
            except Exception as e:  # any build or import failure means: run the twin
                _loaded[name] = e
        found = _loaded[name]
        if isinstance(found, ModuleType):
            return found
        if not required and name not in _warned:
            _warned.add(name)
            warnings.warn(f"optsys: the C++ op csrc/{name}.cpp is unavailable ({_summary(found)}); its pure-Python "
                          f"twin runs instead (same results, slower).", RuntimeWarning, stacklevel=2)
    if required:
        raise CsrcBuildError(f"backend='cpp' needs the C++ op csrc/{name}.cpp, which could not be built or loaded "
                             f"({_summary(found)}). Use backend='auto' or 'python' to run the Python twin.") from found
    return None


def _build(name: str) -> ModuleType:
    from torch.utils.cpp_extension import load as cpp_load

    src = source_dir() / f"{name}.cpp"
    if not src.is_file():
        raise FileNotFoundError(f"no source {src}")
    out = build_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    # -O3 matters: torch passes no optimization flag of its own for C++ sources.
    return cpp_load(name=f"optsys_{name}", sources=[str(src)], build_directory=str(out),
                    extra_cflags=["-O3"], with_cuda=False, verbose=False)


def _summary(e: Exception) -> str:
    """The error's type and telling lines: for a failed build, the compiler's `error:` or `not found` lines
    (torch's message also echoes every compile command)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
    head = lines[0].split(": [", 1)[0].rstrip(":")  # "Error building extension 'x'", without ninja's [1/2] command
    found = [ln for ln in lines[1:] if re.search(r"error:|not found|no such file", ln, re.I)
             and not ln.startswith("ninja")]
    text = f"{head}: {'; '.join(found[:3])}" if found else head
    return f"{type(e).__name__}: {text[:500]}"
