"""The benchmark scripts run end to end on CPU at their smallest settings (numbers are not checked here:
bench/README.md holds them; these tests only keep the scripts working)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_script(*args):
    res = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=900, env=ENV)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


def test_kernel_bench_quick(tmp_path):
    out = tmp_path / "kernels.json"
    run_script(ROOT / "bench" / "kernels.py", "--device", "cpu", "--quick", "--modes", "fwd+bwd-frozen-w",
               "--json", out)
    rows = json.loads(out.read_text())["rows"]
    assert {(r["op"], r["impl"]) for r in rows} == {(op, impl) for op in ("linear_ce", "logprobs")
                                                   for impl in ("naive", "fused")}
    for r in rows:
        assert r["mode"] == "fwd+bwd-frozen-w" and r["time_ms"] > 0 and r["peak_extra_mb"] > 0
        if r["impl"] == "naive":
            assert r["time_vs_naive"] == 1.0


def test_packing_csrc_bench_quick(tmp_path):
    out = tmp_path / "packing_csrc.json"
    run_script(ROOT / "bench" / "packing_csrc.py", "--sizes", "3001", "--max-tokens", "512", "--repeats", "1",
               "--out", out)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["same_bins"] and row["python"]["bins"] == row["cpp"]["bins"] > 1
    assert row["python"]["s"] > 0 and row["cpp"]["s"] > 0 and row["cpp"]["core_s"] > 0 and row["speedup"] > 0


@pytest.mark.slow
def test_preference_bench_quick(tmp_path):
    # The script itself exits 1 when the fused and naive steps disagree (loss, log-probs, grad norm).
    out = tmp_path / "preference.json"
    run_script(ROOT / "bench" / "preference.py", "--model", "quickstart", "--pairs", "2", "--steps", "1",
               "--json", out)
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"naive", "fused"}
    assert result["results"]["fused"]["slot_efficiency"] == 1.0  # packed: no padding slots


@pytest.mark.slow
def test_lora_sync_bench_quick(tmp_path):
    # The script itself fails (SyncError) when a sync path leaves the engine off the trainer's weights.
    pytest.importorskip("vllm", reason="vLLM is the `cpu`/`gpu` extra")
    out = tmp_path / "lora_sync.json"
    run_script(ROOT / "bench" / "lora_sync.py", "--preset", "test", "--rank", "8", "--syncs", "1", "--rounds", "1",
               "--prompts", "2", "--new-tokens", "4", "--out", out)
    result = json.loads(out.read_text())
    assert set(result["sync"]) == {"adapter-memory", "adapter-tmpfs", "merge-and-push"}
    assert result["sync"]["adapter-memory"]["params"] == result["adapter_params"]
    assert result["sync"]["merge-and-push"]["params"] == result["params"]
    assert all(r["tokens"] == 2 * 4 for r in result["generation"].values())


@pytest.mark.slow
def test_rl_bench_quick(tmp_path):
    # The script itself fails when TRL is handed other prompts than optsys's trainer draws, step for step.
    pytest.importorskip("vllm", reason="vLLM is the `cpu`/`gpu` extra")
    pytest.importorskip("trl", reason="TRL is the baseline of bench/rl.py")
    out = tmp_path / "rl.json"
    run_script(ROOT / "bench" / "rl.py", "--model", "test", "--steps", "2", "--prompts", "2", "--group", "2",
               "--max-new-tokens", "4", "--sync-repeats", "1", "--json", out)
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"optsys-vllm", "optsys-hf", "trl-hf"}
    for name, r in result["results"].items():
        assert [s["step"] for s in r["steps"]] == [1, 2], name
        timed = r["steps"][1]
        assert timed["step_s"] > 0 and timed["parts_s"]["generate"] > 0 and timed["completion_tokens"] > 0, name
        assert result["summary"][name]["s_per_step"] > 0
    vllm_run = result["results"]["optsys-vllm"]
    assert vllm_run["engine"] == "vllm" and vllm_run["engine_start_s"] > 0
    assert result["trl_over_variant"]["trl-hf"] == 1.0
    assert result["sync"]["median_s"] > 0 and result["sync"]["s_per_m_params"] > 0
    assert result["sync"]["canary_error"] < 1e-4
    assert {"torch", "vllm", "trl", "transformers"} <= set(result["versions"])
    assert result["machine"]["cores"] > 0 and len(result["machine"]["load_average_start"]) == 3
