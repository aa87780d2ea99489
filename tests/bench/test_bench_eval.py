"""bench/eval.py: engine against engine at the same batching (HF batched as vLLM is), the eval's per-question
policy as its own labelled row, every variant through the harness."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_bench

ROOT = Path(__file__).resolve().parents[2]


def test_hf_batched_samples_many_prompts_per_call_and_the_eval_policy_one(tiny_path, tok):
    bench_eval = load_bench("eval")
    from transformers import AutoModelForCausalLM

    from optsys.rollout.engine import Sampling
    from optsys.rollout.hf_engine import HFEngine

    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16]]
    sampling = Sampling(n=2, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=3, stop_token_ids=())
    calls = {}
    for name, engine in (("batched", bench_eval.batched_hf_engine(model, tok.pad_token_id, 2, 4)),
                         ("per-question", HFEngine(model, pad_token_id=tok.pad_token_id, greedy_batch=4))):
        sizes = []
        real = engine._generate_chunk
        engine._generate_chunk = lambda ps, s, d, real=real, sizes=sizes: sizes.append(len(ps)) or real(ps, s, d)
        groups = engine.generate(prompts, sampling, seeds=list(range(5)))
        assert [len(g) for g in groups] == [2] * 5  # n samples for every prompt, in order
        calls[name] = sizes
    assert calls == {"batched": [2, 2, 1], "per-question": [1, 1, 1, 1, 1]}


def test_rows_give_ratios_to_hf_batched_and_agreement_with_vllm():
    bench_eval = load_bench("eval")

    def rep(greedy_tps, pool_tps, answers):
        return {"greedy": {"tokens": 10, "seconds": 1.0, "tokens_per_s": greedy_tps, "accuracy": 0.5,
                           "answers": answers},
                "sample_pool": {"tokens": 80, "seconds": 1.0, "tokens_per_s": pool_tps, "accuracy": 0.5}}

    runs = {"vllm": [rep(100, 400, ["1", "2"]), rep(120, 500, ["1", "2"]), rep(90, 450, ["1", "2"])],
            "hf-batched": [rep(100, 200, ["1", "3"]), rep(50, 100, ["1", "3"]), rep(80, 300, ["1", "3"])],
            "hf-per-question": [rep(100, 50, ["1", "2"]), rep(100, 60, ["1", "2"]), rep(100, 40, ["1", "2"])]}
    args = type("A", (), {"n": 8})()
    rows = {(r["method"], r["key"]): r for r in bench_eval.summarize(runs, args)}
    assert rows[("greedy", "vllm")]["tokens_per_s_median"] == 100 and rows[("greedy", "vllm")]["tokens_per_s_min"] == 90
    assert rows[("greedy", "vllm")]["vs_hf_batched_median"] == pytest.approx(100 / 80)
    assert rows[("sample pool n=8", "vllm")]["vs_hf_batched_median"] == pytest.approx(450 / 200)
    assert rows[("sample pool n=8", "hf-per-question")]["vs_hf_batched_median"] == pytest.approx(50 / 200)
    assert rows[("greedy", "hf-batched")]["greedy_equal_to_vllm"] == 1
    assert rows[("greedy", "hf-per-question")]["greedy_equal_to_vllm"] == 2
    assert "policy" in rows[("sample pool n=8", "hf-per-question")]["variant"]


@pytest.mark.slow
def test_eval_bench_runs_each_variant_in_its_own_process(tmp_path):
    out = tmp_path / "eval.json"
    res = subprocess.run([sys.executable, ROOT / "bench" / "eval.py", "--model", "tiny:test", "--num", "3", "--n", "2",
                          "--max-new-tokens", "3", "--repeats", "2", "--skip", "vllm", "--out", out],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert set(doc["runs"]) == {"hf-batched", "hf-per-question"}
    assert all(len(reps) == 2 for reps in doc["runs"].values())
    assert {r["torch_threads"] for reps in doc["runs"].values() for r in reps} == {1}  # pinned, not the shell's 2
    assert doc["machine"]["threads"] == 1 and doc["settings"]["batch_seqs"] == 256
    (row,) = [r for r in doc["tables"][0]["rows"] if r["key"] == "hf-batched" and r["method"] == "greedy"]
    assert row["vs_hf_batched_median"] == 1.0 and len(row["tokens_per_s"]["values"]) == 2
    assert "Timed:" in res.stdout and "| sample pool n=2 |" in res.stdout


def test_a_missing_vllm_is_an_absent_row_and_the_hf_rows_still_run(monkeypatch):
    bench_eval = load_bench("eval")
    assert bench_eval.plan(set()) == (["vllm", "hf-batched", "hf-per-question"], {})
    monkeypatch.setattr(bench_eval.harness, "missing_module",
                        lambda module, what: f"{what}: `{module}` is not installed" if module == "vllm" else None)
    names, absent = bench_eval.plan(set())
    assert names == ["hf-batched", "hf-per-question"]
    assert absent == {bench_eval.LABELS["vllm"]: "vLLM row: `vllm` is not installed"}
    assert bench_eval.plan({"vllm"}) == (["hf-batched", "hf-per-question"], {})  # left out by hand: not absent


def test_an_unknown_variant_to_skip_is_refused_naming_it():
    res = subprocess.run([sys.executable, ROOT / "bench" / "eval.py", "--skip", "vllm,nope"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "--skip: unknown variants ['nope']" in res.stderr
