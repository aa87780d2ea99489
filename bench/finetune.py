"""Full fine-tuning vs LoRA (vs QLoRA) on the same packed SFT steps: tokens/s and peak memory.

    python bench/finetune.py [--preset small] [--steps 5] [--max-tokens 2048] [--qlora] [--repeats 3] [--threads 2]
                             [--out bench/results/finetune-<device>.json]

Every variant loads the same tiny-factory model (default `small`: ~50M params, vocab 32k), takes the same packed
micro-batches of the built-in sorting task and runs forward + backward + AdamW through the trainer's own loss path
(optsys.models.packed.token_loss_sum). Each variant runs `--repeats` times in its own fresh process, interleaved
(full lora full lora ...; bench/harness.py), threads pinned, so its peak memory is its own
(torch.cuda.max_memory_allocated on CUDA, peak RSS on CPU); the table gives min and median over repeats. LoRA's B
starts at zero, so its step-0 loss must equal full fine-tuning's (checked, exit 1 if not); QLoRA's differs by the
nf4 rounding and is only reported. QLoRA is an absent row, with the reason, when bitsandbytes is not installed.
Prints a table; writes bench/results/finetune-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (bench/harness.py)

from optsys.config import LoraConfig, ModelConfig  # noqa: E402
from optsys.data.packing import packed_batches  # noqa: E402
from optsys.data.tasks import get_task  # noqa: E402
from optsys.data.tokenize import tokenize_rows  # noqa: E402
from optsys.models.load import load_model_and_tokenizer  # noqa: E402
from optsys.models.packed import attach_forward_methods  # noqa: E402
from optsys.trainers.common import build_optimizer  # noqa: E402
from optsys.trainers.run import peak_memory_mb  # noqa: E402

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
    times, tokens, loss0 = [], [], None
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        b = b.to(device)
        loss = model.token_loss_sum(b.targets, input_ids=b.input_ids, position_ids=b.position_ids, seq_lens=b.seq_lens)
        loss = loss / b.num_target_tokens
        loss.backward()
        if i == 0:
            loss0 = float(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # step 0 is warm-up
            times.append(time.perf_counter() - t0)
            tokens.append(b.num_tokens)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"tokens_per_s": sum(tokens) / sum(times), "s_per_step": sum(times) / len(times),
            "peak_mb": peak_memory_mb(device), "trainable_params": trainable, "loss_step0": loss0,
            "torch_threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters())}


LABELS = {"full": "full fine-tuning (the baseline)", "lora": "LoRA r=16, alpha 32 (all projections)",
          "qlora": "QLoRA r=16, nf4 base"}
COLUMNS = [["variant", "variant", ""], ["trainable_params", "trainable params", ",d"],
           ["s_per_step_min", "s / step, min", ".2f"], ["s_per_step_median", "s / step, median", ".2f"],
           ["tokens_per_s_median", "tokens/s (median)", ".0f"], ["speed_vs_full", "speed vs full (median)", ".2f"],
           ["peak_mb", "peak MB", ".0f"], ["mem_vs_full", "memory vs full", ".2f"],
           ["loss_step0", "step-0 loss", ".5f"]]


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per variant: s/step min and median over repeats (each repeat a process's mean step), ratios to
    full fine-tuning's medians, the largest peak memory over repeats."""
    rows = []
    base = None
    for name, reps in runs.items():
        s = harness.spread([r["s_per_step"] for r in reps])
        tps = harness.spread([r["tokens_per_s"] for r in reps])
        row = {"variant": LABELS[name], "key": name, "trainable_params": reps[0]["trainable_params"],
               "params": reps[0]["params"], "s_per_step": s, "s_per_step_min": s["min"],
               "s_per_step_median": s["median"], "tokens_per_s": tps, "tokens_per_s_median": tps["median"],
               "peak_mb": max(r["peak_mb"] for r in reps), "loss_step0": reps[0]["loss_step0"]}
        base = base or row  # full runs first
        row["speed_vs_full"] = base["s_per_step_median"] / row["s_per_step_median"]
        row["mem_vs_full"] = row["peak_mb"] / base["peak_mb"]
        rows.append(row)
    return rows


def check_losses(runs: dict[str, list[dict]], rtol: float = 1e-5) -> list[str]:
    """Full and LoRA (B = 0 at the start) compute the same step-0 loss in every repeat; QLoRA is not checked."""
    ref = runs["full"][0]["loss_step0"]
    bad = []
    for name in ("full", "lora"):
        for i, r in enumerate(runs.get(name, [])):
            if abs(r["loss_step0"] - ref) > rtol * abs(ref):
                bad.append(f"{name} (repeat {i + 1}) step-0 loss {r['loss_step0']:.7f} vs full's {ref:.7f}")
    return bad


def plan(qlora: bool) -> tuple[list[str], dict[str, str]]:
    """The variants to run, and the absent rows with their reasons (QLoRA asked for without bitsandbytes)."""
    why = harness.missing_module("bitsandbytes", "QLoRA") if qlora else None
    return ["full", "lora"] + (["qlora"] if qlora and not why else []), ({LABELS["qlora"]: why} if why else {})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--qlora", action="store_true", help="also QLoRA (slow on CPU: bitsandbytes' fallback)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    if args.only:  # child process: one variant, JSON on the last line
        harness.apply_threads_in_child()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        print(json.dumps(run_variant(args.only, args.preset, args.steps, args.max_tokens, device)))
        return

    load_start, t_start = os.getloadavg(), time.time()
    names, absent = plan(args.qlora)
    env = harness.pinned_env(args.threads)

    def run_one(name, rep):
        cmd = [sys.executable, __file__, "--only", name, "--preset", args.preset, "--steps", str(args.steps),
               "--max-tokens", str(args.max_tokens), "--device", args.device]
        return harness.run_child(cmd, name, env)

    runs = harness.interleaved(names, args.repeats, run_one)
    rows = summarize(runs)
    problems = check_losses(runs)
    out = Path(args.out or f"bench/results/finetune-{device.type}.json")
    doc_path = harness.write_result(
        out, script="bench/finetune.py", settings=vars(args), threads=args.threads, load_start=load_start,
        t_start=t_start, runs=runs, problems=problems, absent=absent,
        tables=[{"title": None, "columns": COLUMNS, "rows": rows}],
        timed=(f"optimizer steps 2..{args.steps + 1} of each process (moving the packed row to the device, forward, "
               f"backward, AdamW), packed rows of <= {args.max_tokens} tokens of the sorting task, "
               f"tiny:{args.preset} ({rows[0]['params'] / 1e6:.1f}M params), device {device.type}"),
        excluded="process start, model load, tokenizing and packing, step 1 (warm-up)",
        repeats_note=(f"Repeats: {args.repeats} per variant, interleaved, each in its own process, {args.threads} "
                      "thread(s); s / step is each process's mean over its timed steps. Peak MB: the largest over "
                      "repeats (CUDA: max_memory_allocated; CPU: the process's peak RSS)."))
    print(harness.markdown_tables(json.loads(doc_path.read_text())))
    print(f"wrote {doc_path}")
    if problems:
        raise SystemExit("full fine-tuning and LoRA disagree at step 0:\n  " + "\n  ".join(problems))


if __name__ == "__main__":
    main()
