"""What many test files need: `from helpers import ...` (tests/ is on sys.path: pytest puts tests/conftest.py's folder
there, as it does each test file's own folder). Fixtures live in tests/conftest.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the dry runs are what a CUDA-less machine does")


def profiling_dry_run(script: str, *args) -> subprocess.CompletedProcess:
    """A profiling shell script (profiling/<script>), on a machine without CUDA (its dry run)."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": "/tmp/optsys-dry-run"}
    return subprocess.run(["bash", str(REPO_ROOT / "profiling" / script), *args], capture_output=True, text=True,
                          timeout=60, env=env)
