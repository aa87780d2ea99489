"""Full fine-tuning vs LoRA (vs QLoRA) on the same packed SFT steps: tokens/s and peak memory.

    python bench/finetune.py [--preset small] [--steps 5] [--max-tokens 2048] [--qlora]

Every variant loads the same tiny-factory model (default `small`: ~50M params, vocab 32k), takes
the same packed micro-batches of the built-in arithmetic task and runs forward + backward + AdamW
through the trainer's own loss path (optsys.models.packed.token_loss_sum). Each variant runs in a
fresh process so its peak memory is its own (torch.cuda.max_memory_allocated on CUDA, peak RSS on
CPU). Prints a table; writes bench/results/finetune-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from optsys.config import LoraConfig, ModelConfig
from optsys.data.packing import packed_batches
from optsys.data.tasks import get_task
from optsys.data.tokenize import tokenize_rows
from optsys.models.load import load_model_and_tokenizer
from optsys.models.packed import attach_forward_methods
from optsys.trainers.common import build_optimizer
from optsys.trainers.run import peak_memory_mb

VARIANTS = {
    "full": LoraConfig(),
    "lora": LoraConfig(r=16, alpha=32),
    "qlora": LoraConfig(r=16, alpha=32, quantize="nf4"),
}


def run_variant(name: str, preset: str, steps: int, max_tokens: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(name_or_path=f"tiny:{preset}", lora=VARIANTS[name])
    model, tok = load_model_and_tokenizer(cfg, device)
    attach_forward_methods(model).train()
    rows = get_task("sorting").sft_rows("train", 4000, difficulty=8)
    examples, _ = tokenize_rows(rows, tok, max_tokens=max_tokens)
    batches = packed_batches(examples, max_tokens, shuffle_seed=0)[: steps + 1]
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.95))
    times, tokens = [], []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        b = b.to(device)
        loss = model.token_loss_sum(b.targets, input_ids=b.input_ids, position_ids=b.position_ids, seq_lens=b.seq_lens)
        (loss / b.num_target_tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # step 0 is warm-up
            times.append(time.perf_counter() - t0)
            tokens.append(b.num_tokens)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"tokens_per_s": sum(tokens) / sum(times), "s_per_step": sum(times) / len(times),
            "peak_mb": peak_memory_mb(device), "trainable_params": trainable,
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--qlora", action="store_true", help="also QLoRA (slow on CPU: bitsandbytes' fallback)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    if args.only:  # child process: one variant, JSON on the last line
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        print(json.dumps(run_variant(args.only, args.preset, args.steps, args.max_tokens, device)))
        return

    names = ["full", "lora"] + (["qlora"] if args.qlora else [])
    results = {}
    for name in names:
        cmd = [sys.executable, __file__, "--only", name, "--preset", args.preset, "--steps", str(args.steps),
               "--max-tokens", str(args.max_tokens), "--device", args.device]
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = results["full"]
    print(f"model tiny:{args.preset}, {base['params'] / 1e6:.1f}M params; packed rows of {args.max_tokens} tokens; "
          f"{args.steps} timed steps; device {device}")
    print(f"{'variant':8} {'trainable':>11} {'tokens/s':>9} {'vs full':>8} {'peak MB':>8} {'vs full':>8}")
    for name, r in results.items():
        speed, mem = r["tokens_per_s"] / base["tokens_per_s"], r["peak_mb"] / base["peak_mb"]
        print(f"{name:8} {r['trainable_params']:11,d} {r['tokens_per_s']:9.0f} {speed:8.2f} "
              f"{r['peak_mb']:8.0f} {mem:8.2f}")
    out = Path(args.out or f"bench/results/finetune-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
