"""bench/report.py: every harnessed bench's section (and README row) written from its JSON, refusing another
machine's JSON unless told, a JSON with failed checks, and a named JSON that is not there."""

import json
import os
import sys

import pytest
from helpers import load_bench

BENCH_MD = ("# B\n<!-- report:eval -->\nold eval\n<!-- /report:eval -->\nhand-written text stays\n"
            "<!-- report:kernels -->\nold kernels\n<!-- /report:kernels -->\n")
README = ("| job | command | result | wall | machine |\n|---|---|---|---|---|\n"
          "| old | eval | row | | | <!-- report:eval -->\n| next | row | | | |\n")


def fake_doc(script, tables, *, load=(0.1, 0.2), machine_id=None, **extra):
    harness = load_bench("harness")
    m = harness.machine(1)
    if machine_id:
        m.update(id=machine_id, host="elsewhere")
    return {"script": script, "command": f"python {script}", "settings": extra.pop("settings", {}), "machine": m,
            "date": "2026-12-06", "load_average": {"start": [load[0], 1, 1], "end": [load[1], 1, 1]},
            "wall_s": 120.0, "tables": tables, "absent": extra.pop("absent", {}), "timed": "one call",
            "excluded": "the load", "repeats_note": "Repeats: 3.", **extra}


def eval_doc(**kw):
    from_row = dict(tokens=100, tokens_per_s_min=90.0, tokens_per_s_median=100.0, accuracy=0.5)
    rows = [dict(from_row, method="greedy", variant="vLLM", key="vllm", vs_hf_batched_median=1.03),
            dict(from_row, method="greedy", variant="HF batched", key="hf-batched", vs_hf_batched_median=1.0,
                 greedy_equal_to_vllm=199),
            dict(from_row, method="sample pool n=8", variant="vLLM", key="vllm", vs_hf_batched_median=1.1,
                 tokens_per_s_median=400.0),
            dict(from_row, method="sample pool n=8", variant="HF batched", key="hf-batched", vs_hf_batched_median=1.0),
            dict(from_row, method="sample pool n=8", variant="HF policy", key="hf-per-question",
                 vs_hf_batched_median=0.4, tokens_per_s_median=160.0)]
    cols = [["method", "method", ""], ["variant", "variant", ""], ["tokens_per_s_median", "tokens/s", ".0f"],
            ["vs_hf_batched_median", "vs HF batched", ".2f"]]
    return fake_doc("bench/eval.py", [{"title": None, "columns": cols, "rows": rows}],
                    settings={"n": 8, "num": 200, "repeats": 3, "model": "stage:grpo_sft"}, **kw)


def kernels_doc(**kw):
    cols = [["impl", "impl", ""], ["time_ms", "time (ms), median", ".0f"]]
    rows = [{"impl": "naive", "time_ms": 7000.4}, {"impl": "fused", "time_ms": 6500.0}]
    return fake_doc("bench/kernels.py", [{"title": None, "columns": cols, "rows": rows}],
                    absent={"liger": "Liger-Kernel is Triton-only (GPU): not run on CPU"}, **kw)


def run_report(monkeypatch, tmp_path, *args):
    report = load_bench("report")
    argv = ["report.py", "--bench-readme", str(tmp_path / "bench.md"), "--readme", str(tmp_path / "readme.md"), *args]
    monkeypatch.setattr(sys, "argv", argv)
    report.main()


def test_report_writes_each_bench_section_and_readme_row_from_its_json(tmp_path, monkeypatch, capsys):
    (tmp_path / "bench.md").write_text(BENCH_MD)
    (tmp_path / "readme.md").write_text(README)
    (tmp_path / "eval.json").write_text(json.dumps(eval_doc()))
    busy = os.cpu_count() * 1.5  # load average above half the cores: a loaded machine
    (tmp_path / "kernels.json").write_text(json.dumps(kernels_doc(load=(busy, 2.0))))
    sources = ["--json", f"eval={tmp_path / 'eval.json'}", "--json", f"kernels={tmp_path / 'kernels.json'}"]
    with pytest.raises(SystemExit, match="out of date"):
        run_report(monkeypatch, tmp_path, *sources, "--check")
    run_report(monkeypatch, tmp_path, *sources)
    bench = (tmp_path / "bench.md").read_text()
    assert "old eval" not in bench and "old kernels" not in bench and "hand-written text stays" in bench
    assert "| greedy | vLLM | 100 | 1.03 |" in bench and "| naive | 7000 |" in bench
    assert "| liger: absent | Liger-Kernel is Triton-only (GPU): not run on CPU |" in bench
    assert "Timed: one call. Excluded: the load. Repeats: 3." in bench
    eval_block = bench.split("<!-- report:eval -->")[1].split("<!-- /report:eval -->")[0]
    kernels_block = bench.split("<!-- report:kernels -->")[1].split("<!-- /report:kernels -->")[0]
    assert "Quiet machine." in eval_block and "**Loaded machine**" in kernels_block  # load 0.1 vs 1.5x the cores
    readme = (tmp_path / "readme.md").read_text().splitlines()
    assert "vLLM greedy 1.03x, sample pool n=8 1.10x HF's tokens/s (median of 3 interleaved repeats)" in readme[2]
    assert "the pool is 2.50x: a policy, not the engine" in readme[2] and "equal 199/200" in readme[2]
    assert readme[2].endswith("| <!-- report:eval -->") and readme[3] == "| next | row | | | |"
    run_report(monkeypatch, tmp_path, *sources, "--check")  # now up to date
    assert "up to date" in capsys.readouterr().out


def test_report_refuses_another_machine_failed_checks_and_a_missing_named_json(tmp_path, monkeypatch):
    (tmp_path / "bench.md").write_text(BENCH_MD)
    (tmp_path / "readme.md").write_text(README)
    source = ["--json", f"kernels={tmp_path / 'kernels.json'}"]
    (tmp_path / "kernels.json").write_text(json.dumps(kernels_doc(machine_id="0123456789ab")))
    with pytest.raises(SystemExit, match="measured on another machine.*--other-machine"):
        run_report(monkeypatch, tmp_path, *source)
    assert "old kernels" in (tmp_path / "bench.md").read_text()
    run_report(monkeypatch, tmp_path, *source, "--other-machine")
    assert "**another machine**" in (tmp_path / "bench.md").read_text()
    (tmp_path / "kernels.json").write_text(json.dumps(kernels_doc(problems=["fused and naive differ"])))
    with pytest.raises(SystemExit, match="recorded failed checks, not published"):
        run_report(monkeypatch, tmp_path, *source)
    with pytest.raises(SystemExit, match="does not exist: run `python bench/eval.py` first"):
        run_report(monkeypatch, tmp_path, "--json", f"eval={tmp_path / 'nope.json'}")
    with pytest.raises(SystemExit, match="expected NAME=PATH"):
        run_report(monkeypatch, tmp_path, "--json", f"kernel={tmp_path / 'kernels.json'}")
