"""What many test files need: `from helpers import ...` (tests/ is on sys.path: pytest puts tests/conftest.py's folder
there, as it does each test file's own folder). Fixtures (tiny_path, tok, ...) live in tests/conftest.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the dry runs are what a CUDA-less machine does")


# ---------------------------------------------------------------------------- processes


def worker_env(**extra: str) -> dict[str, str]:
    """This process's environment with one thread per process (OMP_NUM_THREADS=1: the ranks share the cores), plus
    `extra`."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def torchrun_cmd(args, *, nproc: int = 2, launcher=()) -> list[str]:
    """`python -m torch.distributed.run --nproc_per_node=<nproc> <launcher...> <args...>`: `args` is a script path
    or `-m module`, then its arguments; `launcher` holds more torchrun options (--nnodes, --rdzv_*)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *launcher, *map(str, args)]


def run_torchrun(args, *, nproc: int = 2, env: dict[str, str] | None = None, timeout: float = 300,
                 launcher=()) -> subprocess.CompletedProcess:
    """torchrun_cmd(args) run to its end on this machine (`nproc` processes), output captured as text; the
    environment is worker_env(**env). Returns the CompletedProcess: the caller checks returncode."""
    return subprocess.run(torchrun_cmd(args, nproc=nproc, launcher=launcher), capture_output=True, text=True,
                          timeout=timeout, env=worker_env(**(env or {})))


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def profiling_dry_run(script: str, *args) -> subprocess.CompletedProcess:
    """A profiling shell script (profiling/<script>), on a machine without CUDA (its dry run)."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": "/tmp/optsys-dry-run"}
    return subprocess.run(["bash", str(REPO_ROOT / "profiling" / script), *args], capture_output=True, text=True,
                          timeout=60, env=env)


# ---------------------------------------------------------------------------- runs of the tiny model


def sft_run_overrides(tiny_path, out, *extra: str) -> list[str]:
    """Overrides for a short SFT run (the quickstart recipe's defaults) of the tiny model at `tiny_path` into `out`:
    300 training problems and 20 held out, a metrics row every step, no progress bar, no end-of-run PNGs and no task
    eval before or after. `extra` (token budgets, steps, checkpoints) comes last, so it wins over these."""
    return [f"model.name_or_path={tiny_path}", f"output_dir={out}", "data.num_train=300", "data.num_eval=20",
            "trainer.log_every=1", "trainer.progress=false", "trainer.plots=false", "eval.before=false",
            "eval.after=false", *extra]


def train_losses(out: Path) -> dict[int, float]:
    """step -> train/loss, from a run folder's metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


# ---------------------------------------------------------------------------- the real model (SmolLM2-135M-Instruct)


def truncated_model(src: Path, dst: Path, layers: int) -> Path:
    """A copy of model folder `src` with only its first `layers` decoder layers: the same tokenizer, chat template,
    vocabulary, head_dim, dtype and tied embeddings as the real model, many times faster to run."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copy(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(config, indent=1))
    weights = load_file(src / "model.safetensors")
    kept = {k: v for k, v in weights.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    save_file(kept, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def load_bench(name: str):
    """bench/<name>.py as a module (by path: `eval` is also a folder name under tests/)."""
    import importlib.util

    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))  # its `import harness`
    spec = importlib.util.spec_from_file_location(f"bench_{name}", bench / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
