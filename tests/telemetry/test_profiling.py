"""The profiling entry scripts run on CPU: a fused step under torch.profiler names its chunks; a training step
names its phases; the Nsight scripts and the GPU suite print what they would run without CUDA."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, needs_no_cuda, profiling_dry_run

ROOT = REPO_ROOT  # the repository: profiling/ holds the scripts under test


def test_profile_kernels_writes_trace_and_table(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "profiling" / "profile_kernels.py"), "--device", "cpu",
                          "--shape", "300,32,2000", "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    stem = tmp_path / "profile-linear_ce-fused-300x32x2000-fwd_bwd"
    table = Path(f"{stem}.txt").read_text()
    assert "aten::mm" in table and "optsys.torch_stats+grads chunk 0" in table
    trace = json.loads(Path(f"{stem}.json").read_text())
    assert any(e.get("name", "").startswith("optsys.torch_stats+grads chunk") for e in trace["traceEvents"])


def test_profile_kernels_rejects_unknown_impl(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "profiling" / "profile_kernels.py"), "--device", "cpu",
                          "--impl", "fused-hybrid", "--shape", "30,8,100", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "--impl: one of ['fused', 'naive'] on cpu" in res.stderr


# ---- training steps under torch.profiler (profiling/torch_profile.py), the phase ranges, the shell entry points

PHASES_SFT = {"step", "data", "forward", "loss.ce", "backward", "optimizer"}
PHASES_GRPO = {"step", "data", "generate", "reward", "advantages", "engine_sleep", "engine_wake", "forward", "logprobs",
               "loss.grpo", "backward", "optimizer", "weight_sync", "canary"}


def _torch_profile():
    spec = importlib.util.spec_from_file_location("optsys_torch_profile", ROOT / "profiling" / "torch_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _profile(tmp_path, method: str, model, *extra) -> tuple[list[dict], str]:
    """One recorded step after one unrecorded one; the trace's events and the summary text."""
    _torch_profile().main(["--method", method, "--model", str(model), "--device", "cpu", "--engine", "hf",
                           "--wait", "1", "--warmup", "0", "--active", "1", "--out", str(tmp_path), *extra])
    trace = json.loads((tmp_path / f"{method}-trace.json").read_text())
    return trace["traceEvents"], (tmp_path / f"{method}-summary.txt").read_text()


def _names(events) -> set[str]:
    return {e.get("name", "") for e in events}


@pytest.mark.filterwarnings("ignore:Profiler won't be using warmup")
def test_sft_step_trace_names_the_phases_and_telemetry_false_removes_them(tmp_path, tiny_path):
    events, summary = _profile(tmp_path / "on", "sft", tiny_path)
    names = _names(events)
    assert {f"optsys.{p}" for p in PHASES_SFT} <= names, sorted(n for n in names if n.startswith("optsys."))
    steps = [e for e in events if e.get("name") == "optsys.step"]
    assert len(steps) == 1  # the schedule recorded the active step only
    lo, hi = steps[0]["ts"], steps[0]["ts"] + steps[0]["dur"]
    inner = [e for e in events if e.get("name") in ("optsys.forward", "optsys.backward", "optsys.optimizer")]
    assert inner and all(lo <= e["ts"] and e["ts"] + e["dur"] <= hi for e in inner)  # nested in the step
    assert "optsys.loss.ce" in summary and "aten::mm" in summary

    events, summary = _profile(tmp_path / "off", "sft", tiny_path, "trainer.telemetry=false")
    names = _names(events)
    assert "aten::mm" in names  # the step was still recorded (the step hook ran with telemetry off)
    assert not {f"optsys.{p}" for p in PHASES_SFT} & names


@pytest.mark.filterwarnings("ignore:Profiler won't be using warmup")
def test_grpo_step_trace_names_rollout_sync_and_update_phases(tmp_path, tiny_path):
    events, summary = _profile(tmp_path, "grpo", tiny_path)
    names = _names(events)
    assert {f"optsys.{p}" for p in PHASES_GRPO} <= names, sorted(n for n in names if n.startswith("optsys."))
    assert "optsys.generate" in summary and "optsys.weight_sync" in summary


def test_phase_is_a_profiler_range_unless_telemetry_is_off():
    from optsys.telemetry.nvtx import on_step_end, phase, step_phase, telemetry

    seen = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with on_step_end(seen.append):
            with step_phase(7), phase("forward"):
                torch.ones(3).sum()
            with telemetry(False), step_phase(8), phase("backward"):
                torch.ones(3).sum()
    names = {e.key for e in prof.key_averages()}
    assert {"optsys.step", "optsys.forward"} <= names and "optsys.backward" not in names
    assert seen == [7, 8]  # step hooks run whether telemetry is on or off


def test_telemetry_must_be_a_bool():
    from optsys.config import ConfigError
    from optsys.validation import load_config

    assert load_config("quickstart", None, ["trainer.telemetry=false"]).trainer.telemetry is False
    with pytest.raises(ConfigError, match="trainer.telemetry"):
        load_config("quickstart", None, ["trainer.telemetry=maybe"])


@needs_no_cuda
def test_nsys_and_ncu_scripts_print_their_command_and_fail_without_cuda():
    res = profiling_dry_run("nsys_profile.sh", "grpo", "--model", "tiny:gpu-0.5b")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "not run:" in res.stdout
    assert "nsys profile --trace cuda,nvtx,osrt --capture-range=cudaProfilerApi" in res.stdout
    assert "profiling/torch_profile.py --method grpo --under nsys --device cuda --model tiny:gpu-0.5b" in res.stdout
    res = profiling_dry_run("ncu_profile.sh", "--op", "logprobs")
    assert res.returncode == 2, res.stdout + res.stderr
    assert ("ncu --set detailed" in res.stdout and "--kernel-name 'regex:_(row_)?(stats|grad)_kernel'" in res.stdout
            and "profiling/profile_kernels.py --nvtx --device cuda" in res.stdout and res.stdout.rstrip().endswith(
                "--op logprobs"))
    res = profiling_dry_run("nsys_profile.sh", "ppo")
    assert res.returncode == 2 and "one of sft | dpo | grpo, got 'ppo'" in res.stderr


@needs_no_cuda
def test_gpu_suite_dry_run_prints_every_stage_and_fails_without_cuda():
    res = profiling_dry_run("gpu_suite.sh", "tests", "sft", "dpo", "grpo")
    assert res.returncode == 3, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert "a dry run, nothing was run" in lines[0]
    assert any(line.startswith("  [tests] $PY -m pytest -q -m gpu tests/kernels") for line in lines)
    for method in ("sft", "dpo", "grpo"):
        (line,) = [x for x in lines if x.startswith(f"  [{method}] ")]
        assert "profiling/torch_profile.py --model tiny:gpu-0.5b --device cuda" in line
        assert f"--method {method}" in line and "trainer.precision=bf16" in line
    assert not any(x.startswith("  [bench]") for x in lines)  # only the stages asked for
    res = profiling_dry_run("gpu_suite.sh", "sft", "nope")
    assert res.returncode == 2 and "unknown stage 'nope'" in res.stderr


@needs_no_cuda
def test_gpu_first_call_dry_run_prints_every_part_and_fails_without_cuda():
    res = profiling_dry_run("gpu_first_call.sh")
    assert res.returncode == 3, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert "a dry run, nothing was run" in lines[0]
    limits = {"tests": 75, "big": 60, "head": 120, "tiles": 60, "sft": 90}
    for part, limit in limits.items():  # each part under its own timeout, writing into $OUT
        (line,) = [x for x in lines if x.startswith(f"  [{part}] ")]
        assert f"timeout -k 10 {limit} " in line and f"profiling/first_call.py {part} --out /tmp/optsys-dry-run" in line
    assert sum(limits.values()) <= 7 * 60  # the whole call fits about 7 minutes with its setup
    res = profiling_dry_run("gpu_first_call.sh", "head")
    assert res.returncode == 3 and not any(x.startswith("  [big]") for x in res.stdout.splitlines())
    res = profiling_dry_run("gpu_first_call.sh", "head", "nope")
    assert res.returncode == 2 and "unknown part 'nope'" in res.stderr


def _first_call():
    spec = importlib.util.spec_from_file_location("first_call", ROOT / "profiling" / "first_call.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_first_call_parts_run_at_tiny_shapes(tmp_path):
    """The first call's kernel parts on CPU at tiny shapes (the chunked torch path): each writes its JSON, and the
    past-2^31 part's comparisons (vs the piecewise reference, and for the rows it singles out) hold."""
    fc = _first_call()
    assert fc.main(["big", "--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    big = json.loads((tmp_path / "first-big.json").read_text())
    assert big["done"] and big["ok"]
    assert {(r["impl"], r.get("op")) for r in big["rows"]} >= {("torch", "linear_ce"), ("torch", "logprobs"),
                                                               ("naive", "linear_ce")}
    for r in big["rows"][1:]:
        assert r["ok"] and not r["out_dtype_fallback"] and r["grad_hidden_rel_err_rows_past_2_31"] < 3e-2, r
    assert fc.main(["head", "--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    head = json.loads((tmp_path / "first-head.json").read_text())
    assert head["done"] and head["meta"]["matmul_tflops"] > 0
    assert {(r["op"], r["mode"], r["impl"]) for r in head["rows"]} == {
        (op, mode, impl) for op in ("linear_ce", "logprobs") for mode in ("fwd", "fwd+bwd")
        for impl in ("naive", "torch")}
    assert all(r["median_ms"] > 0 and len(r["times_ms"]) == 2 for r in head["rows"])
    # The targets read the hybrid rows, which only a GPU run has: present there, absent here.
    assert head["targets"] == {}
    fake = {("linear_ce", "fwd+bwd", "hybrid"): {"vs_matmul": 0.85, "median_ms": 40.0,
                                                 "workspace_beyond_fp32_gw_mb": 900},
            ("logprobs", "fwd+bwd", "hybrid"): {"vs_matmul": 0.6, "median_ms": 56.0}}
    assert fc.head_targets(fake) == {
        "hybrid_ce_fwd_bwd_vs_matmul": 0.85, "hybrid_ce_fwd_bwd_vs_matmul_ok": True,
        "hybrid_ce_workspace_beyond_fp32_gw_mb": 900, "hybrid_ce_workspace_ok": True,
        "hybrid_logprobs_vs_ce_time": 1.4, "hybrid_logprobs_vs_ce_time_ok": False}
