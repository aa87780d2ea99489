"""On-policy preference pairs (pref.pairs=on_policy, optsys/trainers/pairs.py): pair selection with a scripted
engine (counts, determinism, all-right / all-wrong prompts, the no-pair error), the run folder's pairs.jsonl, a
short DPO run on scripted samples, a real sampling run of the random-init tiny model, and the refused inputs."""

import json

import pytest

from optsys.config import ConfigError
from optsys.data.tasks import get_task
from optsys.errors import DataError
from optsys.parallel.dist import World
from optsys.rollout.engine import Completion, Sampling
from optsys.trainers import pairs, preference
from optsys.validation import load_config

TOKENIZER = "factory"  # the tiny factory's tokenizer (no model is built for the unit tests)
CPU = World(0, 1, 0, __import__("torch").device("cpu"))


class ScriptedEngine:
    """An engine whose completions of prompt i are script(i, seed) (texts), encoded with the tokenizer; it records
    the seeds it was given."""

    name = "scripted"

    def __init__(self, tokenizer, prompts, script):
        self.tok, self.index, self.script, self.seeds = tokenizer, {tuple(p): i for i, p in enumerate(prompts)}, \
            script, []

    def generate(self, prompts, sampling, seeds):
        self.seeds += seeds
        out = []
        for p, s in zip(prompts, seeds):
            texts = self.script(self.index[tuple(p)], s)
            assert len(texts) == sampling.n
            out.append([Completion(tuple(self.tok.encode(t, add_special_tokens=False)), (0.0,) * len(t), "stop")
                        for t in texts])
        return out

    def close(self):
        pass


def arithmetic(n):
    task = get_task("arithmetic")
    rows = task.rl_prompts("train", n, difficulty=2, seed=0)
    return pairs.Questions([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows], task.match, "task:x")


def prompt_ids(tok, questions):
    return [tok.apply_chat_template(q["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
            for q in questions.rows]


def test_select_pair_shortest_correct_against_a_seeded_incorrect():
    texts = ["The answer is 78.", "77", "78", "  ", "79", "80", "78 "]
    correct = [True, False, True, False, False, False, True]
    picks = {seed: pairs.select_pair(texts, correct, seed) for seed in range(40)}
    assert {c for c, _ in picks.values()} == {"78"}  # the shortest correct; "78 " (as long after strip) comes later
    assert {r for _, r in picks.values()} == {"77", "79", "80"}  # every incorrect non-empty one, never the blank
    assert pairs.select_pair(texts, correct, 3) == picks[3]  # the same under the same seed
    assert pairs.select_pair(["1", "2"], [True, True], 0) is None
    assert pairs.select_pair(["1", "2"], [False, False], 0) is None
    assert pairs.select_pair(["1", ""], [True, False], 0) is None  # an empty sample is never rejected


def test_sampled_pairs_counts_and_determinism(tok):
    """Four kinds of prompts, scripted: mixed (a pair), all correct, all wrong, correct + only empty wrong ones."""
    q = arithmetic(8)
    answers = [r["answer"] for r in q.rows]

    def script(i, seed):
        a = answers[i]
        wrong = [str(int(a) + d) for d in (1, 2, 10)]
        return {0: [f"The answer is {a}.", wrong[0], a, wrong[1], wrong[2], a],  # mixed: numeric match reads both
                1: [a] * 6, 2: wrong * 2, 3: [a, "", a, "", "", a]}[i % 4]

    engine = ScriptedEngine(tok, prompt_ids(tok, q), script)
    sampling = Sampling(n=6, temperature=0.7, max_new_tokens=8)
    texts = pairs.sample_groups(engine, q, tok, sampling, seed=0, world=CPU, max_tokens=256, progress=False)
    rows, counts = pairs.build_pairs(q, texts, seed=0)
    assert counts == {"pair_prompts": 8, "pairs_built": 2, "prompts_all_correct": 4, "prompts_all_wrong": 2,
                      "pair_samples_empty": 6, "pair_samples_correct": 3 * 2 + 6 * 2 + 3 * 2}
    assert [r["answer"] for r in rows] == [answers[0], answers[4]]
    assert [r["prompt"] for r in rows] == [q.rows[0]["prompt"], q.rows[4]["prompt"]]
    for r in rows:  # the shortest correct text is the bare answer, not "The answer is ..."
        assert r["chosen"] == r["answer"] and r["rejected"] != r["answer"]
        assert (r["correct"], r["samples"]) == (3, 6)
    # the same seed gives the same pairs and per-prompt seeds; another seed may pick other rejected samples only
    again = pairs.build_pairs(q, pairs.sample_groups(engine, q, tok, sampling, seed=0, world=CPU, max_tokens=256,
                                                     progress=False), seed=0)
    assert again == (rows, counts) and engine.seeds[:8] == engine.seeds[8:]
    rejected = {tuple(r["rejected"] for r in pairs.build_pairs(q, texts, seed=s)[0]) for s in range(10)}
    assert len(rejected) > 1
    assert all(tuple(r["chosen"] for r in pairs.build_pairs(q, texts, seed=s)[0]) == (answers[0], answers[4])
               for s in range(10))


def test_a_rank_samples_its_share_and_every_rank_gets_all(tok, monkeypatch):
    """Two ranks, faked: each samples every other prompt under the prompt's own seed; the gather gives both the same
    texts in prompt order, equal to one process's."""
    q = arithmetic(5)
    script = lambda i, seed: [f"{i}-{seed % 97}", str(i)]  # noqa: E731
    one = pairs.sample_groups(ScriptedEngine(tok, prompt_ids(tok, q), script), q, tok, Sampling(n=2), seed=0,
                              world=CPU, max_tokens=256, progress=False)
    shares = []

    class Sent(Exception):
        pass

    def record(obj, world):  # what each rank contributes to the gather; the run stops there
        shares.append(obj)
        raise Sent

    monkeypatch.setattr(pairs, "all_gather_objects", record)
    for rank in (0, 1):
        with pytest.raises(Sent):
            pairs.sample_groups(ScriptedEngine(tok, prompt_ids(tok, q), script), q, tok, Sampling(n=2), seed=0,
                                world=World(rank, 2, rank, CPU.device), max_tokens=256, progress=False)
    assert [i for i, _ in shares[0]] == [0, 2, 4] and [i for i, _ in shares[1]] == [1, 3]
    monkeypatch.setattr(pairs, "all_gather_objects", lambda obj, world: shares)
    for rank in (0, 1):
        got = pairs.sample_groups(ScriptedEngine(tok, prompt_ids(tok, q), script), q, tok, Sampling(n=2), seed=0,
                                  world=World(rank, 2, rank, CPU.device), max_tokens=256, progress=False)
        assert got == one


def test_no_pair_error_says_what_to_change():
    cfg = load_config("dpo_tiny", overrides=["pref.pairs=on_policy"])
    wrong = pairs.no_pair_error({"pair_prompts": 5, "prompts_all_correct": 0, "prompts_all_wrong": 5,
                                 "pair_samples_empty": 2}, cfg, "task:x")
    assert "none of the 5 training prompts of task:x gave a pair: 0 had every sample correct, 5 had none" in str(wrong)
    assert "SFT start" in str(wrong) and "pref.pair_samples=8" in str(wrong) and "pair_temperature" not in str(wrong)
    right = pairs.no_pair_error({"pair_prompts": 5, "prompts_all_correct": 5, "prompts_all_wrong": 0,
                                 "pair_samples_empty": 0}, cfg, "task:x")
    assert "pref.pair_temperature=0.7" in str(right) and "SFT" not in str(right)


def test_pairs_cache_round_trip_and_mismatch(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "1+1="}], "chosen": "2", "rejected": "3", "answer": "2"}]
    fp = {"seed": 0, "pref.pair_samples": 8}
    pairs.write_cache(tmp_path, rows, {"pairs_built": 1}, fp)
    assert pairs.read_cache(tmp_path, fp) == (rows, {"pairs_built": 1})
    with pytest.raises(ConfigError, match="pref.pair_samples: cached 8, now 4"):
        pairs.read_cache(tmp_path, {**fp, "pref.pair_samples": 4})
    assert pairs.read_cache(tmp_path / "none", fp) is None


def on_policy_cfg(out, model_path, *extra):
    return load_config("dpo_tiny", overrides=[
        f"model.name_or_path={model_path}", f"output_dir={out}", "data.num_train=24", "data.num_eval=16",
        "data.max_tokens=256", "trainer.batch_tokens=256", "trainer.max_steps=3", "trainer.warmup_steps=1",
        "trainer.log_every=1", "trainer.progress=false", "trainer.lr=1e-3", "eval.batch_size=16",
        "eval.max_new_tokens=4", "pref.pairs=on_policy", "pref.pair_engine=hf", "pref.pair_samples=4", *extra])


def test_dpo_on_scripted_samples_builds_pairs_trains_and_reuses_them(tmp_path, tiny_path, monkeypatch):
    """The trainer's path end to end with a scripted sampler (a random-init model answers nothing right): every
    third prompt mixed, the others all correct or all wrong; pairs.jsonl holds exactly the pairs, the counts are in
    the summary, DPO trains on them, and a resumed run reads pairs.jsonl instead of sampling again."""
    made = []

    def scripted(name, model, tokenizer, **kw):
        q = pairs.pair_questions(cfg)
        answers = [r["answer"] for r in q.rows]
        script = lambda i, seed: {0: [answers[i], "0", "1", answers[i]], 1: [answers[i]] * 4,  # noqa: E731
                                  2: ["7", "8", "9", "10"]}[i % 3]
        made.append(name)
        return ScriptedEngine(tokenizer, prompt_ids(tokenizer, q), script)

    monkeypatch.setattr(pairs, "make_engine", scripted)
    out = tmp_path / "run"
    cfg = on_policy_cfg(out, tiny_path, "trainer.save_every=2", "eval.before=false", "eval.after=false")
    s = preference.train(cfg)
    assert made == ["hf"]
    assert (s["data/pair_prompts"], s["data/pairs_built"], s["data/prompts_all_correct"],
            s["data/prompts_all_wrong"], s["data/pairs"]) == (24, 8, 8, 8, 8)
    assert s["data/pair_engine"] == "hf" and s["time/pairs_s"] >= 0
    lines = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and all(r["chosen"] == r["answer"] and r["rejected"] in ("0", "1") for r in lines)
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "train/loss" in r] == [1, 2, 3]
    assert "eval/reward_accuracy" in s  # held out: the task's test pairs

    # resume from step 2: the pairs come from pairs.jsonl (no engine is made), the same 8
    import shutil

    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    s2 = preference.train(on_policy_cfg(out, tiny_path, "trainer.save_every=2", "eval.before=false",
                                        "eval.after=false", "resume=true"))
    assert made == ["hf"] and s2["data/pairs_built"] == 8 and s2["data/pairs"] == 8


def test_random_model_gives_no_pairs_and_says_why(tmp_path, tiny_path):
    """Real sampling (HF generate) from the random-init tiny model: nothing it writes is a right sum, so every prompt
    is all wrong; the counts are written and the run stops with the no-pair error."""
    out = tmp_path / "run"
    cfg = on_policy_cfg(out, tiny_path, "data.num_train=6", "pref.pair_samples=2", "eval.before=false",
                        "eval.after=false")
    with pytest.raises(DataError, match=r"none of the 6 training prompts of task:arithmetic_reversed/train gave a "
                                        r"pair: 0 had every sample correct, 6 had none correct.*SFT start"):
        preference.train(cfg)
    meta = json.loads((out / "pairs.meta.json").read_text())
    assert meta["counts"]["prompts_all_wrong"] == 6 and meta["fingerprint"]["engine"] == "hf"
    assert (out / "pairs.jsonl").read_text() == ""


# ---------------------------------------------------------------------------- refused inputs


def test_dataset_without_answers_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "2+2=", "answer": "4"}) + "\n" + json.dumps({"prompt": "3+3="}) + "\n")
    monkeypatch.setattr(preference, "load_model_and_tokenizer",
                        lambda *a, **k: pytest.fail("the model loaded before the data was checked"))
    cfg = load_config("dpo_tiny", overrides=["pref.pairs=on_policy", "data.task=null", f"data.dataset={data}",
                                             f"output_dir={tmp_path / 'run'}", "trainer.progress=false"])
    with pytest.raises(DataError, match=r"prompts.jsonl: row 1 has no 'answer' field \(1 of 2 rows lack one\)"):
        preference.train(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["pref.pairs=on_policy", "pref.pair_samples=1"], r"pref.pair_samples must be >= 2 \(a pair needs a correct"),
    (["pref.pairs=on_policy", "pref.pair_temperature=0"], r"pref.pair_temperature must be positive"),
    (["pref.pair_samples=4"], r"pref.pair_samples=4 applies to pref.pairs=on_policy"),
    (["pref.pairs=on_policy", "pref.pair_max_new_tokens=1024"], r"pref.pair_max_new_tokens=1024 leaves no room"),
    (["pref.pairs=on_policy", "data.task=guess"], r"data.task=guess is a multi-turn game"),
])
def test_on_policy_settings_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("dpo_tiny", overrides=overrides)


def test_vllm_sampler_refusals(monkeypatch):
    """pref.pair_engine=vllm where it would not sample the start model, or cannot run, is refused naming the key."""
    import optsys.validation as validation

    on = ["pref.pairs=on_policy", "pref.pair_engine=vllm"]
    with pytest.raises(ConfigError, match="pref.pair_engine=vllm with model.lora.quantize=nf4: vLLM would sample"):
        load_config("dpo_tiny", overrides=[*on, "model.lora.r=4", "model.lora.quantize=nf4",
                                           "pref.reference=adapters_off"])
    monkeypatch.setattr(validation, "vllm_available", lambda: False)
    with pytest.raises(ConfigError, match=r"pref.pair_engine=vllm but vLLM is not installed.*pref.pair_engine=hf"):
        load_config("dpo_tiny", overrides=on)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="pref.pair_engine=vllm under torchrun is not supported"):
        load_config("dpo_tiny", overrides=on)


def test_given_pairs_replace_the_training_pairs_only(tok):
    """build_preference_data(pair_rows=...): the given pairs train (KTO: each as a desirable and an undesirable
    example), the task's test pairs stay the held-out ones, and a dataset run has none (its eval rows are questions)."""
    from optsys.config import DataConfig
    from optsys.data.preference import build_preference_data

    given = [{"prompt": [{"role": "user", "content": f"{i}+1="}], "chosen": str(i + 1), "rejected": str(i)}
             for i in range(10, 13)]
    d = DataConfig(task="arithmetic", num_train=50, num_eval=7, max_tokens=256)
    data = build_preference_data(d, tok, seed=0, kto=False, pair_rows=given, pair_source="run/pairs.jsonl")
    assert len(data.train) == 3 and len(data.eval) == 7 and data.train_report.rows == 3
    trained = [t for t in data.train[0].chosen.targets if t >= 0]
    assert tok.decode(trained, skip_special_tokens=True) == "11"  # the given chosen answer is what trains
    kto = build_preference_data(d, tok, seed=0, kto=True, pair_rows=given)
    assert [p.label for p in kto.train] == [True, False] * 3 and len(kto.eval) == 14
    ds = DataConfig(task=None, dataset="unused.jsonl", eval_dataset="questions.jsonl", max_tokens=256)
    assert build_preference_data(ds, tok, seed=0, kto=False, pair_rows=given).eval == []
    with pytest.raises(DataError, match="run/pairs.jsonl: row 1: field 'rejected' equals field 'chosen'"):
        build_preference_data(d, tok, seed=0, kto=False, pair_rows=[given[0], {**given[1], "rejected": "12"}],
                              pair_source="run/pairs.jsonl")
