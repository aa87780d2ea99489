"""Eval throughput: vLLM in process vs Hugging Face generate, same model, same prompts, same methods, one run.

    python bench/eval.py [--model stage:grpo_sft] [--task arithmetic_reversed] [--num 200] [--n 8]
                         [--max-new-tokens 16] [--out bench/results/eval-cpu.json]

Runs optsys.eval.scaling's greedy (HF batched, --batch prompts per call) and a sample pool of --n per question
(HF: one call per question, seeded, as the eval does) on each engine, after a warm-up call, and reports generated
tokens/s, wall seconds, accuracy, and how many greedy answers agree between the engines (fp32 greedy should
agree nearly everywhere; sampled pools differ by RNG, so only their accuracy is compared). Ratio = vLLM / HF.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def run_engine(engine, tok, task, questions, settings, match: str) -> dict:
    from optsys.eval.scaling import greedy, pool_curve, sample_pool

    greedy(engine, tok, task.name, questions[:2], settings, match)  # warm-up
    out = {}
    t0 = time.perf_counter()
    samples, points, _ = greedy(engine, tok, task.name, questions, settings, match)
    seconds = time.perf_counter() - t0
    tokens = sum(x[0].tokens for x in samples)
    out["greedy"] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                     "accuracy": sum(points[0]["per_question"]) / len(questions),
                     "answers": [x[0].answer for x in samples]}
    t0 = time.perf_counter()
    pool = sample_pool(engine, tok, task.name, questions, settings, match)
    seconds = time.perf_counter() - t0
    tokens = sum(x.tokens for p in pool for x in p)
    points, _ = pool_curve("self_consistency", pool, [max(settings.n)])
    out["sample_pool"] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                          "mean_sample_accuracy": sum(x.correct for p in pool for x in p) / sum(len(p) for p in pool),
                          "maj_at_n": sum(points[0]["per_question"]) / len(questions)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="stage:grpo_sft")
    p.add_argument("--task", default="arithmetic_reversed")
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch", type=int, default=64, help="HF greedy prompts per generate call")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import torch

    from optsys.eval.generate import stop_token_ids
    from optsys.eval.run import load_hf_model
    from optsys.eval.scaling import MethodSettings
    from optsys.eval.tasks import resolve_tasks
    from optsys.models.load import load_tokenizer
    from optsys.rollout.hf_engine import HFEngine
    from optsys.rollout.vllm_engine import VLLMEngine
    from optsys.sources import resolve_source

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    path = resolve_source(args.model)
    tok = load_tokenizer(path)
    (task,) = resolve_tasks([args.task])
    questions = task.load("test", args.num, 2, 0)
    model = load_hf_model(path, "float32")
    settings = MethodSettings(n=[args.n], temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                              stop_token_ids=tuple(stop_token_ids(model, tok)))
    results = {}
    engine = VLLMEngine(path, dtype=torch.float32, max_model_len=512, seed=0, device=torch.device("cpu"))
    results["vllm"] = run_engine(engine, tok, task, questions, settings, task.match)
    engine.close()
    hf = HFEngine(model, pad_token_id=tok.pad_token_id, greedy_batch=args.batch)
    results["hf"] = run_engine(hf, tok, task, questions, settings, task.match)
    answers = [results[name]["greedy"].pop("answers") for name in ("vllm", "hf")]
    agree = sum(a == b for a, b in zip(*answers))

    print(f"\n{args.model} ({path}), {args.num} {args.task} questions, pool n={args.n}, T={args.temperature}, "
          f"threads={torch.get_num_threads()}")
    print("| method | engine | seconds | tokens | tokens/s | accuracy (greedy) / maj@n (pool) | tokens/s vs HF |")
    print("|---|---|---|---|---|---|---|")
    for method, acc_key in (("greedy", "accuracy"), ("sample_pool", "maj_at_n")):
        base = results["hf"][method]["tokens_per_s"]
        for name in ("vllm", "hf"):
            r = results[name][method]
            print(f"| {method} | {name} | {r['seconds']:.2f} | {r['tokens']} | {r['tokens_per_s']:.0f} | "
                  f"{r[acc_key]:.3f} | {r['tokens_per_s'] / base:.2f}x |")
    print(f"greedy answers equal on the two engines: {agree}/{args.num}")
    payload = {"args": vars(args), "results": results, "greedy_agreement": agree / args.num,
               "date": time.strftime("%Y-%m-%d"), "device": "cpu"}
    out = Path(args.out or Path(__file__).parent / "results" / "eval-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
