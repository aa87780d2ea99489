"""Run an evaluation: open an engine (vLLM in process, HF generate, or an OpenAI endpoint), run each task's methods,
score every sample, and summarize with intervals; `compare` does it for two models on the same questions and
seeds and reports paired differences. optsys.eval.report writes the files."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from optsys.eval.config import EvalRunConfig
from optsys.eval.metrics import accuracy_interval, mcnemar, paired_interval
from optsys.eval.scaling import (
    CONFIDENCE,
    POOL_METHODS,
    MethodSettings,
    budget,
    greedy,
    pool_curve,
    sample_pool,
    score_pool,
    self_correct,
)
from optsys.eval.tasks import EvalTask, default_match, resolve_tasks
from optsys.models.sources import local_source


class CountingEngine:
    """An engine wrapper that adds up generate() time and generated tokens (engine tokens/s)."""

    def __init__(self, engine):
        self.engine, self.seconds, self.tokens = engine, 0.0, 0

    def generate(self, prompts, sampling, seeds):
        t0 = time.perf_counter()
        outs = self.engine.generate(prompts, sampling, seeds)
        self.seconds += time.perf_counter() - t0
        self.tokens += sum(len(c.token_ids) for g in outs for c in g)
        return outs

    def reset(self) -> tuple[float, int]:
        out, self.seconds, self.tokens = (self.seconds, self.tokens), 0.0, 0
        return out


@dataclass
class Opened:
    name: str  # what the user named (a path, tiny:, stage:, or the endpoint URL)
    path: str | None  # the resolved local folder (None for an endpoint)
    tokenizer: object
    engine: object | None = None
    model: object | None = None  # a local HF model (log-likelihood tasks, the HF engine)
    engine_name: str = ""
    stop_ids: tuple[int, ...] = ()
    extra: dict = field(default_factory=dict)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine = self.model = None


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_hf_model(path: str, dtype: str):
    from transformers import AutoModelForCausalLM

    from optsys.models.load import DTYPES

    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=DTYPES[dtype])
    return model.to(_device()).eval()


def open_model(cfg: EvalRunConfig, name: str, *, need_generation: bool, need_model: bool,
               resolve=local_source) -> Opened:
    """Tokenizer, and the engine and/or HF model the tasks need. An endpoint needs the served model's tokenizer
    locally (the chat template is rendered here): give --model too, or the endpoint's folder."""
    from optsys.eval.generate import stop_token_ids
    from optsys.models.load import load_tokenizer
    from optsys.rollout.engine import resolve_engine_name

    path = resolve(name, cfg.seed, dtype=cfg.dtype)
    tokenizer = load_tokenizer(path)
    if tokenizer.chat_template is None:
        from optsys.config import ConfigError

        raise ConfigError(f"the tokenizer of {name} has no chat template, so questions cannot be rendered; use a "
                          "model whose tokenizer_config.json carries one")
    opened = Opened(name, path, tokenizer)
    context = _context_length(path, cfg.max_model_len)
    opened.extra["max_model_len"] = context
    model = load_hf_model(path, cfg.dtype) if need_model else None
    if need_generation:
        engine_name = resolve_engine_name(cfg.engine)
        if engine_name == "vllm":
            from optsys.models.load import DTYPES
            from optsys.rollout.vllm_engine import VLLMEngine

            engine = VLLMEngine(path, dtype=DTYPES[cfg.dtype], max_model_len=context, seed=cfg.seed,
                                device=_device())
        else:
            from optsys.rollout.hf_engine import HFEngine

            model = model if model is not None else load_hf_model(path, cfg.dtype)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            engine = HFEngine(model, pad_token_id=pad, greedy_batch=cfg.batch_size)
        engine.show_progress = cfg.progress
        opened.engine, opened.engine_name = engine, engine_name
    opened.model = model
    opened.stop_ids = tuple(stop_token_ids(model if model is not None else _generation_config(path), tokenizer))
    return opened


def open_endpoint(cfg: EvalRunConfig, tokenizer_source: str | None, resolve=local_source) -> Opened:
    """The endpoint engine and a local tokenizer: from --model, else the served model's name when it is one
    (`tiny:` / `stage:` / a folder path: optsys.serve names a tiny/stage model as given), else the folder the
    server says it loaded (GET /v1/models `root`) when this machine has it: a server started here."""
    from optsys.config import ConfigError
    from optsys.eval.endpoint import EndpointEngine
    from optsys.eval.generate import stop_token_ids
    from optsys.models.load import load_tokenizer

    engine = EndpointEngine(cfg.endpoint, model=cfg.endpoint_model, timeout_s=cfg.endpoint_timeout_s,
                            retries=cfg.endpoint_retries, api_key=cfg.api_key)
    source = tokenizer_source or engine.model
    try:
        try:
            path = resolve(source, cfg.seed, dtype=cfg.dtype)
            tokenizer = load_tokenizer(path)
        except (OSError, ValueError):
            folder = None if tokenizer_source else engine.served_folder()
            if folder is None:
                raise
            path, tokenizer = folder, load_tokenizer(folder)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--endpoint {cfg.endpoint}: the prompts are rendered here, so the served model's "
                          f"tokenizer is needed locally and {source!r} is not a loadable folder ({e}); pass "
                          "--model <the served model's folder>") from None
    opened = Opened(cfg.endpoint, None, tokenizer, engine=engine, engine_name="endpoint",
                    stop_ids=tuple(stop_token_ids(_generation_config(path), tokenizer)))
    # the served model's context (GET /v1/models, named model or not); a server that does not say: max_model_len
    opened.extra["max_model_len"] = engine.context_length() or cfg.max_model_len
    return opened


def _context_length(path: str, wanted: int) -> int:
    """max_model_len, capped at the model's own max_position_embeddings (vLLM refuses a longer context)."""
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    limit = json.loads(config.read_text()).get("max_position_embeddings") if config.exists() else None
    if limit and limit < wanted:
        print(f"eval: max_model_len={wanted} is longer than the model's max_position_embeddings={limit}; using {limit}")
        return int(limit)
    return wanted


def _generation_config(path: str):
    """An object with the folder's generation_config (for stop_token_ids) without loading the model."""
    from transformers import GenerationConfig

    try:
        return SimpleNamespace(generation_config=GenerationConfig.from_pretrained(path))
    except OSError:
        return SimpleNamespace(generation_config=None)


def make_scorer(name: str, device, resolve=local_source) -> tuple:
    """A batch scorer [(prompt, completion, answer)] -> [float] from a reward name, and its failure counter.
    A function that raises, returns junk or hangs (60 s) scores NaN for that sample (never chosen by best_of_n,
    never accepted by self_correct) and is counted: one score per sample, always."""
    from optsys.rollout.rewards import build_rewards, score_completions

    fns = build_rewards([name], None, device, resolve=resolve)
    failures = {"count": 0}

    def scorer(samples: list[tuple]) -> list[float]:
        result = score_completions(fns, samples, timeout_s=60.0, on_error="zero")
        values = list(result.per_function[name])
        for i in result.failed.get(name, []):
            values[i] = float("nan")
        failures["count"] += len(result.failed.get(name, []))
        return values

    return scorer, failures


def settings_for(cfg: EvalRunConfig, task: EvalTask, opened: Opened) -> MethodSettings:
    return MethodSettings(n=sorted(set(cfg.n)), temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                          max_new_tokens=cfg.max_new_tokens or task.max_new_tokens, seed=cfg.seed,
                          stop_token_ids=opened.stop_ids, rounds=cfg.rounds, budgets=sorted(set(cfg.budgets)),
                          extend=cfg.extend, answer_tokens=cfg.answer_tokens, think_open=cfg.think_open,
                          think_close=cfg.think_close,
                          max_model_len=opened.extra.get("max_model_len") or cfg.max_model_len)


def summarize(points: list[dict], cfg: EvalRunConfig) -> list[dict]:
    """Curve points with accuracy and its interval (bootstrap by question) and mean tokens per question."""
    out = []
    for p in points:
        acc, lo, hi = accuracy_interval([[v] for v in p["per_question"]], level=cfg.level, resamples=cfg.resamples,
                                        seed=cfg.seed)
        out.append({"x": p["x"], "accuracy": acc, "low": lo, "high": hi,
                    "tokens_per_question": sum(p["tokens"]) / max(1, len(p["tokens"]))})
    return out


def task_match(task: EvalTask, questions: list) -> tuple[str, str]:
    """(match rule, where it came from): the task's own, or for a task that names none, numeric when every
    reference is a number and exact otherwise (printed, and written to results.json)."""
    if task.match is not None:
        return task.match, "task"
    match = default_match([q.answer for q in questions])
    why = "every reference is a number" if match == "numeric" else "not every reference is a number"
    print(f"eval: task {task.name}: match={match} ({why}; set match: in the task entry to choose)")
    return match, f"default: {why}"


def run_generate_task(task: EvalTask, opened: Opened, cfg: EvalRunConfig, scorers: dict,
                      questions: list | None = None) -> dict:
    """Every requested method on one generation task (its questions loaded here unless given): {"methods": {name:
    summary}, "samples": per-question rows, "per_question": {method: [final value per question]}}."""
    if questions is None:
        questions = task.load(cfg.split, cfg.num, cfg.difficulty, cfg.seed)
    if not questions:
        raise ValueError(f"task {task.name} has no questions")
    match, match_source = task_match(task, questions)
    s = settings_for(cfg, task, opened)
    engine = CountingEngine(opened.engine)
    tok = opened.tokenizer
    methods, rows, per_question = {}, {}, {}
    pool = None
    for method in cfg.methods:
        t0 = time.perf_counter()
        if method in POOL_METHODS:
            if pool is None:
                pool = sample_pool(engine, tok, task.name, questions, s, match)
                pool_cost = engine.reset()
            if method == "best_of_n" and pool and pool[0] and pool[0][0].score is None:
                score_pool(pool, questions, scorers["scorer"][0])
            points, finals = pool_curve(method, pool, s.n)
            samples, (gen_s, gen_tokens) = pool, pool_cost
        else:
            fn = {"greedy": greedy, "budget": budget}.get(method)
            if method == "self_correct":
                verifier = scorers.get("verifier", (None,))[0]
                samples, points, finals = self_correct(engine, tok, task.name, questions, s, match, verifier)
            else:
                samples, points, finals = fn(engine, tok, task.name, questions, s, match)
            gen_s, gen_tokens = engine.reset()
        curve = summarize(points, cfg)
        flat = [x for per_q in samples for x in per_q]
        last = curve[-1]
        methods[method] = {
            "accuracy": last["accuracy"], "low": last["low"], "high": last["high"], "x": last["x"],
            "unparsed_rate": sum(x.answer is None for x in flat) / max(1, len(flat)),
            "mean_response_tokens": sum(x.tokens for x in flat) / max(1, len(flat)),
            "tokens_per_question": last["tokens_per_question"],
            "generated_tokens": gen_tokens, "generate_s": gen_s,
            "engine_tokens_per_s": gen_tokens / gen_s if gen_s > 0 else None,
            "seconds": time.perf_counter() - t0, "points": curve,
        }
        per_question[method] = points[-1]["per_question"]
        for q, per_q, final in zip(questions, samples, finals):
            rows.setdefault(q.id, {"task": task.name, "id": q.id, "prompt": q.prompt, "answer": q.answer,
                                   "methods": {}})["methods"][method] = {
                "completions": [x.text for x in per_q], "answers": [x.answer for x in per_q],
                "correct": [x.correct for x in per_q], "tokens": [x.tokens for x in per_q],
                **({"scores": [x.score for x in per_q]} if method == "best_of_n" else {}), "final": final}
    if "best_of_n" in methods:
        methods["best_of_n"]["scorer"] = cfg.scorer
        methods["best_of_n"]["scorer_failures"] = scorers["scorer"][1]["count"]
    if "self_correct" in methods and "verifier" in scorers:
        methods["self_correct"]["verifier"] = cfg.verifier
        methods["self_correct"]["verifier_failures"] = scorers["verifier"][1]["count"]
    return {"kind": "generate", "questions": len(questions), "match": match, "match_source": match_source,
            "methods": methods,
            "samples": list(rows.values()), "per_question": per_question}


def run_choice_task(task: EvalTask, opened: Opened, cfg: EvalRunConfig, items: list | None = None) -> dict:
    from optsys.eval.loglik import multiple_choice_scores

    if items is None:
        items = task.load(cfg.split, cfg.num, cfg.difficulty, cfg.seed)
    t0 = time.perf_counter()
    scores = multiple_choice_scores(opened.model, opened.tokenizer, items, max_tokens=cfg.max_model_len)
    out = {"kind": "choice", "questions": len(items), "methods": {}, "samples": [], "per_question": {}}
    for key, label in (("correct", "loglik"), ("correct_norm", "loglik_norm")):
        values = [float(s[key]) for s in scores]
        acc, lo, hi = accuracy_interval([[v] for v in values], level=cfg.level, resamples=cfg.resamples,
                                        seed=cfg.seed)
        out["methods"][label] = {"accuracy": acc, "low": lo, "high": hi, "seconds": time.perf_counter() - t0}
        out["per_question"][label] = values
    for i, (item, s) in enumerate(zip(items, scores)):
        out["samples"].append({"task": task.name, "id": f"{task.name}-{i}", "choices": list(item.choices),
                               "answer": item.answer, **{k: v for k, v in s.items() if k != "answer"}})
    return out


def run_perplexity_task(task: EvalTask, opened: Opened, cfg: EvalRunConfig, texts: list | None = None) -> dict:
    from optsys.eval.loglik import perplexity

    if texts is None:
        texts = task.load(cfg.split, cfg.num, cfg.difficulty, cfg.seed)
    t0 = time.perf_counter()
    result = perplexity(opened.model, opened.tokenizer, texts, max_tokens=cfg.max_model_len)
    return {"kind": "perplexity", "questions": len(texts), "methods": {"perplexity": {**result,
            "seconds": time.perf_counter() - t0}}, "samples": [], "per_question": {}}


def evaluate(cfg: EvalRunConfig, name: str | None = None, resolve=local_source) -> dict:
    """All tasks of cfg on one model (or the endpoint): {"model", "engine", "tasks": {task: result}}.
    `resolve(source, seed)` turns a model source into a folder (optsys.models.sources.local_source; the eval
    CLI passes optsys.sources.resolve_source, which trains or reuses `stage:` recipes)."""
    tasks = resolve_tasks(cfg.tasks, cfg.task_files)
    # every task's rows read and checked (fields, templates, answer patterns) before any model loads
    loaded = {task.name: task.load(cfg.split, cfg.num, cfg.difficulty, cfg.seed) for task in tasks}
    need_generation = any(t.kind == "generate" for t in tasks)
    need_model = any(t.kind != "generate" for t in tasks)
    scorers = {}
    if cfg.endpoint is not None:
        opened = open_endpoint(cfg, cfg.model, resolve)
    else:
        opened = open_model(cfg, name or cfg.model, need_generation=need_generation, need_model=need_model,
                            resolve=resolve)
    try:
        for key in ("scorer", "verifier"):
            wanted = "best_of_n" if key == "scorer" else "self_correct"
            if getattr(cfg, key) == CONFIDENCE:
                scorers[key] = (CONFIDENCE, {"count": 0})
            elif getattr(cfg, key) and wanted in cfg.methods:
                scorers[key] = make_scorer(getattr(cfg, key), _device(), resolve)
        if opened.engine is not None:  # warm-up (vLLM's first call builds its kernels): not in engine tokens/s
            from optsys.rollout.engine import Sampling

            first = opened.tokenizer("1", add_special_tokens=False).input_ids[:1] or [0]
            shown = getattr(opened.engine, "show_progress", None)
            if shown is not None:
                opened.engine.show_progress = False  # no bar for a 2-token warm-up
            opened.engine.generate([first], Sampling(temperature=0.0, max_new_tokens=2), [0])
            if shown is not None:
                opened.engine.show_progress = shown
        results = {}
        for task in tasks:
            if task.kind == "generate":
                results[task.name] = run_generate_task(task, opened, cfg, scorers, loaded[task.name])
            elif task.kind == "choice":
                results[task.name] = run_choice_task(task, opened, cfg, loaded[task.name])
            else:
                results[task.name] = run_perplexity_task(task, opened, cfg, loaded[task.name])
        return {"model": opened.name, "path": opened.path, "engine": opened.engine_name, "tasks": results}
    finally:
        opened.close()


def compare(cfg: EvalRunConfig, resolve=local_source) -> dict:
    """Two models on the same questions and seeds: each one's results and, per task and method, the paired
    difference A - B with its interval (and McNemar's exact test when each question has one 0/1 score)."""
    a_name, b_name = cfg.compare
    a, b = evaluate(cfg, a_name, resolve), evaluate(cfg, b_name, resolve)
    diffs = {}
    for task, ra in a["tasks"].items():
        rb = b["tasks"][task]
        for method, va in ra["per_question"].items():
            vb = rb["per_question"][method]
            d, lo, hi = paired_interval([[x] for x in va], [[x] for x in vb], level=cfg.level,
                                        resamples=cfg.resamples, seed=cfg.seed)
            entry = {"a": sum(va) / len(va), "b": sum(vb) / len(vb), "difference": d, "low": lo, "high": hi,
                     "questions": len(va)}
            if all(x in (0.0, 1.0) for x in va + vb):
                entry["mcnemar"] = mcnemar([x == 1.0 for x in va], [x == 1.0 for x in vb])
            diffs.setdefault(task, {})[method] = entry
    return {"a": a, "b": b, "differences": diffs}
