"""Packed vs padded SFT steps on the same long-tailed data: efficiency, tokens/s, peak memory.

    python bench/packing.py [--preset quickstart] [--rows 600] [--max-tokens 2048] [--steps 6]

Both variants train the same model from the same init on the same sequences:
  packed: best-fit-decreasing rows of <= max_tokens, one [1, T] row per micro-batch, block-diagonal mask;
  padded: the usual collator, random order, B sequences per batch padded to the longest, with B chosen so
          that a batch holds as many real tokens on average as a packed row.
Throughput counts real (non-pad) tokens only. Prints a table; writes bench/results/packing-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from optsys.data.packing import collate_padded, packed_batches, packing_efficiency
from optsys.data.tokenize import tokenize_rows
from optsys.models.load import load_tokenizer
from optsys.models.packed import token_loss_sum
from optsys.sources import resolve_source
from optsys.trainers.run import peak_memory_mb

WORDS = ("the model learns to add sort reverse count numbers tokens answer question step check list value "
         "first second third large small packed padded sequence attention mask").split()


def long_tailed_rows(n: int, seed: int, max_words: int) -> list[dict]:
    """Text rows whose lengths follow a log-normal: many short, a few long (like chat SFT data)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = int(min(max_words, max(4, rng.lognormvariate(4.0, 0.9))))
        rows.append({"text": " ".join(rng.choice(WORDS) for _ in range(k))})
    return rows


def run_variant(name, model_path, batches, device, steps):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa").to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times, real_tokens = [], []
    for i, batch in enumerate(batches[: steps + 1]):
        t0 = time.perf_counter()
        if name == "packed":
            kw = {"position_ids": batch.position_ids.to(device), "seq_lens": batch.seq_lens}
            input_ids, targets, real = batch.input_ids, batch.targets, batch.num_tokens
        else:
            kw = {"attention_mask": batch["attention_mask"].to(device)}
            input_ids, targets, real = batch["input_ids"], batch["targets"], int(batch["attention_mask"].sum())
        n = int((targets != -100).sum())
        loss = token_loss_sum(model, targets.to(device), input_ids=input_ids.to(device), **kw) / max(1, n)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # step 0 is warm-up
            times.append(time.perf_counter() - t0)
            real_tokens.append(real)
    return {"tokens_per_s": sum(real_tokens) / sum(times), "s_per_step": sum(times) / len(times),
            "real_tokens_per_step": sum(real_tokens) / len(real_tokens), "peak_mb": peak_memory_mb(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quickstart", help="tiny-model preset or any HF model path")
    p.add_argument("--rows", type=int, default=600)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--only", choices=["packed", "padded"], help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)

    model_path = resolve_source(args.preset if "/" in args.preset else f"tiny:{args.preset}")
    tok = load_tokenizer(model_path)
    examples, _ = tokenize_rows(long_tailed_rows(args.rows, 0, max_words=args.max_tokens // 3), tok,
                                max_tokens=args.max_tokens, overlong="truncate", source="bench:long-tailed")
    packed = packed_batches(examples, args.max_tokens, shuffle_seed=0)
    mean_len = sum(len(e.input_ids) for e in examples) / len(examples)
    rows_per_batch = max(1, round(args.max_tokens / mean_len))
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    padded = [collate_padded([examples[j] for j in order[i : i + rows_per_batch]], tok.pad_token_id)
              for i in range(0, len(order), rows_per_batch)]
    padded_eff = (sum(int(b["attention_mask"].sum()) for b in padded)
                  / sum(b["attention_mask"].numel() for b in padded))
    lengths = sorted(len(e.input_ids) for e in examples)

    variants = {"padded": (padded, padded_eff), "packed": (packed, packing_efficiency(packed, args.max_tokens))}
    if args.only:  # child process: one variant, JSON on the last line of stdout
        batches, eff = variants[args.only]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = run_variant(args.only, model_path, batches, device, args.steps)
        print(json.dumps({**result, "slot_efficiency": eff}))
        return
    # Each variant runs in its own process so that peak memory (RSS on CPU) is its own.
    results = {}
    for name in variants:
        cmd = [sys.executable, __file__, "--only", name, "--preset", args.preset, "--rows", str(args.rows),
               "--max-tokens", str(args.max_tokens), "--steps", str(args.steps), "--device", args.device]
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = results["packed"]["tokens_per_s"] / results["padded"]["tokens_per_s"]

    print(f"data: {len(examples)} sequences, length p50={lengths[len(lengths) // 2]} "
          f"p90={lengths[int(len(lengths) * 0.9)]} max={lengths[-1]} mean={mean_len:.0f}; "
          f"padded batches of {rows_per_batch} rows; model {args.preset}; device {device}")
    print(f"{'variant':8} {'slot eff':>9} {'real tok/step':>14} {'s/step':>8} {'real tok/s':>11} {'peak MB':>9}")
    for name, r in results.items():
        print(f"{name:8} {r['slot_efficiency']:9.3f} {r['real_tokens_per_step']:14.0f} {r['s_per_step']:8.3f} "
              f"{r['tokens_per_s']:11.0f} {r['peak_mb']:9.0f}")
    print(f"packed / padded tokens/s: {ratio:.2f}x")
    print("(peak MB: torch.cuda.max_memory_allocated on CUDA; the variant process's peak RSS on CPU)")

    out = Path(args.out or f"bench/results/packing-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows_per_padded_batch": rows_per_batch, "results": results,
                               "packed_over_padded_tokens_per_s": ratio}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
