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
    stdout = run_script(ROOT / "bench" / "kernels.py", "--device", "cpu", "--quick", "--modes", "fwd+bwd-frozen-w",
                        "--rounds", "1", "--threads", "1", "--out", out)
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    # Liger is an absent row with its reason, not a crash; the table says what is timed (bench/harness.py)
    assert doc["absent"] == {"liger": "Liger-Kernel is Triton-only (GPU): not run on CPU"}
    assert "| liger: absent | Liger-Kernel is Triton-only" in stdout and "Timed: one call of the op" in stdout
    assert doc["machine"]["threads"] == 1 and doc["script"] == "bench/kernels.py"
    assert {(r["op"], r["impl"]) for r in rows} == {(op, impl) for op in ("linear_ce", "logprobs")
                                                   for impl in ("naive", "fused")}
    for r in rows:
        assert r["mode"] == "fwd+bwd-frozen-w" and r["time_ms"] > 0 and r["peak_extra_mb"] > 0
        if r["impl"] == "naive":
            assert r["time_vs_naive"] == 1.0


def test_packing_csrc_bench_quick(tmp_path):
    out = tmp_path / "packing_csrc.json"
    run_script(ROOT / "bench" / "packing_csrc.py", "--sizes", "3001", "--max-tokens", "512", "--repeats", "2",
               "--out", out)
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    assert row["same_bins"] and row["bins"] > 1
    # the same number of processes for both sides, interleaved (the Python twin is not a single run)
    assert len(row["python_s"]["values"]) == len(row["cpp_s"]["values"]) == 2
    assert row["python_s"]["min"] > 0 and row["cpp_s"]["min"] > 0 and row["core_s"]["min"] > 0
    assert row["speedup_median"] == row["python_s"]["median"] / row["cpp_s"]["median"]
    assert doc["machine"]["threads"] == 1 and doc["script"] == "bench/packing_csrc.py"


@pytest.mark.slow
def test_preference_bench_quick(tmp_path):
    # The script itself exits 1 when the fused and naive steps disagree (loss, log-probs, grad norm).
    out = tmp_path / "preference.json"
    run_script(ROOT / "bench" / "preference.py", "--model", "quickstart", "--pairs", "2", "--steps", "1",
               "--repeats", "2", "--threads", "1", "--json", out)
    result = json.loads(out.read_text())
    assert {name: len(reps) for name, reps in result["runs"].items()} == {"naive": 2, "fused": 2}
    assert result["runs"]["fused"][0]["slot_efficiency"] == 1.0  # packed: no padding slots
    assert result["problems"] == [] and result["machine"]["threads"] == 1


@pytest.mark.slow
def test_lora_sync_bench_quick(tmp_path):
    # The script itself fails (SyncError) when a sync path leaves the engine off the trainer's weights.
    pytest.importorskip("vllm", reason="vLLM is the `cpu`/`gpu` extra")
    out = tmp_path / "lora_sync.json"
    run_script(ROOT / "bench" / "lora_sync.py", "--preset", "test", "--rank", "8", "--syncs", "1", "--rounds", "1",
               "--prompts", "2", "--new-tokens", "4", "--repeats", "1", "--out", out)
    result = json.loads(out.read_text())
    assert {name: len(reps) for name, reps in result["runs"].items()} == {"lora": 1, "plain": 1}  # own processes
    sync, gen = ({r["key"]: r for r in t["rows"]} for t in result["tables"])
    assert set(sync) == {"adapter-memory", "adapter-tmpfs", "merge-and-push"}
    assert sync["adapter-memory"]["mparams"] * 1e6 == result["adapter_params"]
    assert sync["merge-and-push"]["mparams"] * 1e6 == result["params"]
    assert all(r["tokens"] == 2 * 4 for r in gen.values()) and len(gen) == 3


@pytest.mark.slow
def test_rl_bench_quick(tmp_path):
    # Its optsys-vllm and trl-hf variants (and the check that TRL saw optsys's prompts) are bench/e2e.py's GRPO rows:
    # skipped here to keep CI's time. optsys-floor (the step's floor, vLLM generation + forward and backward) runs.
    pytest.importorskip("vllm", reason="vLLM is the `cpu`/`gpu` extra")
    out = tmp_path / "rl.json"
    run_script(ROOT / "bench" / "rl.py", "--model", "test", "--steps", "2", "--prompts", "2", "--group", "2",
               "--max-new-tokens", "4", "--sync-repeats", "1", "--skip", "optsys-vllm,trl-hf", "--json", out)
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"optsys-hf", "optsys-floor"}
    for name, r in result["results"].items():
        assert [s["step"] for s in r["steps"]] == [1, 2], name
        timed = r["steps"][1]
        assert timed["step_s"] > 0 and timed["parts_s"]["generate"] > 0 and timed["completion_tokens"] > 0, name
        assert result["summary"][name]["s_per_step"] > 0
    assert result["results"]["optsys-hf"]["engine"] == "hf"
    floor = result["results"]["optsys-floor"]
    assert floor["engine"] == "vllm" and floor["engine_start_s"] > 0
    for s in floor["steps"]:  # generation + one forward and backward, nothing else timed
        assert set(s["parts_s"]) == {"generate", "forward_backward"} and min(s["parts_s"].values()) > 0
        assert s["step_s"] == pytest.approx(sum(s["parts_s"].values())) and s["micro_batches"] >= 1
    assert result["sync"]["median_s"] > 0 and result["sync"]["s_per_m_params"] > 0
    assert result["sync"]["canary_error"] < 1e-4
    assert {"torch", "vllm", "trl", "transformers"} <= set(result["versions"])
    assert result["machine"]["cores"] > 0 and len(result["machine"]["load_average_start"]) == 3


@pytest.mark.slow
def test_e2e_bench_quick(tmp_path):
    # The script itself exits 1 when a TRL variant's step-1 loss or grad norm differs from optsys's. Its GRPO rows
    # are bench/rl.py's run_optsys / run_trl (test_rl_bench_quick covers rl.py; the GRPO summary is checked below).
    pytest.importorskip("trl", reason="TRL is the baseline of bench/e2e.py")
    out = tmp_path / "e2e.json"
    run_script(ROOT / "bench" / "e2e.py", "--model", "test", "--steps", "2", "--repeats", "1", "--threads", "1",
               "--sft-seqs", "8", "--dpo-pairs", "8",
               "--prompt-words", "6", "--completion-words", "12", "--max-words", "40", "--max-tokens", "256",
               # skipped: the same code as rows that run (optsys with one override; DPOTrainer with other settings)
               "--sections", "sft,dpo", "--skip", "sft:optsys-varlen,dpo:trl-default", "--out", out)
    result = json.loads(out.read_text())
    assert result["problems"] == [] and result["absent"] == {}
    variants = {"sft": {"optsys", "trl-default", "trl-best"}, "dpo": {"optsys", "optsys-varlen", "trl-best"}}
    assert {sec: set(summ) for sec, summ in result["summary"].items()} == variants
    for section, summ in result["summary"].items():
        for name, s in summ.items():
            assert s["repeats"] == 1 and s["s_per_step"]["min"] > 0 and s["peak_rss_mb"] > 0
            # the same computation: step 1's loss on the same weights and tokens
            assert s["loss_step1"] == pytest.approx(summ["optsys"]["loss_step1"], rel=1e-3), (section, name)
    rows = {(r["section"], r["variant"]): r for r in result["table"]}
    assert rows[("sft", "trl-best")]["speed_vs_baseline_median"] == 1.0  # the baseline of every ratio
    sft, dpo = result["results"]["sft"], result["results"]["dpo"]
    assert sft["trl-best"][0]["micro_batches_per_step"] < 8  # packed rows, not 8 sequences
    assert sft["trl-default"][0]["micro_batches_per_step"] == 1  # 8 sequences, one padded batch
    assert dpo["trl-best"][0]["micro_batches_per_step"] == 8  # one pair per micro-batch
    # fair baseline: TRL's best runs without recomputation, as optsys does; its default keeps TRL's (on)
    assert sft["trl-best"][0]["gradient_checkpointing"] is False
    assert dpo["trl-best"][0]["gradient_checkpointing"] is False
    assert sft["trl-default"][0]["gradient_checkpointing"] is True
    assert result["machine"]["threads"] == 1 and result["settings"]["baseline"]["sft"] == "trl-best"


def test_e2e_grpo_summary_and_checks():
    """bench/e2e.py's GRPO rows (generation included and excluded), its repeats and its same-computation check,
    on made-up child results (the children themselves are bench/rl.py's, run by test_rl_bench_quick)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import e2e

    def grpo(step_s, gen_s):
        return {"peak_rss_mb": 900.0, "steps": [{"step_s": 99.0, "parts_s": {"generate": 50.0}, "completion_tokens": 1},
                                                {"step_s": step_s, "parts_s": {"generate": gen_s},
                                                 "completion_tokens": 64}]}

    runs = {"optsys": [e2e.summarize("grpo", grpo(s, 1.0), floor_mb=400.0) for s in (2.0, 2.2, 4.0)],
            "optsys-floor": [e2e.summarize("grpo", grpo(s, 1.0), floor_mb=400.0) for s in (1.6, 2.0, 1.8)],
            "trl-best": [e2e.summarize("grpo", grpo(s, 1.0), floor_mb=400.0) for s in (3.0, 3.3, 3.6)]}
    one = runs["optsys"][0]
    assert one["tokens_per_s"] == 32.0 and one["tokens_per_s_no_gen"] == 64.0  # step 1 left out
    assert runs["trl-best"][0]["s_per_step_no_gen"] == 2.0 and runs["trl-best"][0]["peak_over_floor_mb"] == 500.0
    summary = {"grpo": {name: e2e.combine("grpo", reps) for name, reps in runs.items()}}
    assert summary["grpo"]["optsys"]["s_per_step"]["min"] == 2.0
    assert summary["grpo"]["optsys"]["s_per_step"]["median"] == 2.2  # the slow outlier repeat does not move it
    rows = {r["variant"]: r for r in e2e.ratio_rows(summary)}
    assert rows["optsys"]["speed_vs_baseline_median"] == pytest.approx(3.3 / 2.2)
    assert rows["optsys"]["speed_vs_baseline_min"] == pytest.approx(3.0 / 2.0)
    assert rows["optsys"]["speed_vs_baseline_no_gen_median"] == pytest.approx(2.3 / 1.2)
    # the step over its floor (generation + one packed forward and backward), from the same run's repeats
    assert rows["optsys"]["over_floor_median"] == pytest.approx(2.2 / 1.8)
    assert rows["optsys"]["over_floor_min"] == pytest.approx(2.0 / 1.6)
    assert rows["trl-best"]["over_floor_median"] == pytest.approx(3.3 / 1.8)
    assert rows["optsys-floor"]["over_floor_min"] == 1
    e2e.print_table(list(rows.values()), {"sft:trl-best": "TRL rows: `trl` is not installed"})
    assert e2e.check_same_computation("grpo", runs) == []
    sft = {"optsys": [{"loss_step1": 2.0, "grad_norm_step1": 1.0}],
           "trl-best": [{"loss_step1": 2.0, "grad_norm_step1": 1.0}, {"loss_step1": 2.0, "grad_norm_step1": 1.1}]}
    (problem,) = e2e.check_same_computation("sft", sft)
    assert "trl-best (repeat 2) grad_norm_step1" in problem


def test_harness_interleaves_pins_threads_and_reports_absent_rows():
    sys.path.insert(0, str(ROOT / "bench"))
    import harness

    order = []
    out = harness.interleaved(["a", "b"], 3, lambda name, rep: order.append(name) or {"rep": rep}, log=lambda m: None)
    assert order == ["a", "b", "a", "b", "a", "b"] and [r["rep"] for r in out["b"]] == [0, 1, 2]
    assert harness.spread([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "values": [3.0, 1.0, 2.0]}
    env = harness.pinned_env(3)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert harness.missing_module("json", "x") is None
    assert "not installed" in harness.missing_module("no_such_module_optsys", "Liger rows")
    m = harness.machine(2)
    assert m["threads"] == 2 and m["cores"] > 0 and len(m["id"]) == 12


def fake_e2e_doc(machine_id: str | None = None) -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    import harness

    m = harness.machine(1)
    if machine_id:
        m.update(id=machine_id, host="elsewhere")
    row = dict(repeats=3, tokens_per_step=100, s_per_step_min=1.0, s_per_step_median=1.5, tokens_per_s_median=66.7,
               peak_over_floor_mb=10.0, mem_vs_optsys=1.0, loss_step1=2.0, grad_norm_step1=1.0)
    table = [dict(row, section="sft", variant="optsys", speed_vs_baseline_median=2.34, speed_vs_baseline_min=2.5),
             dict(row, section="sft", variant="trl-best", speed_vs_baseline_median=1.0, speed_vs_baseline_min=1.0)]
    grpo = dict(row, section="grpo", s_per_step_no_gen_median=0.5, speed_vs_baseline_no_gen_median=1.1)
    table += [dict(grpo, variant="optsys", speed_vs_baseline_median=0.8, speed_vs_baseline_min=0.9,
                   over_floor_median=1.23, over_floor_min=1.2),
              dict(grpo, variant="optsys-floor", speed_vs_baseline_median=1.2, speed_vs_baseline_min=1.2,
                   over_floor_median=1.0, over_floor_min=1.0),
              dict(grpo, variant="trl-best", speed_vs_baseline_median=1.0, speed_vs_baseline_min=1.0,
                   over_floor_median=0.98, over_floor_min=0.97)]
    return {"script": "bench/e2e.py", "command": "python bench/e2e.py", "machine": m, "date": "2026-12-06",
            "load_average": {"start": [1.0, 1, 1], "end": [1.5, 1, 1]}, "wall_s": 600.0, "table": table,
            "absent": {"dpo:trl-best": "TRL rows: `trl` is not installed"}}


def test_report_writes_tables_from_the_json_and_refuses_another_machine(tmp_path):
    block = "<!-- report:e2e -->\nold\n<!-- /report:e2e -->\n"
    (tmp_path / "bench.md").write_text("# B\n" + block)
    (tmp_path / "readme.md").write_text("| a | b |\n|---|---|\n| old | row | <!-- report:e2e -->\n| next | row |\n")
    (tmp_path / "e2e.json").write_text(json.dumps(fake_e2e_doc()))
    argv = ["--e2e", str(tmp_path / "e2e.json"), "--bench-readme", str(tmp_path / "bench.md"),
            "--readme", str(tmp_path / "readme.md")]
    res = subprocess.run([sys.executable, ROOT / "bench" / "report.py", *argv, "--check"], capture_output=True,
                         text=True)
    assert res.returncode == 1 and "out of date" in res.stderr
    run_script(ROOT / "bench" / "report.py", *argv)
    bench = (tmp_path / "bench.md").read_text()
    assert "old" not in bench and "| 2.34x | 2.50x |" in bench and "absent | TRL rows: `trl` is not installed" in bench
    readme = (tmp_path / "readme.md").read_text().splitlines()
    assert "SFT 2.34x, GRPO 0.80x (1.23x its floor) TRL-best's speed (median of 3 interleaved repeats)" in readme[2]
    # the floor row and every GRPO row's step over it, from the same JSON
    assert "| GRPO | optsys's floor: its generation + one packed forward and backward of the same tokens |" in bench
    assert ("the least a step must do; median of repeats): **optsys** (defaults: `attn_implementation=auto`) 1.23x "
            "(min 1.20x); TRL best (gradient checkpointing off): the baseline 0.98x (min 0.97x).") in bench
    assert readme[2].endswith("| <!-- report:e2e -->") and "old" not in readme[2] and readme[3] == "| next | row |"
    run_script(ROOT / "bench" / "report.py", *argv, "--check")  # now up to date
    (tmp_path / "e2e.json").write_text(json.dumps(fake_e2e_doc(machine_id="0123456789ab")))
    res = subprocess.run([sys.executable, ROOT / "bench" / "report.py", *argv], capture_output=True, text=True)
    assert res.returncode == 1 and "measured on another machine" in res.stderr and "--other-machine" in res.stderr
    run_script(ROOT / "bench" / "report.py", *argv, "--other-machine")
    assert "**another machine**" in (tmp_path / "bench.md").read_text()


def bench_module(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    return __import__(name)


@pytest.mark.parametrize("start, end, threads, loaded", [
    (1.35, 1.08, 1, False),  # a 1-thread run alone on 2 cores: its own load
    (2.98, 3.06, 1, True),  # the same with a 2-thread job beside it
    (1.40, 2.10, 2, False),  # a 2-thread run alone
    (3.06, 3.75, 2, True),
    (1.35, 1.08, 0, True),  # no threads recorded: nothing subtracted
])
def test_report_calls_a_machine_loaded_by_the_load_beyond_the_benchmark_s_own_threads(start, end, threads, loaded):
    report = bench_module("report")
    doc = {"load_average": {"start": [start, 1, 1], "end": [end, 1, 1]}, "machine": {"cores": 2, "threads": threads}}
    assert ("Loaded machine" in report.load_note(doc)) is loaded


def test_e2e_real_model_defaults_and_lora_settings_match_on_both_sides():
    """--model picks GRPO's start and prompts; --lora gives optsys and TRL (peft) the same adapter."""
    import argparse

    e2e, rl = bench_module("e2e"), bench_module("rl")
    assert rl.model_name("smollm2-135m-instruct") == "smollm2-135m-instruct"  # a named real model, not tiny:
    assert rl.model_name("gguf:/x/m.gguf") == "gguf:/x/m.gguf" and rl.model_name("small") == "tiny:small"

    def resolved(**kw):
        args = argparse.Namespace(**{"grpo_model": None, "grpo_task": None, "lora": 0, "lora_alpha": None, **kw})
        e2e.resolve_defaults(args)
        return args

    real = resolved(model="smollm2-135m-instruct", lora=16)
    assert (real.grpo_model, real.grpo_task, real.lora_alpha) == ("smollm2-135m-instruct", "word_problems", 32)
    tiny = resolved(model="small")
    assert (tiny.grpo_model, tiny.grpo_task, tiny.lora_alpha) == ("stage:grpo_sft", "arithmetic", 0)
    given = resolved(model="smollm2-135m-instruct", grpo_model="stage:x", grpo_task="arithmetic", lora=8, lora_alpha=8)
    assert (given.grpo_model, given.grpo_task, given.lora_alpha) == ("stage:x", "arithmetic", 8)

    assert rl.lora_overrides(0, 0) == [] and rl.peft_lora_config(0, 0) is None  # full fine-tuning
    over = dict(o.split("=", 1) for o in rl.lora_overrides(8, 16))
    peft = rl.peft_lora_config(8, 16)
    assert (int(over["model.lora.r"]), int(over["model.lora.alpha"]), float(over["model.lora.dropout"])) == \
        (peft.r, peft.lora_alpha, peft.lora_dropout) == (8, 16, 0.0)
    targets = over["model.lora.target_modules"].strip("[]").split(",")
    assert targets == rl.LORA_TARGETS and set(peft.target_modules) == set(targets)
    grpo = rl.optsys_overrides(argparse.Namespace(model="smollm2-135m-instruct", steps=2, prompts=2, group=2,
                                                  max_new_tokens=64, lr=1e-5, max_tokens=1024, seed=0,
                                                  task="word_problems", lora=8, lora_alpha=16), "vllm", Path("/x"))
    assert "data.task=word_problems" in grpo and "rl.max_new_tokens=64" in grpo and "model.lora.r=8" in grpo
    assert "model.name_or_path=smollm2-135m-instruct" in grpo
    assert not any(o.startswith("rl.lora_sync=") for o in grpo)  # the optsys row: optsys's default (merged)
    adapter = rl.optsys_overrides(argparse.Namespace(model="smollm2-135m-instruct", steps=2, prompts=2, group=2,
                                                     max_new_tokens=64, lr=1e-5, max_tokens=1024, seed=0,
                                                     task="word_problems", lora=8, lora_alpha=16,
                                                     lora_sync="adapter"), "vllm", Path("/x"))
    assert adapter == grpo + ["rl.lora_sync=adapter"]  # the optsys-adapter row differs in that alone


@pytest.mark.parametrize("argv, message", [
    (["--lora", "-1"], "--lora must be >= 0"),
    (["--grpo-task", "sorting"], "invalid choice"),
])
def test_e2e_refuses_bad_lora_and_grpo_task(argv, message):
    res = subprocess.run([sys.executable, ROOT / "bench" / "e2e.py", *argv], capture_output=True, text=True, env=ENV)
    assert res.returncode == 2 and message in res.stderr


@pytest.mark.slow
def test_e2e_bench_lora_quick(tmp_path):
    # LoRA on both sides: the script exits 1 unless step 1's loss and grad norm (of the adapters) agree.
    pytest.importorskip("trl", reason="TRL is the baseline of bench/e2e.py")
    out = tmp_path / "e2e.json"
    run_script(ROOT / "bench" / "e2e.py", "--model", "test", "--lora", "4", "--steps", "2", "--repeats", "1",
               "--threads", "1", "--sft-seqs", "8", "--prompt-words", "6", "--completion-words", "12",
               "--max-words", "40", "--max-tokens", "256", "--sections", "sft",
               "--skip", "sft:optsys-varlen,sft:trl-default", "--out", out)
    result = json.loads(out.read_text())
    assert result["problems"] == [] and set(result["summary"]["sft"]) == {"optsys", "trl-best"}
    assert result["settings"]["lora"] == {"r": 4, "alpha": 8, "dropout": 0.0,
                                          "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]}
    trl = result["results"]["sft"]["trl-best"][0]
    assert 0 < trl["trainable_params"] < trl["params"] / 10  # TRL trained the adapters only
    summ = result["summary"]["sft"]
    assert summ["trl-best"]["grad_norm_step1"] == pytest.approx(summ["optsys"]["grad_norm_step1"], rel=1e-3)


def fake_generation_processes() -> dict:
    """bench/generation.py's process results (engine:weights, a repeat each) with made-up timings."""
    def proc(setup, greedy_s, sampled_s, ids):  # CPU time: half the wall time (a machine shared with one job)
        return {"setup_s": setup, "modes": {
            "greedy": {"rounds": [{"seconds": greedy_s, "cpu_s": greedy_s / 2, "tokens": 40, "sequences": 4,
                                   "stopped": 3}], "token_ids": ids},
            "sampled": {"rounds": [{"seconds": sampled_s, "cpu_s": sampled_s / 2, "tokens": 60, "sequences": 4,
                                    "stopped": 4}], "token_ids": None}}}

    same, other = [[1, 2], [3], [4, 5], [6]], [[1, 2], [3], [9], [6]]
    return {"vllm:merged": [proc(30.0, 1.0, 2.0, same), proc(32.0, 2.0, 3.0, same)],
            "hf:merged": [proc(5.0, 4.0, 6.0, same), proc(6.0, 4.0, 6.0, other)],
            "vllm:adapter": [proc(35.0, 2.0, 4.0, other), proc(36.0, 2.0, 4.0, other)],
            "hf:adapter": [proc(7.0, 5.0, 10.0, same), proc(8.0, 5.0, 10.0, same)]}


def test_generation_rows_ratios_and_greedy_agreement():
    """bench/generation.py's summary on made-up process results: tokens/s per process, min and median over repeats,
    vLLM over HF, adapter over merged, and greedy completions compared with the first greedy row's."""
    gen = bench_module("generation")
    assert gen.process_names(["vllm", "hf"], 16) == ["vllm:merged", "hf:merged", "vllm:adapter", "hf:adapter"]
    assert gen.process_names(["hf"], 0) == ["hf:base"]
    names = gen.variant_names(["vllm", "hf"], ["greedy", "sampled"], 16)
    variants = gen.by_variant(fake_generation_processes())
    assert set(variants) == set(names) and len(names) == 8
    assert variants["vllm:sampled:adapter"][1] == {"setup_s": 36.0, "rounds": [
        {"seconds": 4.0, "cpu_s": 2.0, "tokens": 60, "sequences": 4, "stopped": 4}], "token_ids": None}
    variants = {n: variants[n] for n in names}
    summary = gen.summarize(variants)
    assert summary["vllm:greedy:merged"]["tokens_per_s"] == {"min": 20.0, "median": 30.0, "values": [40.0, 20.0]}
    assert summary["vllm:greedy:merged"]["tokens_per_cpu_s"]["values"] == [80.0, 40.0]
    assert summary["vllm:greedy:merged"]["stopped_fraction"] == 0.75
    agreement = gen.greedy_agreement(variants)  # the first greedy row is vllm:greedy:merged (repeat 1)
    assert agreement == {"vllm:greedy:merged": 1.0, "hf:greedy:merged": 1.0, "vllm:greedy:adapter": 0.75,
                         "hf:greedy:adapter": 1.0}
    rows = {r["variant"]: r for r in gen.table_rows(summary, agreement)}
    assert rows["vllm:greedy:merged"]["vllm_over_hf"] == pytest.approx(30.0 / 10.0)
    assert rows["hf:greedy:merged"]["vllm_over_hf"] is None and rows["hf:greedy:merged"]["vs_merged"] is None
    assert rows["hf:sampled:adapter"]["vs_merged"] == pytest.approx(6.0 / 10.0)
    assert rows["hf:sampled:adapter"]["vs_merged_cpu"] == pytest.approx(12.0 / 20.0)
    assert rows["vllm:greedy:merged"]["vllm_over_hf_cpu"] == pytest.approx(60.0 / 20.0)
    assert rows["hf:greedy:merged"]["vllm_over_hf_cpu"] is None
    assert rows["vllm:sampled:adapter"]["vllm_over_hf"] == pytest.approx(15.0 / 6.0)
    assert rows["vllm:greedy:adapter"]["greedy_same_as_first"] == 0.75
    gen.print_table(list(rows.values()), {"vllm:greedy:base": "vLLM rows: `vllm` is not installed"})


@pytest.mark.parametrize("argv, message", [
    (["--engines", "vllm,trt"], "--engines: ['trt'] given"),
    (["--modes", ""], "--modes: nothing given"),
    (["--prompts", "6", "--group", "4"], "must be a multiple of --group"),
    (["--lora", "-2"], "--lora must be >= 0"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--repeats", "0"], "--repeats must be >= 1"),
])
def test_generation_refuses_bad_arguments(argv, message):
    res = subprocess.run([sys.executable, ROOT / "bench" / "generation.py", *argv], capture_output=True, text=True,
                         env=ENV)
    assert res.returncode == 2 and message in res.stderr, res.stderr[-500:]


@pytest.mark.slow
def test_generation_bench_quick(tmp_path):
    # Every process of the product engines x weights runs and writes its rows (numbers not checked).
    pytest.importorskip("vllm", reason="vLLM is the `cpu`/`gpu` extra")
    out = tmp_path / "generation.json"
    run_script(ROOT / "bench" / "generation.py", "--model", "test", "--prompts", "2", "--group", "2",
               "--max-new-tokens", "3", "--lora", "8", "--repeats", "1", "--threads", "1", "--out", out)
    doc = json.loads(out.read_text())
    assert doc["script"] == "bench/generation.py" and doc["absent"] == {}
    assert [r["variant"] for r in doc["table"]] == [f"{e}:{m}:{w}" for m in ("greedy", "sampled")
                                                     for w in ("merged", "adapter") for e in ("vllm", "hf")]
    for r in doc["table"]:
        assert r["tokens_per_call"] > 0 and r["tokens_per_s_median"] > 0 and r["setup_s_median"] > 0
        assert (r["vllm_over_hf"] is not None) == (r["engine"] == "vllm")
        assert (r["vs_merged"] is not None) == (r["weights"] == "adapter")
        assert (r["greedy_same_as_first"] is not None) == (r["mode"] == "greedy")
    assert doc["settings"]["adapter_params"] > 0 and doc["settings"]["stop_token_ids"]


def fake_generation_doc() -> dict:
    gen, harness = bench_module("generation"), bench_module("harness")
    variants = gen.by_variant(fake_generation_processes())
    variants = {n: variants[n] for n in gen.variant_names(["vllm", "hf"], ["greedy", "sampled"], 16)}
    summary = gen.summarize(variants)
    args = {"prompts": 4, "group": 2, "temperature": 0.7, "max_new_tokens": 48, "lora": 16, "lora_alpha": 32,
            "rounds": 1}
    return {"script": "bench/generation.py", "command": "python bench/generation.py", "machine": harness.machine(1),
            "date": "2026-12-06", "load_average": {"start": [6.0, 1, 1], "end": [7.0, 1, 1]}, "wall_s": 540.0,
            "settings": {"args": args, "adapter_params": 3_000_000, "prompt_tokens": [90, 120]},
            "table": gen.table_rows(summary, gen.greedy_agreement(variants)), "absent": {}}


def test_report_fills_the_generation_and_real_model_blocks_from_their_json(tmp_path):
    e2e_block = "<!-- report:e2e -->\nold\n<!-- /report:e2e -->\n"
    (tmp_path / "readme.md").write_text("| a | b |\n|---|---|\n| old | row | <!-- report:e2e -->\n")
    (tmp_path / "e2e.json").write_text(json.dumps(fake_e2e_doc()))
    argv = ["--e2e", tmp_path / "e2e.json", "--bench-readme", tmp_path / "bench.md", "--readme",
            tmp_path / "readme.md", "--json", f"generation={tmp_path / 'generation.json'}"]
    gen_block = "<!-- report:generation -->\nold\n<!-- /report:generation -->\n"
    (tmp_path / "bench.md").write_text("# B\n" + e2e_block + gen_block)
    res = subprocess.run([sys.executable, ROOT / "bench" / "report.py", *argv], capture_output=True, text=True)
    assert res.returncode == 1 and "generation.json does not exist: run `python bench/generation.py` first" in \
        res.stderr
    (tmp_path / "generation.json").write_text(json.dumps(fake_generation_doc()))
    run_script(ROOT / "bench" / "report.py", *argv)
    assert "| 3.00x |" in (tmp_path / "bench.md").read_text()
    (tmp_path / "bench.md").write_text("# B\n" + e2e_block + gen_block + "<!-- report:e2e-smollm2 -->\nold\n"
                                       "<!-- /report:e2e-smollm2 -->\n")
    argv += ["--json", f"e2e-smollm2={tmp_path / 'real.json'}"]
    (tmp_path / "readme.md").write_text("| a | b |\n|---|---|\n| old | row | <!-- report:e2e -->\n"
                                        "| old | real | <!-- report:e2e-smollm2 -->\n")
    (tmp_path / "real.json").write_text(json.dumps(fake_generation_doc()))  # the wrong script's JSON
    res = subprocess.run([sys.executable, ROOT / "bench" / "report.py", *argv], capture_output=True, text=True)
    assert res.returncode == 1 and "real.json was not written by bench/e2e.py" in res.stderr
    (tmp_path / "real.json").write_text(json.dumps(dict(fake_e2e_doc(), command="python bench/e2e.py --lora 16")))
    run_script(ROOT / "bench" / "report.py", *argv)
    bench = (tmp_path / "bench.md").read_text()
    assert "old" not in bench and "`python bench/e2e.py --lora 16`" in bench
    real_row = (tmp_path / "readme.md").read_text().splitlines()[3]  # the README row from the same JSON
    assert real_row.startswith("| the same on the real model") and "`python bench/e2e.py --lora 16`" in real_row
    assert real_row.endswith("<!-- report:e2e-smollm2 -->")
    gen_rows = [line for line in bench.splitlines() if line.startswith("| vLLM") or line.startswith("| HF")]
    assert len(gen_rows) == 8
    assert gen_rows[0].startswith("| vLLM (in process) | greedy | merged weights (no adapter) | 40 | 20.0 | 30.0 "
                                  "| 60.0 | 3.00x | 3.00x | - | - |")
    assert "| HF generate | sampled | LoRA adapter active | 60 | 6.0 | 6.0 | 12.0 | - | - | 0.60x | 0.60x |" in bench
    assert "greedy: 4 x 1; sampled: 2 x 2 at T=0.7; <= 48 new tokens" in bench and "LoRA r=16, alpha 32" in bench
    run_script(ROOT / "bench" / "report.py", *argv, "--check")
