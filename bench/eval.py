"""Eval generation: vLLM in process vs Hugging Face generate, engine against engine at the same batching.

    python bench/eval.py [--model stage:grpo_sft] [--task arithmetic_reversed] [--num 200] [--n 8]
                         [--max-new-tokens 16] [--temperature 1.0] [--batch-seqs 256] [--repeats 3] [--threads 1]
                         [--skip hf-per-question,...] [--out bench/results/eval.json]

Three variants, each run `--repeats` times in its own process, interleaved (bench/harness.py), threads pinned:
  vllm             VLLMEngine: every request in one call; its scheduler runs up to max_num_seqs sequences at once
                   (256 on CPU, read from the engine and recorded).
  hf-batched       HF generate at the same batch: greedy `--batch-seqs` prompts per call, the sample pool
                   `--batch-seqs // n` prompts x n samples per call (one seed per call). The engine baseline.
  hf-per-question  optsys.eval's HFEngine as `--engine hf` runs it: greedy batched at `--eval-batch` prompts, the
                   pool one seeded call per question, so a question's samples depend on its seed alone (2 ranks draw
                   what 1 process draws). A batching policy, not an engine: its row says so.
Each child runs optsys.eval.scaling's greedy and a sample pool of `--n` per question over the same prompts, after a
warm-up call. Reported: generated tokens/s (min and median over repeats), the ratio to hf-batched, accuracy /
maj@n, and how many greedy answers equal vLLM's (fp32 greedy should agree nearly everywhere; pools differ by RNG).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (bench/harness.py)

VARIANTS = ("vllm", "hf-batched", "hf-per-question")
LABELS = {"vllm": "vLLM (all requests in one call)",
          "hf-batched": "HF generate, batched as vLLM (the engine baseline)",
          "hf-per-question": "HF, optsys.eval's policy: pool one call per question"}
METHODS = ("greedy", "sample_pool")


def batched_hf_engine(model, pad_token_id: int, prompts_per_call: int, greedy_batch: int):
    """HFEngine whose sample pool batches `prompts_per_call` prompts per generate call under one seed per call
    (the eval's engine seeds every prompt alone instead). Greedy draws nothing, so it batches as the eval's."""
    import torch

    from optsys.rollout.hf_engine import HFEngine

    class BatchedSamplingHF(HFEngine):
        @torch.no_grad()
        def generate(self, prompts, sampling, seeds):
            if sampling.temperature == 0:
                return super().generate(prompts, sampling, seeds)
            self.model.eval()
            device = next(self.model.parameters()).device
            torch.manual_seed(seeds[0])
            out = []
            for start in range(0, len(prompts), prompts_per_call):
                out += self._generate_chunk(prompts[start:start + prompts_per_call], sampling, device)
            return out

    return BatchedSamplingHF(model, pad_token_id=pad_token_id, greedy_batch=greedy_batch)


def timed_methods(engine, tok, task, questions, settings) -> dict:
    from optsys.eval.scaling import greedy, pool_curve, sample_pool

    greedy(engine, tok, task.name, questions[:2], settings, task.match)  # warm-ups (not timed)
    sample_pool(engine, tok, task.name, questions[:2], settings, task.match)
    t0 = time.perf_counter()
    samples, points, _ = greedy(engine, tok, task.name, questions, settings, task.match)
    seconds = time.perf_counter() - t0
    tokens = sum(x[0].tokens for x in samples)
    out = {"greedy": {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                      "accuracy": sum(points[0]["per_question"]) / len(questions),
                      "answers": [x[0].answer for x in samples]}}
    t0 = time.perf_counter()
    pool = sample_pool(engine, tok, task.name, questions, settings, task.match)
    seconds = time.perf_counter() - t0
    tokens = sum(x.tokens for p in pool for x in p)
    points, _ = pool_curve("self_consistency", pool, [max(settings.n)])
    out["sample_pool"] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                          "accuracy": sum(points[0]["per_question"]) / len(questions)}  # maj@n
    return out


def child(variant: str, args) -> dict:
    """One variant in this process: load, warm up, time greedy and the pool."""
    harness.apply_threads_in_child()
    import torch

    from optsys.eval.generate import stop_token_ids
    from optsys.eval.run import load_hf_model
    from optsys.eval.scaling import MethodSettings
    from optsys.eval.tasks import resolve_tasks
    from optsys.models.load import load_tokenizer
    from optsys.rollout.hf_engine import HFEngine
    from optsys.sources import resolve_source

    path = resolve_source(args.model)
    tok = load_tokenizer(path)
    (task,) = resolve_tasks([args.task])
    questions = task.load("test", args.num, 2, 0)
    model = load_hf_model(path, "float32")
    settings = MethodSettings(n=[args.n], temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                              stop_token_ids=tuple(stop_token_ids(model, tok)))
    info = {}
    if variant == "vllm":
        from optsys.rollout.vllm_engine import VLLMEngine

        del model
        engine = VLLMEngine(path, dtype=torch.float32, max_model_len=512, seed=0, device=torch.device("cpu"))
        info["max_num_seqs"] = int(engine.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)
    elif variant == "hf-batched":
        engine = batched_hf_engine(model, tok.pad_token_id, max(1, args.batch_seqs // args.n), args.batch_seqs)
    else:
        engine = HFEngine(model, pad_token_id=tok.pad_token_id, greedy_batch=args.eval_batch)
    result = timed_methods(engine, tok, task, questions, settings)
    engine.close()
    return {**result, **info, "torch_threads": torch.get_num_threads()}


def summarize(runs: dict[str, list[dict]], args) -> list[dict]:
    """One row per (method, variant): spreads over repeats, the ratio to hf-batched, agreement with vLLM."""
    rows = []
    vllm_answers = runs["vllm"][0]["greedy"]["answers"] if "vllm" in runs else None
    for method in METHODS:
        base = runs.get("hf-batched")
        base_med = harness.spread([r[method]["tokens_per_s"] for r in base])["median"] if base else None
        for name, reps in runs.items():
            tps = harness.spread([r[method]["tokens_per_s"] for r in reps])
            row = {"method": "greedy" if method == "greedy" else f"sample pool n={args.n}", "variant": LABELS[name],
                   "key": name, "tokens": reps[0][method]["tokens"],
                   "seconds": harness.spread([r[method]["seconds"] for r in reps]),
                   "tokens_per_s": tps, "tokens_per_s_min": tps["min"], "tokens_per_s_median": tps["median"],
                   "vs_hf_batched_median": tps["median"] / base_med if base_med else None,
                   "accuracy": reps[0][method]["accuracy"]}
            if method == "greedy" and vllm_answers is not None:
                answers = [r["greedy"]["answers"] for r in reps]
                row["greedy_equal_to_vllm"] = sum(a == b for a, b in zip(answers[0], vllm_answers))
                row["same_answers_every_repeat"] = all(a == answers[0] for a in answers)
            rows.append(row)
    return rows


COLUMNS = [["method", "method", ""], ["variant", "variant", ""], ["tokens", "tokens generated", "d"],
           ["tokens_per_s_min", "tokens/s, min", ".0f"], ["tokens_per_s_median", "tokens/s, median", ".0f"],
           ["vs_hf_batched_median", "vs HF batched (median)", ".2f"],
           ["accuracy", "accuracy (greedy) / maj@n (pool)", ".3f"],
           ["greedy_equal_to_vllm", "greedy answers equal to vLLM's", "d"]]


def plan(skip: set[str]) -> tuple[list[str], dict[str, str]]:
    """The variants to run, and the absent rows with their reasons (vLLM not installed: the HF rows still run)."""
    absent = {}
    why = harness.missing_module("vllm", "vLLM row")
    if why and "vllm" not in skip:
        absent[LABELS["vllm"]] = why
    return [v for v in VARIANTS if v not in skip and not (v == "vllm" and why)], absent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="stage:grpo_sft")
    p.add_argument("--task", default="arithmetic_reversed")
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-seqs", type=int, default=256,
                   help="hf-batched: sequences per generate call (vLLM's max_num_seqs on CPU: 256)")
    p.add_argument("--eval-batch", type=int, default=100, help="hf-per-question: greedy prompts per call "
                   "(optsys.eval's eval.batch_size default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", default="", help=f"comma-separated variants to leave out, of {VARIANTS}")
    p.add_argument("--out", default="bench/results/eval.json")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(VARIANTS):
        p.error(f"--skip: unknown variants {sorted(skip - set(VARIANTS))}; choose from {VARIANTS}")
    load_start, t_start = os.getloadavg(), time.time()
    names, absent = plan(skip)
    env = harness.pinned_env(args.threads)
    child_args = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "skip", "out")]

    def run_one(name, rep):
        return harness.run_child([sys.executable, __file__, "--child", name, *child_args], name, env)

    runs = harness.interleaved(names, args.repeats, run_one)
    rows = summarize(runs, args)
    seqs = {r.get("max_num_seqs") for r in runs.get("vllm", [])} - {None}
    doc_tables = [{"title": None, "columns": COLUMNS, "rows": rows}]
    timed = ("one greedy call over every question, then one sample-pool call (n samples per question), after a "
             "warm-up of each on 2 questions; tokens/s = generated tokens / wall seconds of the call")
    excluded = ("process start, model load, vLLM's engine start (inside the timed call, on both sides: rendering "
                "the prompts and scoring the answers)")
    repeats_note = (f"Repeats: {args.repeats} per variant, interleaved, each in its own process, {args.threads} "
                    f"thread(s). vLLM's scheduler ran up to {', '.join(map(str, sorted(seqs))) or '?'} sequences at "
                    f"once; hf-batched used {args.batch_seqs} (sample pool: {max(1, args.batch_seqs // args.n)} "
                    f"prompts x {args.n}). The hf-per-question pool row is optsys.eval's seeding policy (one call per "
                    "question), not the engine.")
    out = harness.write_result(args.out, script="bench/eval.py", settings=vars(args), threads=args.threads,
                               load_start=load_start, t_start=t_start, runs=runs, tables=doc_tables, absent=absent,
                               timed=timed, excluded=excluded, repeats_note=repeats_note)
    print(harness.markdown_tables(json.loads(out.read_text())))
    print(f"wrote {out}")
    if seqs and seqs != {args.batch_seqs}:
        print(f"note: vLLM ran up to {seqs} sequences at once, hf-batched {args.batch_seqs}: "
              "pass --batch-seqs to match")


if __name__ == "__main__":
    main()
