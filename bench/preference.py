"""One DPO training step, fused and padding-free (optsys) vs naive and padded (TRL-style), on the same pairs.

    python bench/preference.py [--model small] [--pairs 8] [--steps 3] [--task sorting] [--lengths long-tailed]
                               [--repeats 3] [--threads 2] [--json bench/results/preference.json]

Every step takes the same --pairs preference pairs in both variants, with the same reference log-probs
(a fixed tensor), and runs forward + backward + AdamW:
  fused: what optsys.trainers.preference does. The pairs are packed (chosen_i, rejected_i adjacent) into
         padding-free rows of <= --max-tokens tokens (packed_pair_batches); one forward per row gives hidden
         states [T, H] (packed_hidden, block-diagonal mask), `sequence_logprobs` gives per-sequence log-probs
         through the fused chunked log-prob kernel (no [T, V] logits; only completion positions reach the
         lm_head), then PREFERENCE_LOSSES["dpo"]; gradients accumulate over rows.
  naive: what TRL-style code does. All 2 x pairs sequences are right-padded to the longest ([2B, L] +
         attention_mask), the HF model forward returns full logits [2B, L, V], log_softmax().gather() at the
         targets, masked and summed per sequence, then the same DPO loss.
Both must give the same step-0 loss, per-sequence log-probs and gradient norm, in every repeat (checked against
naive's first; exit 1 if not). Tokens/s counts real (non-pad) tokens in both. Each variant runs `--repeats` times
in a fresh process, interleaved (naive fused naive fused ...; bench/harness.py), threads pinned, so its peak memory
is its own (CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak RSS, VmHWM); the table gives min and
median over repeats. Prints a table; writes --json (default bench/results/preference.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (bench/harness.py)

from optsys.config import ModelConfig  # noqa: E402
from optsys.data.packing import collate_padded  # noqa: E402
from optsys.data.preference import PreferencePair, packed_pair_batches, tokenize_pairs  # noqa: E402
from optsys.data.tasks import TASKS, get_task  # noqa: E402
from optsys.data.tokenize import IGNORE  # noqa: E402
from optsys.losses import PREFERENCE_LOSSES  # noqa: E402
from optsys.models.load import load_model_and_tokenizer, load_tokenizer  # noqa: E402
from optsys.sources import resolve_source  # noqa: E402
from optsys.trainers.common import autocast_context, build_optimizer  # noqa: E402
from optsys.trainers.preference import pair_logps  # noqa: E402

VARIANTS = ("naive", "fused")


def model_name(model: str) -> str:
    return model if "/" in model else f"tiny:{model}"


def build_pairs(args, tokenizer) -> list[PreferencePair]:
    """(steps + 1) x pairs tokenized pairs of a built-in task, in step order.

    lengths=long-tailed draws each pair's difficulty (list length for sorting, digits for arithmetic) from a
    log-normal with median --difficulty, so sequence lengths are long-tailed as in real preference data.
    """
    n = (args.steps + 1) * args.pairs
    task = get_task(args.task)
    if args.lengths == "fixed":
        rows = task.preference_pairs("train", n, difficulty=args.difficulty, seed=args.seed)
    else:
        rng = random.Random(args.seed)
        diffs = [min(args.max_difficulty, max(1, round(rng.lognormvariate(math.log(args.difficulty), args.sigma))))
                 for _ in range(n)]
        by_diff = {d: iter(task.preference_pairs("train", k, difficulty=d, seed=args.seed))
                   for d, k in Counter(diffs).items()}
        rows = [next(by_diff[d]) for d in diffs]
    pairs, report = tokenize_pairs(rows, tokenizer, max_tokens=args.max_tokens, overlong="truncate",
                                   source=f"task:{args.task}")
    if len(pairs) != n:
        raise SystemExit(f"tokenize_pairs kept {len(pairs)} of {n} pairs ({report.skipped}); raise --max-tokens")
    return pairs


def reference_logps(pairs: list[PreferencePair], vocab: int, seed: int) -> torch.Tensor:
    """[N, 2] fixed reference log-probs: uniform-model log-prob of each completion plus N(0, 2^2) noise.

    The reference model is not what is measured (the trainer precomputes it once); a fixed tensor near the
    initial policy's log-probs keeps the DPO loss unsaturated, and not equal to log 2 (which it would be
    if the reference were the initial policy itself, making the loss check meaningless).
    """
    counts = torch.tensor([[p.chosen.num_target_tokens, p.rejected.num_target_tokens] for p in pairs],
                          dtype=torch.float32)
    noise = torch.randn(len(pairs), 2, generator=torch.Generator().manual_seed(seed)) * 2.0
    return -math.log(vocab) * counts + noise


def naive_logps(model, batch: dict, device) -> torch.Tensor:
    """TRL-style per-sequence log-probs: full logits, log_softmax, gather, mask, sum. [2B]."""
    targets = batch["targets"].to(device)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   use_cache=False).logits  # [2B, L, V]
    mask = targets != IGNORE
    labels = torch.where(mask, targets, 0)  # targets are already shifted (optsys.data.tokenize)
    per_token = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(-1)).squeeze(-1)
    return (per_token * mask).sum(-1)


def process_memory_mb(peak: bool) -> float:
    """This process's current or peak RSS in MB (Linux: VmRSS / VmHWM).

    Not getrusage().ru_maxrss: on Linux a child's ru_maxrss starts at its parent's peak RSS (the kernel
    folds the pre-exec address space's high-water mark into it), so a fresh process is not a clean slate.
    """
    key = "VmHWM:" if peak else "VmRSS:"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def run_variant(name: str, args, device: torch.device) -> dict:
    """Child process: warm-up step 0 (also the equality check's data), then args.steps timed steps."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=model_name(args.model)), device)
    model.train()
    pairs = build_pairs(args, tok)
    vocab = model.get_output_embeddings().weight.shape[0]
    ref = reference_logps(pairs, vocab, args.seed)
    dpo = PREFERENCE_LOSSES["dpo"]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    opt = build_optimizer(model, lr=5e-5, weight_decay=0.0, betas=(0.9, 0.95))
    base_mb = (torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda"
               else process_memory_mb(peak=False))

    # Batches are built before timing, as a data loader would hand them over.
    steps = []
    for s in range(args.steps + 1):
        step_pairs = pairs[s * args.pairs:(s + 1) * args.pairs]
        seqs = [ex for p in step_pairs for ex in (p.chosen, p.rejected)]
        real = sum(len(ex.input_ids) for ex in seqs)
        targets = sum(ex.num_target_tokens for ex in seqs)
        if name == "fused":
            rows = packed_pair_batches(step_pairs, args.max_tokens, shuffle_seed=None)
            slots = sum(r.num_tokens for r in rows)
            head_rows = targets  # sequence_logprobs sends only target positions to the lm_head
        else:
            rows = collate_padded(seqs, pad_id)
            slots = rows["input_ids"].numel()
            head_rows = slots  # the HF forward computes logits at every position, pads included
        steps.append({"rows": rows, "ref": ref[s * args.pairs:(s + 1) * args.pairs], "real": real,
                      "slots": slots, "head_rows": head_rows})

    times, losses, check = [], [], {}
    for s, step in enumerate(steps):
        rows, step_ref = step["rows"], step["ref"]
        t0 = time.perf_counter()
        chosen = torch.zeros(args.pairs, device=device)
        rejected = torch.zeros(args.pairs, device=device)
        loss_value = 0.0
        ref_c, ref_r = step_ref[:, 0].to(device), step_ref[:, 1].to(device)
        if name == "fused":
            for row in rows:  # one packed row per forward; the trainer's pair_logps
                idx = torch.tensor(row.pair_index, device=device)
                with autocast_context(args.precision, device):
                    c, r, _ = pair_logps(model, row, average=False, backend=args.backend, device=device)
                c, r = c.float(), r.float()
                loss, _ = dpo(c, r, ref_c[idx], ref_r[idx], beta=args.beta)
                (loss.sum() / args.pairs).backward()  # the step's loss is the mean over its pairs
                loss_value += float(loss.detach().sum()) / args.pairs
                chosen[idx], rejected[idx] = c.detach(), r.detach()
        else:
            with autocast_context(args.precision, device):
                logps = naive_logps(model, rows, device)
            c, r = logps[0::2].float(), logps[1::2].float()
            loss, _ = dpo(c, r, ref_c, ref_r, beta=args.beta)
            loss.mean().backward()
            loss_value = float(loss.detach().mean())
            chosen, rejected = c.detach(), r.detach()
        if s == 0:  # warm-up step: record what the parent compares (same initial weights in both)
            grads = [p.grad.float().norm() for p in model.parameters() if p.grad is not None]
            check = {"loss": loss_value, "chosen_logps": chosen.cpu().tolist(),
                     "rejected_logps": rejected.cpu().tolist(), "grad_norm": float(torch.stack(grads).norm())}
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if s > 0:
            times.append(time.perf_counter() - t0)
        losses.append(loss_value)

    timed = steps[1:]
    real_tokens = sum(x["real"] for x in timed)
    peak_mb = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
               else process_memory_mb(peak=True))
    return {
        "tokens_per_s": real_tokens / sum(times), "s_per_step": sum(times) / len(times),
        "real_tokens_per_step": real_tokens / len(timed),
        "slots_per_step": sum(x["slots"] for x in timed) / len(timed),
        "slot_efficiency": real_tokens / sum(x["slots"] for x in timed),
        "lm_head_rows_per_step": sum(x["head_rows"] for x in timed) / len(timed),
        "forwards_per_step": sum(len(x["rows"]) if name == "fused" else 1 for x in timed) / len(timed),
        "peak_mb": peak_mb, "base_mb": base_mb, "step_losses": losses, "check": check,
        "params": sum(p.numel() for p in model.parameters()), "vocab": vocab,
        "attn_implementation": model.config._attn_implementation, "torch_threads": torch.get_num_threads(),
    }


def compare(runs: dict[str, list[dict]], rtol: float, atol: float) -> list[str]:
    """Step-0 loss, per-sequence log-probs and grad norm of every repeat of every variant vs naive's first
    repeat (same initial weights, same pairs); returns the mismatches."""
    ref = runs["naive"][0]["check"]
    bad = []
    for key in ("loss", "chosen_logps", "rejected_logps", "grad_norm"):
        y = torch.tensor(ref[key], dtype=torch.float64)
        worst = 0.0
        for name, reps in runs.items():
            for i, r in enumerate(reps):
                x = torch.tensor(r["check"][key], dtype=torch.float64)
                worst = max(worst, float(((x - y).abs() / y.abs().clamp(min=1e-12)).max()))
                if not bool(((x - y).abs() <= atol + rtol * y.abs()).all()):
                    bad.append(f"{key}: {name} (repeat {i + 1}) {r['check'][key]} vs naive {ref[key]}")
        print(f"check {key:15} max rel diff {worst:.2e}  (rtol {rtol:g}) {'ok' if not bad else 'MISMATCH'}")
    return bad


LABELS = {"naive": "naive (padded, full logits): the baseline", "fused": "fused (packed, optsys)"}
COLUMNS = [["variant", "variant", ""], ["slot_efficiency", "slot efficiency", ".3f"],
           ["real_tokens_per_step", "real tokens / step", ".0f"],
           ["lm_head_rows_per_step", "lm_head rows / step", ".0f"],
           ["s_per_step_min", "s / step, min", ".2f"], ["s_per_step_median", "s / step, median", ".2f"],
           ["tokens_per_s_median", "real tokens/s (median)", ".0f"], ["speed_vs_naive", "vs naive (median)", ".2f"],
           ["peak_mb", "peak MB", ".0f"], ["mem_vs_naive", "memory vs naive", ".2f"], ["base_mb", "base MB", ".0f"],
           ["loss_step0", "step-0 loss", ".6f"]]


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per variant: s/step min and median over repeats (each a process's mean step), ratios to naive's
    medians, the largest peak memory over repeats."""
    rows = []
    for name, reps in runs.items():
        s = harness.spread([r["s_per_step"] for r in reps])
        tps = harness.spread([r["tokens_per_s"] for r in reps])
        first = reps[0]
        rows.append({"variant": LABELS[name], "key": name, **{k: first[k] for k in (
            "slot_efficiency", "real_tokens_per_step", "lm_head_rows_per_step", "forwards_per_step", "base_mb")},
            "s_per_step": s, "s_per_step_min": s["min"], "s_per_step_median": s["median"], "tokens_per_s": tps,
            "tokens_per_s_median": tps["median"], "peak_mb": max(r["peak_mb"] for r in reps),
            "loss_step0": first["check"]["loss"]})
    naive = next(r for r in rows if r["key"] == "naive")
    for r in rows:
        r["speed_vs_naive"] = r["tokens_per_s_median"] / naive["tokens_per_s_median"]
        r["mem_vs_naive"] = r["peak_mb"] / naive["peak_mb"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="tiny preset (small | small-llama | quickstart) or a HF folder")
    p.add_argument("--pairs", type=int, default=8, help="preference pairs per step (the same in both variants)")
    p.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up step")
    p.add_argument("--task", default="sorting", choices=sorted(TASKS))
    p.add_argument("--difficulty", type=int, default=8, help="list length / digits; the median when long-tailed")
    p.add_argument("--lengths", default="long-tailed", choices=["long-tailed", "fixed"])
    p.add_argument("--sigma", type=float, default=0.8, help="log-normal sigma of the long-tailed difficulty")
    p.add_argument("--max-difficulty", type=int, default=160)
    p.add_argument("--max-tokens", type=int, default=4096, help="packed row size; also the per-pair limit")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="as trainer.precision: auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"], help="fused kernel backend")
    p.add_argument("--rtol", type=float, default=None, help="check tolerance (default 1e-4 fp32, 2e-2 bf16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="processes per variant, interleaved: min and median")
    p.add_argument("--threads", type=int, default=1, help="torch / BLAS threads, pinned in every process")
    p.add_argument("--json", default="bench/results/preference.json")
    p.add_argument("--only", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    if args.only:  # child process: one variant, JSON on the last line of stdout
        harness.apply_threads_in_child()
        print(json.dumps(run_variant(args.only, args, device)))
        return

    load_start, t_start = os.getloadavg(), time.time()
    # Built (and cached) here so the children only load it. The parent stays small; the children's
    # memory is read from VmHWM, which does not inherit the parent's peak anyway.
    path = resolve_source(model_name(args.model))
    pairs = build_pairs(args, load_tokenizer(path))
    lengths = sorted(len(ex.input_ids) for q in pairs for ex in (q.chosen, q.rejected))

    def pct(q: float) -> int:
        return lengths[min(len(lengths) - 1, int(len(lengths) * q))]

    env = harness.pinned_env(args.threads)
    child_args = [x for k, v in vars(args).items() if k not in ("only", "json", "repeats", "threads") and v is not None
                  for x in (f"--{k.replace('_', '-')}", str(v))]

    def run_one(name, rep):
        return harness.run_child([sys.executable, __file__, "--only", name, *child_args], name, env)

    runs = harness.interleaved(list(VARIANTS), args.repeats, run_one)
    fused, naive = runs["fused"][0], runs["naive"][0]
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    rtol = args.rtol if args.rtol is not None else (2e-2 if bf16 else 1e-4)
    print(f"step-0 loss: fused {fused['check']['loss']:.6f}  naive {naive['check']['loss']:.6f}")
    bad = compare(runs, rtol, atol=1e-6)
    rows = summarize(runs)
    seq = {"p50": pct(0.5), "p90": pct(0.9), "max": lengths[-1], "mean": sum(lengths) / len(lengths)}
    doc_path = harness.write_result(
        args.json, script="bench/preference.py", settings=vars(args), threads=args.threads, load_start=load_start,
        t_start=t_start, device=str(device), check_rtol=rtol, sequence_lengths=seq, runs=runs, problems=bad,
        absent={}, tables=[{"title": None, "columns": COLUMNS, "rows": rows}],
        timed=(f"DPO steps 2..{args.steps + 1} of each process, {args.pairs} pairs a step (forward, DPO loss, "
               f"backward, AdamW); model {args.model} ({fused['params'] / 1e6:.1f}M params, vocab {fused['vocab']}, "
               f"attn {fused['attn_implementation']}), {args.precision} precision on {device.type}; task "
               f"{args.task}, {args.lengths} lengths: {len(lengths)} sequences, p50 {seq['p50']}, p90 {seq['p90']}, "
               f"max {seq['max']}, mean {seq['mean']:.0f}"),
        excluded=("process start, model load, tokenizing, packing / padding the batches (a data loader's work), "
                  "the reference log-probs (a fixed tensor), step 1 (warm-up; its loss, log-probs and grad norm are "
                  "the check)"),
        repeats_note=(f"Repeats: {args.repeats} per variant, interleaved, each in its own process, {args.threads} "
                      f"thread(s). Step-0 loss, log-probs and grad norm equal in every repeat (rtol {rtol:g}). Peak "
                      "MB: the largest over repeats (CUDA: max_memory_allocated; CPU: the process's peak RSS); base "
                      "MB: after loading the model."))
    print(harness.markdown_tables(json.loads(Path(doc_path).read_text())))
    print(f"wrote {doc_path}")
    if bad:
        raise SystemExit("fused and naive DPO steps disagree:\n  " + "\n  ".join(bad))


if __name__ == "__main__":
    main()
