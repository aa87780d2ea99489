"""Packed vs padded SFT steps on the same long-tailed data: efficiency, tokens/s, peak memory.

    python bench/packing.py [--preset quickstart] [--rows 600] [--max-tokens 2048] [--steps 6] [--repeats 3]
                            [--threads 2] [--out bench/results/packing-<device>.json]

Both variants train the same model from the same init on the same sequences:
  packed: best-fit-decreasing rows of <= max_tokens, one [1, T] row per micro-batch, block-diagonal mask;
  padded: the usual collator, random order, B sequences per batch padded to the longest, with B chosen so
          that a batch holds as many real tokens on average as a packed row.
Throughput counts real (non-pad) tokens only. Each variant runs `--repeats` times in its own process,
interleaved (padded packed padded packed ...; bench/harness.py), threads pinned, so its peak memory is its own; the
table gives min and median over repeats. No step-0 loss check: the two variants' steps hold different sequences
(a packed row and a padded batch are different sets). Prints a table; writes bench/results/packing-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (bench/harness.py)

from optsys.data.packing import collate_padded, packed_batches, packing_efficiency  # noqa: E402
from optsys.data.tokenize import tokenize_rows  # noqa: E402
from optsys.models.load import load_tokenizer  # noqa: E402
from optsys.models.packed import token_loss_sum  # noqa: E402
from optsys.sources import resolve_source  # noqa: E402
from optsys.trainers.run import peak_memory_mb  # noqa: E402

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
            "real_tokens_per_step": sum(real_tokens) / len(real_tokens), "peak_mb": peak_memory_mb(device),
            "torch_threads": torch.get_num_threads()}


COLUMNS = [["variant", "variant", ""], ["slot_efficiency", "slot efficiency", ".3f"],
           ["real_tokens_per_step", "real tokens / step", ".0f"], ["s_per_step_min", "s / step, min", ".3f"],
           ["s_per_step_median", "s / step, median", ".3f"], ["tokens_per_s_median", "real tokens/s (median)", ".0f"],
           ["speed_vs_padded", "vs padded (median)", ".2f"], ["peak_mb", "peak MB", ".0f"]]
LABELS = {"padded": "padded (the baseline)", "packed": "packed"}


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per variant: min and median over repeats of each process's mean step, tokens/s ratio to padded."""
    rows = []
    for name, reps in runs.items():
        s = harness.spread([r["s_per_step"] for r in reps])
        tps = harness.spread([r["tokens_per_s"] for r in reps])
        rows.append({"variant": LABELS[name], "key": name, "slot_efficiency": reps[0]["slot_efficiency"],
                     "real_tokens_per_step": reps[0]["real_tokens_per_step"], "s_per_step": s,
                     "s_per_step_min": s["min"], "s_per_step_median": s["median"], "tokens_per_s": tps,
                     "tokens_per_s_median": tps["median"], "peak_mb": max(r["peak_mb"] for r in reps)})
    base = next(r for r in rows if r["key"] == "padded")["tokens_per_s_median"]
    for r in rows:
        r["speed_vs_padded"] = r["tokens_per_s_median"] / base
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quickstart", help="tiny-model preset or any HF model path")
    p.add_argument("--rows", type=int, default=600)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--only", choices=["packed", "padded"], help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    if args.only:
        harness.apply_threads_in_child()
    load_start, t_start = os.getloadavg(), time.time()

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
    env = harness.pinned_env(args.threads)

    def run_one(name, rep):
        cmd = [sys.executable, __file__, "--only", name, "--preset", args.preset, "--rows", str(args.rows),
               "--max-tokens", str(args.max_tokens), "--steps", str(args.steps), "--device", args.device]
        return harness.run_child(cmd, name, env)

    runs = harness.interleaved(list(variants), args.repeats, run_one)
    rows = summarize(runs)
    data = {"sequences": len(examples), "p50": lengths[len(lengths) // 2], "p90": lengths[int(len(lengths) * 0.9)],
            "max": lengths[-1], "mean": mean_len, "rows_per_padded_batch": rows_per_batch}
    out = Path(args.out or f"bench/results/packing-{device.type}.json")
    doc_path = harness.write_result(
        out, script="bench/packing.py", settings=vars(args), threads=args.threads, load_start=load_start,
        t_start=t_start, data=data, runs=runs, absent={}, tables=[{"title": None, "columns": COLUMNS, "rows": rows}],
        timed=(f"optimizer steps 2..{args.steps + 1} of each process (forward through `token_loss_sum`, backward, "
               f"AdamW) on {len(examples)} long-tailed sequences (length p50 {data['p50']}, p90 {data['p90']}, max "
               f"{data['max']}, mean {mean_len:.0f}); packed: rows of <= {args.max_tokens} tokens, padded: batches of "
               f"{rows_per_batch}; model {args.preset}, device {device.type}"),
        excluded="process start, model load, tokenizing, packing and collating, step 1 (warm-up)",
        repeats_note=(f"Repeats: {args.repeats} per variant, interleaved, each in its own process, {args.threads} "
                      "thread(s); tokens/s counts real (non-pad) tokens. Peak MB: the largest over repeats (CUDA: "
                      "max_memory_allocated; CPU: the process's peak RSS). No loss check: the variants' steps hold "
                      "different sequences."))
    print(harness.markdown_tables(json.loads(doc_path.read_text())))
    print(f"wrote {doc_path}")


if __name__ == "__main__":
    main()
