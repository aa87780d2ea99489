"""`python -m optsys.eval`: every method end to end on a tiny model, the files it writes, tasks from YAML and from
a function, two models compared, and the bad-input messages."""

import json
import shutil
from pathlib import Path

import pytest

from optsys.eval_cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def fail(args, capsys) -> str:
    """The message of a CLI run that exits with an input error."""
    with pytest.raises(SystemExit) as e:
        main(args)
    return str(e.value.code)


def test_every_method_end_to_end_writes_results_samples_and_plots(tiny_path, tmp_path):
    out = tmp_path / "ev"
    payload = main(["--model", str(tiny_path), "--tasks", "arithmetic,arithmetic_mc,corpus", "--num", "5",
                    "--method", "greedy,sample,self_consistency,best_of_n,self_correct,budget", "--n", "1,2,4",
                    "--scorer", "format", "--rounds", "1", "--budgets", "4,8", "--engine", "hf",
                    "--max-new-tokens", "6", "--out", str(out), "answer_tokens=4", "resamples=200"])
    r = payload["results"][0]["tasks"]
    assert set(r["arithmetic"]["methods"]) == {"greedy", "sample", "self_consistency", "best_of_n", "self_correct",
                                               "budget"}
    methods = r["arithmetic"]["methods"]
    assert [p["x"] for p in methods["self_consistency"]["points"]] == [1, 2, 4]
    assert [p["x"] for p in methods["budget"]["points"]] == [4, 8]
    assert [p["x"] for p in methods["self_correct"]["points"]] == [0, 1]
    for m in methods.values():
        assert 0.0 <= m["accuracy"] <= 1.0 and m["tokens_per_question"] > 0 and 0 <= m["unparsed_rate"] <= 1
    # pool methods share one pool: their k-token costs are equal, and grow with k
    tok_sc = [p["tokens_per_question"] for p in methods["self_consistency"]["points"]]
    assert tok_sc == [p["tokens_per_question"] for p in methods["best_of_n"]["points"]]
    assert tok_sc[0] < tok_sc[1] < tok_sc[2]
    assert set(r["arithmetic_mc"]["methods"]) == {"loglik", "loglik_norm"}
    assert r["corpus"]["methods"]["perplexity"]["perplexity"] > 1
    written = {p.name for p in out.iterdir()}
    assert {"results.json", "results.md", "samples.jsonl", "arithmetic_accuracy_vs_n.png",
            "arithmetic_accuracy_vs_tokens.png"} <= written
    results = json.loads((out / "results.json").read_text())  # strict JSON: no NaN
    assert results["results"][0]["tasks"]["arithmetic"]["methods"]["greedy"]["points"][0]["x"] == 1
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    gen = [row for row in rows if row["task"] == "arithmetic"]
    assert len(gen) == 5  # one row per question, every method inside: nothing dropped
    assert len(gen[0]["methods"]["sample"]["completions"]) == 4
    assert len(gen[0]["methods"]["best_of_n"]["scores"]) == 4
    assert "| arithmetic | greedy |" in (out / "results.md").read_text()


def test_yaml_task_and_function_task(tiny_path, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{a}=", "solution": f"work\n#### {2 * a}"}) + "\n"
                            for a in range(4)))
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(f"qa:\n  dataset: {data}\n  split: train\n  prompt_field: question\n  answer_field: solution\n"
                     f"  answer_pattern: '####\\s*(.+)'\n  match: numeric\n  max_new_tokens: 4\n")
    payload = main(["--model", str(tiny_path), "--tasks", "qa,tests.eval.eval_task_fixture:doubles",
                    "--task-file", str(tasks), "--engine", "hf", "--out", str(tmp_path / "o"), "plots=false"])
    r = payload["results"][0]["tasks"]
    assert r["qa"]["questions"] == 4 and r["qa"]["match"] == "numeric"
    assert r["tests.eval.eval_task_fixture:doubles"]["questions"] == 3
    # a task that names no match: numeric, since every reference is a number (and results.json says why)
    assert r["tests.eval.eval_task_fixture:doubles"]["match"] == "numeric"
    assert r["tests.eval.eval_task_fixture:doubles"]["match_source"] == "default: every reference is a number"
    rows = [json.loads(x) for x in (tmp_path / "o" / "samples.jsonl").read_text().splitlines()]
    assert [x["answer"] for x in rows if x["task"] == "qa"] == ["0", "2", "4", "6"]  # answer_pattern applied


def test_compare_two_models_on_the_same_questions(tiny_path, tmp_path):
    payload = main(["--compare", str(tiny_path), str(tiny_path), "--tasks", "arithmetic", "--num", "6",
                    "--engine", "hf", "--out", str(tmp_path / "c"), "plots=false", "resamples=100"])
    d = payload["comparison"]["differences"]["arithmetic"]["greedy"]
    assert d["difference"] == 0.0 and d["mcnemar"]["p_value"] == 1.0 and d["questions"] == 6
    assert "paired on the same questions" in (tmp_path / "c" / "results.md").read_text()


def test_bad_input_is_refused_with_a_clear_message(tiny_path, tmp_path, capsys):
    assert "does not exist" in fail(["--model", str(tmp_path / "nope"), "--engine", "hf"], capsys)
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in tiny_path.iterdir():
        if f.suffix in (".json", ".safetensors") and not f.name.startswith("tokenizer"):
            shutil.copy(f, no_tok / f.name)
    assert "lacks a tokenizer" in fail(["--model", str(no_tok)], capsys)
    assert "did you mean 'arithmetic'" in fail(["--model", str(tiny_path), "--tasks", "arithmetc"], capsys)
    assert ">= 1" in fail(["--model", str(tiny_path), "--n", "0,4"], capsys)
    assert "needs a scorer" in fail(["--model", str(tiny_path), "--method", "best_of_n"], capsys)
    assert "did you mean 'self_consistency'" in fail(["--model", str(tiny_path), "--method", "self_consistncy"],
                                                     capsys)
    assert "unknown config key 'temprature'" in fail(["--model", str(tiny_path), "temprature=1"], capsys)
    assert "context of 16 tokens" in fail(["--model", str(tiny_path), "--engine", "hf", "--num", "2",
                                           "max_model_len=16", "--out", str(tmp_path / "x")], capsys)
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"q": "1+1=", "answer": "2"}) + "\n")
    tasks = tmp_path / "t.yaml"
    tasks.write_text(f"bad:\n  dataset: {data}\n  split: train\n")
    msg = fail(["--model", str(tiny_path), "--engine", "hf", "--tasks", "bad", "--task-file", str(tasks),
                "--out", str(tmp_path / "y")], capsys)
    assert "no field 'question'" in msg and "prompt_field" in msg and "'q': '1+1='" in msg  # names it, shows the row
    tasks.write_text(f"bad:\n  dataset: {data}\n  promt_field: q\n")
    assert "did you mean 'prompt_field'" in fail(["--model", str(tiny_path), "--tasks", "bad", "--task-file",
                                                  str(tasks)], capsys)
    msg = fail(["--model", str(tiny_path), "--tasks", "bad", "--task-file", str(tmp_path / "nope.yaml")], capsys)
    assert "--task-file" in msg and "nope.yaml does not exist" in msg and "--config" not in msg
    msg = fail(["--model", str(tiny_path), "--tasks", "arithmetic_mc", "--num", "5000"], capsys)
    assert msg == ("config error: task arithmetic_mc has 1019 distinct test problems at difficulty 2; --num 5000 asks "
                   "for more. Lower --num, or raise --difficulty")  # not training's data.num_eval
    (tmp_path / "afile").write_text("")
    msg = fail(["--model", str(tiny_path), "--num", "2", "--out", str(tmp_path / "afile" / "ev")], capsys)
    assert "--out" in msg and "afile is a file" in msg
    if Path("/proc/self").is_dir():  # a folder no user can create, root included: refused before a model loads
        assert "--out /proc/no/such cannot be created" in fail(["--model", str(tiny_path), "--engine", "hf", "--num",
                                                                "2", "--out", "/proc/no/such"], capsys)


def test_every_eval_recipe_loads_and_validates():
    from optsys.eval.config import EVAL_RECIPES_DIR, load_eval_config

    names = sorted(p.stem for p in EVAL_RECIPES_DIR.glob("*.yaml"))
    assert "scaling_tiny" in names
    for name in names:
        load_eval_config(name)


@pytest.mark.recipe_full
def test_scaling_tiny_as_written(tmp_path):
    """The recipe's header: self-consistency and best-of-N rise from N=1 to N=16 (the SFT stage, if not cached,
    is trained first: ~5 min), pass@16 far above both."""
    payload = main(["--recipe", "scaling_tiny", "--out", str(tmp_path / "s")])
    m = payload["results"][0]["tasks"]["arithmetic_reversed"]["methods"]
    for method in ("self_consistency", "best_of_n"):
        acc = [p["accuracy"] for p in m[method]["points"]]
        assert acc[-1] > acc[0] + 0.1, (method, acc)
    assert m["sample"]["accuracy"] > 0.9 and 0.6 < m["greedy"]["accuracy"] < 0.8


def test_a_failing_scorer_is_counted_and_its_samples_never_picked(tiny_path, tmp_path):
    payload = main(["--model", str(tiny_path), "--tasks", "arithmetic", "--num", "4", "--method", "best_of_n",
                    "--n", "1,3", "--scorer", "tests.eval.eval_task_fixture:flaky_scorer", "--engine", "hf",
                    "--max-new-tokens", "4", "--out", str(tmp_path / "f"), "plots=false", "resamples=50"])
    r = payload["results"][0]["tasks"]["arithmetic"]
    assert r["methods"]["best_of_n"]["scorer_failures"] == 4  # 12 samples, every third call raised
    for row in r["samples"]:
        m = row["methods"]["best_of_n"]
        assert len(m["scores"]) == 3  # one score per sample, always (NaN where it failed)
        chosen = m["final"]["chosen"]
        assert m["scores"][chosen] == m["scores"][chosen]  # not NaN


@pytest.mark.parametrize("args,words", [
    # issue 23, item 13: a setting no chosen method reads is refused, not ignored
    (["--method", "greedy", "--n", "1,4,16"], ["n=[1, 4, 16] is not used by --method greedy", "sample"]),
    (["--method", "greedy", "--scorer", "confidence"], ["scorer='confidence' is not used", "best_of_n"]),
    (["--method", "sample", "--verifier", "format"], ["verifier='format' is not used", "self_correct"]),
    (["--method", "greedy", "--temperature", "0.7"], ["temperature=0.7 is not used by --method greedy"]),
    (["--method", "greedy", "--budgets", "8"], ["budgets=[8] is not used", "budget"]),
    (["--method", "sample", "--rounds", "3"], ["rounds=3 is not used by --method sample"]),
    # issue 23, item 11: a scorer / verifier that reads the reference answer is an oracle, refused
    (["--method", "best_of_n", "--n", "4", "--scorer", "correct"], ["--scorer correct", "oracle (pass@k)"]),
    (["--method", "best_of_n", "--n", "4", "--scorer", "numeric"], ["--scorer numeric", "oracle"]),
    (["--method", "self_correct", "--verifier", "correct"], ["--verifier correct", "oracle"]),
    (["--method", "self_correct", "--verifier", "digits"], ["--verifier digits", "oracle"]),
])
def test_ignored_settings_and_oracle_scorers_are_refused_before_a_model_loads(args, words, capsys):
    msg = fail(["--model", "tiny:test", *args], capsys)
    assert all(w in msg for w in words), msg


def test_settings_a_chosen_method_reads_are_accepted():
    from optsys.eval.config import load_eval_config

    for flags in ({"methods": ["greedy", "sample"], "n": [1, 4], "temperature": 0.7},
                  {"methods": ["best_of_n"], "scorer": "confidence", "n": [2]},
                  {"methods": ["self_correct"], "verifier": "format", "rounds": 1},
                  {"methods": ["budget"], "budgets": [8], "extend": 1}):
        cfg = load_eval_config(flags={"model": "tiny:test", **flags})
        for key, value in flags.items():  # accepted, and kept as given (not dropped or reset)
            assert getattr(cfg, key) == value, (key, getattr(cfg, key), value)


def test_list_tasks_includes_the_task_files(tmp_path, capsys):
    """Issue 23, item 12: `--list-tasks` ignored `--task-file`."""
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(f"my_qa:\n  dataset: {data}\n  match: numeric\n")
    main(["--list-tasks", "--task-file", str(tasks)])
    out = capsys.readouterr().out
    assert "arithmetic_reversed" in out and "my_qa" in out and str(tasks) in out
    tasks.write_text(f"my_qa:\n  dataset: {data}\n  promt_field: q\n")
    assert "did you mean 'prompt_field'" in fail(["--list-tasks", "--task-file", str(tasks)], capsys)
