"""On-policy preference pairs (pref.pairs=on_policy): the start model's own samples, right against wrong.

    training prompts with answers (a built-in task, or {prompt, answer} rows)        <- pair_questions, no model
      --engine: pref.pair_samples completions each at pref.pair_temperature--> texts  <- sample_groups
      --the task's match rule (optsys.data.answers)--> correct / incorrect per sample
      --select_pair--> chosen: the SHORTEST correct completion (ties: the first drawn)
                       rejected: an incorrect one drawn at random, seeded by (seed, prompt index)
      --> <output_dir>/pairs.jsonl (one line per pair) + pairs.meta.json (fingerprint, counts)

The START model samples (the policy before any update, which is also DPO's reference), so the pairs are what the
model itself gets right and wrong. Shortest-correct counters DPO's pull toward longer answers (a longer chosen
side rewards length, not correctness); a random incorrect sample spreads the rejected side over the model's
error modes instead of always its shortest (often an empty or cut) one. An empty completion is neither chosen
nor rejected (a pair needs text on both sides): it is counted (data/pair_samples_empty).

A prompt whose samples are all correct or all incorrect gives no pair; it is counted (data/prompts_all_correct,
data/prompts_all_wrong), never dropped silently, and a run where no prompt gives a pair stops with a DataError
that says what to change. A resumed run reuses pairs.jsonl (its fingerprint must match).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from optsys.checkpoint import weights_stamp
from optsys.config import ConfigError, TrainConfig
from optsys.data.answers import answers_match, canonical_answer, canonical_reference
from optsys.data.tasks import get_task
from optsys.errors import DataError
from optsys.eval.generate import stop_token_ids
from optsys.eval.tasks import default_match
from optsys.parallel.dist import World, all_gather_objects, barrier, broadcast_object
from optsys.rollout.engine import Sampling, resolve_engine_name, stable_seed
from optsys.stages import is_stage
from optsys.telemetry.nvtx import phase
from optsys.telemetry.progress import StepProgress
from optsys.trainers.rl_batch import prompt_row

PAIRS_FILE = "pairs.jsonl"
META_FILE = "pairs.meta.json"
CHUNK = 64  # prompts per engine call: one progress update each (seeds are per prompt, so chunking changes nothing)


@dataclass
class Questions:
    """The training prompts of on-policy pairs: rows {prompt: messages, answer}, how answers match, the source."""
    rows: list[dict]
    match: str
    source: str


def pair_questions(cfg: TrainConfig) -> Questions:
    """The training prompts and their answers, read before any model loads: a built-in task's training problems, or
    data.dataset rows with `prompt` and `answer` (a row without an answer is a DataError naming it)."""
    d = cfg.data
    if d.task is not None:
        task = get_task(d.task)
        rows = task.rl_prompts("train", d.num_train, difficulty=d.difficulty, seed=cfg.seed)
        return Questions([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows], task.match,
                         f"task:{d.task}/train")
    from optsys.data.sources import load_rows

    rows, missing = [], []
    for i, row in enumerate(load_rows(d.dataset, split=d.split)):
        if not isinstance(row, dict) or row.get("answer") is None:
            missing.append(i)
            continue
        r = prompt_row(row, d.dataset, i)  # prompt: a string or messages ending with a user turn
        rows.append({"prompt": r["prompt"], "answer": r["answer"]})
    if missing:
        first = missing[0]
        raise DataError(f"{d.dataset}: row {first} has no 'answer' field ({len(missing)} of {len(rows) + len(missing)} "
                        "rows lack one). pref.pairs=on_policy checks each sample against the row's answer; give every "
                        "row 'prompt' and 'answer', or use pref.pairs=task with rows holding 'chosen' and 'rejected'.")
    if not rows:
        raise DataError(f"{d.dataset}: no rows to sample on-policy pairs from")
    return Questions(rows, default_match([r["answer"] for r in rows]), d.dataset)


# ---------------------------------------------------------------------------- selection (pure)


def select_pair(texts: list[str], correct: list[bool], seed: int) -> tuple[str, str] | None:
    """(chosen, rejected) of one prompt's samples, or None without a correct and an incorrect non-empty one.

    chosen: the shortest correct text (in characters; ties: the first drawn); rejected: an incorrect text drawn
    by random.Random(seed) among the incorrect ones, in sample order (deterministic under the seed)."""
    right = [t for t, ok in zip(texts, correct) if ok and t.strip()]
    wrong = [t for t, ok in zip(texts, correct) if not ok and t.strip()]
    if not right or not wrong:
        return None
    chosen = min(right, key=len)  # min keeps the first of equal lengths
    return chosen, wrong[random.Random(seed).randrange(len(wrong))]


def build_pairs(questions: Questions, samples: list[list[str]], *, seed: int) -> tuple[list[dict], dict]:
    """Pair rows (pairs.jsonl lines) and counts from every prompt's sampled texts, scored by questions.match."""
    rows, counts = [], {"pair_prompts": len(samples), "pairs_built": 0, "prompts_all_correct": 0,
                        "prompts_all_wrong": 0, "pair_samples_empty": 0, "pair_samples_correct": 0}
    for i, (q, texts) in enumerate(zip(questions.rows, samples)):
        ref = canonical_reference(q["answer"], questions.match)
        correct = [answers_match(canonical_answer(t, questions.match), ref, questions.match) for t in texts]
        counts["pair_samples_empty"] += sum(not t.strip() for t in texts)
        counts["pair_samples_correct"] += sum(correct)
        pair = select_pair(texts, correct, stable_seed(seed, "on_policy_pair", i))
        if pair is None:
            non_empty_right = any(ok and t.strip() for t, ok in zip(texts, correct))
            counts["prompts_all_correct" if non_empty_right else "prompts_all_wrong"] += 1
            continue
        counts["pairs_built"] += 1
        rows.append({"prompt": q["prompt"], "chosen": pair[0], "rejected": pair[1], "answer": q["answer"],
                     "correct": sum(correct), "samples": len(texts)})
    return rows, counts


def no_pair_error(counts: dict, cfg: TrainConfig, source: str) -> DataError:
    p = cfg.pref
    n, right, wrong = counts["pair_prompts"], counts["prompts_all_correct"], counts["prompts_all_wrong"]
    advice = []
    if wrong:
        advice.append("start from a model that answers some prompts right (an SFT start: model.name_or_path="
                      "stage:<sft recipe> or its final/ folder)")
    advice.append(f"draw more samples per prompt (pref.pair_samples={p.pair_samples})")
    if right:
        advice.append(f"sample more varied answers (raise pref.pair_temperature={p.pair_temperature}) or use harder "
                      "prompts (data.difficulty)")
    return DataError(f"pref.pairs=on_policy: none of the {n} training prompts of {source} gave a pair: {right} had "
                     f"every sample correct, {wrong} had none correct (empty samples, never paired: "
                     f"{counts['pair_samples_empty']}). A pair needs a correct and an incorrect sample of the same "
                     "prompt. To get pairs: " + "; ".join(advice) + ".")


# ---------------------------------------------------------------------------- sampling


def max_new_tokens(cfg: TrainConfig) -> int:
    """pref.pair_max_new_tokens, or eval.max_new_tokens (the budget held-out answers are judged at) when unset."""
    return cfg.pref.pair_max_new_tokens or cfg.eval.max_new_tokens


def pair_engine_name(cfg: TrainConfig, world: World) -> str:
    """pref.pair_engine resolved: auto is vLLM when installed, except under torchrun (vLLM's shutdown would take
    the trainer's process group with it) and with QLoRA (vLLM would sample the unquantized base)."""
    name = cfg.pref.pair_engine
    if name == "auto" and (world.distributed or cfg.model.lora.quantize != "none"):
        return "hf"
    return resolve_engine_name(name)


def sample_groups(engine, questions: Questions, tokenizer, sampling: Sampling, *, seed: int, world: World,
                  max_tokens: int, progress: bool) -> list[list[str]]:
    """Every prompt's sampling.n completion texts, in prompt order. Each rank samples its round-robin share (a
    prompt's samples depend on its seed alone, so any world size draws the same), then all gather them."""
    ids = [list(tokenizer.apply_chat_template(q["prompt"], add_generation_prompt=True, tokenize=True,
                                              return_dict=False)) for q in questions.rows]
    for i, p in enumerate(ids):
        if len(p) + sampling.max_new_tokens > max_tokens:
            raise DataError(f"{questions.source} row {i}: the prompt has {len(p)} tokens, and with "
                            f"pref.pair_max_new_tokens={sampling.max_new_tokens} exceeds data.max_tokens={max_tokens}; "
                            "raise data.max_tokens or lower pref.pair_max_new_tokens")
    mine = list(range(world.rank, len(ids), world.size))
    bar = StepProgress(len(mine), f"on-policy pairs: {sampling.n} samples x {len(ids)} prompts",
                       enabled=progress and world.is_main)
    texts: dict[int, list[str]] = {}
    for start in range(0, len(mine), CHUNK):
        chunk = mine[start: start + CHUNK]
        with phase("generate"):
            outs = engine.generate([ids[i] for i in chunk], sampling,
                                   [stable_seed(seed, "on_policy_pairs", i) for i in chunk])
        for i, group in zip(chunk, outs):
            texts[i] = [tokenizer.decode(list(c.token_ids), skip_special_tokens=True) for c in group]
        bar.update(start + len(chunk))
    bar.close()
    for share in all_gather_objects(sorted(texts.items()), world):
        texts.update(share)
    return [texts[i] for i in range(len(ids))]


def make_engine(name: str, model, tokenizer, *, model_path: str, storage_dtype, max_tokens: int, seed: int,
                world: World):
    """HF generate on the start model itself, or vLLM in this process loading the start model's folder."""
    if name == "hf":
        from optsys.rollout.hf_engine import HFEngine

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return HFEngine(model, pad_token_id=pad)  # the model is not sharded yet: no synced_gpus
    from optsys.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(model_path, dtype=storage_dtype, max_model_len=max_tokens, seed=seed, device=world.device)


# ---------------------------------------------------------------------------- the cache in the run folder


def pairs_fingerprint(cfg: TrainConfig, questions: Questions, engine: str, resolve) -> dict:
    """What the sampled pairs depend on: the start model (a local folder by its weight files), the prompts and
    answers, the sampling settings, the engine and the seed."""
    source = cfg.model.name_or_path
    h = hashlib.sha256(json.dumps(questions.rows, sort_keys=True).encode()).hexdigest()
    return {"model.name_or_path": source, "model.revision": cfg.model.revision,
            "model.weights_stamp": weights_stamp(resolve(source, cfg.seed) if is_stage(source) else source),
            "prompts_sha256": h, "match": questions.match, "pref.pair_samples": cfg.pref.pair_samples,
            "pref.pair_temperature": cfg.pref.pair_temperature, "max_new_tokens": max_new_tokens(cfg),
            "engine": engine, "seed": cfg.seed}


def read_cache(out_dir: Path, fingerprint: dict) -> tuple[list[dict], dict] | None:
    """(pair rows, counts) from a finished earlier attempt of this run; None if there is none; a ConfigError naming
    the field when it was sampled under other settings."""
    meta_path, rows_path = out_dir / META_FILE, out_dir / PAIRS_FILE
    if not meta_path.exists() or not rows_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    saved = meta.get("fingerprint", {})
    diff = [f"{k}: cached {saved.get(k, '<missing>')!r}, now {v!r}" for k, v in fingerprint.items()
            if saved.get(k) != v]
    if diff:
        raise ConfigError(f"the on-policy pairs in {rows_path} were sampled for a different run:\n  "
                          + "\n  ".join(diff) + f"\nDelete {rows_path} and {meta_path} (they are sampled again), "
                          "or use a new output_dir.")
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    return rows, meta["counts"]


def write_cache(out_dir: Path, rows: list[dict], counts: dict, fingerprint: dict) -> None:
    """pairs.jsonl (readable, and usable as a data.dataset of pairs), then the meta file: its presence marks the
    pairs complete."""
    tmp = out_dir / (PAIRS_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out_dir / PAIRS_FILE)
    (out_dir / META_FILE).write_text(json.dumps({"fingerprint": fingerprint, "counts": counts}, indent=1) + "\n")


# ---------------------------------------------------------------------------- the trainer's entry


def on_policy_pairs(cfg: TrainConfig, questions: Questions, model, tokenizer, *, world: World, out_dir: Path,
                    storage_dtype, autocast, resolve) -> tuple[list[dict], dict]:
    """The run's on-policy pair rows and its data/* counts: from pairs.jsonl when an earlier attempt of this run
    wrote it, else sampled from `model` (the start policy, not yet sharded) and written there (rank 0)."""
    engine_name = pair_engine_name(cfg, world)
    fingerprint = pairs_fingerprint(cfg, questions, engine_name, resolve)
    found = None
    if world.is_main:  # a mismatched cache is an error on rank 0; the others learn whether one exists
        found = read_cache(out_dir, fingerprint)
    if broadcast_object(found is not None, world):
        rows, counts = found if world.is_main else read_cache(out_dir, fingerprint)
    else:
        model_path = resolve(cfg.model.name_or_path, cfg.seed)
        engine = make_engine(engine_name, model, tokenizer, model_path=model_path, storage_dtype=storage_dtype,
                             max_tokens=cfg.data.max_tokens, seed=cfg.seed, world=world)
        sampling = Sampling(n=cfg.pref.pair_samples, temperature=cfg.pref.pair_temperature,
                            max_new_tokens=max_new_tokens(cfg), stop_token_ids=tuple(stop_token_ids(model, tokenizer)))
        try:
            with autocast:
                texts = sample_groups(engine, questions, tokenizer, sampling, seed=cfg.seed, world=world,
                                      max_tokens=cfg.data.max_tokens, progress=cfg.trainer.progress)
        finally:
            engine.close()
        rows, counts = build_pairs(questions, texts, seed=cfg.seed)
        if world.is_main:
            write_cache(out_dir, rows, counts, fingerprint)
        barrier(world)
    if not rows:
        raise no_pair_error(counts, cfg, questions.source)
    if world.is_main:
        print(f"on-policy pairs: {counts['pairs_built']} of {counts['pair_prompts']} prompts gave a pair "
              f"({counts['prompts_all_correct']} all correct, {counts['prompts_all_wrong']} all wrong; "
              f"{cfg.pref.pair_samples} samples each at temperature {cfg.pref.pair_temperature}, "
              f"{counts['pair_samples_correct']} correct in all) -> {out_dir / PAIRS_FILE}")
    return rows, counts
