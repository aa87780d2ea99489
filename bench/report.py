"""Regenerate the benchmark tables in bench/README.md and README.md from the JSON the scripts wrote.

    python bench/report.py [--sections e2e,eval,...] [--e2e bench/results/e2e.json] [--json NAME=PATH ...]
                           [--other-machine] [--check]

A number in a table cannot drift from its run: the tables between `<!-- report:NAME -->` and `<!-- /report:NAME -->`
in bench/README.md, and the README row that ends in `<!-- report:NAME -->`, are written by this script only, one
block per bench (SECTIONS: NAME, the script that writes its JSON, the JSON's default path). Without --sections,
the sections given a JSON by --e2e / --json are written, or else every section whose JSON is here. A JSON from another
machine (its `machine.id` differs from this one's: another processor, core count or host) is refused unless
--other-machine is given, and then the table says where it was measured. A JSON whose script recorded a failed
check (`problems`) is refused. A section whose default JSON is not here is left as it is (and said); one named by
--sections, --e2e or --json must exist. A block measured under load (load average at start or end above half the
cores) says so. --check exits 1 if a table differs from what the JSON gives (for CI or a pre-commit hook).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LABELS = {
    "optsys": "**optsys** (defaults: `attn_implementation=auto`)",
    "optsys-varlen": "optsys, opt-in `sdpa_varlen`",
    "optsys-gc": "optsys, gradient checkpointing",
    "trl-default": "TRL defaults (gradient checkpointing on)",
    "trl-best": "TRL best (gradient checkpointing off): the baseline",
    "trl-best-gc": "TRL best, gradient checkpointing on",
    "trl-cb": "TRL, continuous batching",
    "optsys-adapter": "optsys, `rl.lora_sync=adapter` (vLLM's LoRA path)",
    "optsys-floor": "optsys's floor: its generation + one packed forward and backward of the same tokens",
}
SECTION_NAMES = {"sft": "SFT", "dpo": "DPO", "grpo": "GRPO"}
# NAME: (the script whose JSON fills `<!-- report:NAME -->`, its default JSON under bench/results/)
SECTIONS = {
    "e2e": ("bench/e2e.py", "e2e.json"),
    "kernels": ("bench/kernels.py", "kernels-cpu.json"),
    "eval": ("bench/eval.py", "eval.json"),
    "finetune": ("bench/finetune.py", "finetune-cpu.json"),
    "preference": ("bench/preference.py", "preference.json"),
    "lora_sync": ("bench/lora_sync.py", "lora_sync-cpu.json"),
    "packing": ("bench/packing.py", "packing-cpu.json"),
    "packing_csrc": ("bench/packing_csrc.py", "packing_csrc.json"),
    # bench/e2e.py --model smollm2-135m-instruct --out bench/results/e2e_smollm2.json: the real model's e2e block
    "e2e-smollm2": ("bench/e2e.py", "e2e_smollm2.json"),
    # the same with --lora 0 (full fine-tuning) --out bench/results/e2e_smollm2_full.json
    "e2e-smollm2-full": ("bench/e2e.py", "e2e_smollm2_full.json"),
    "generation": ("bench/generation.py", "generation.json"),
}


class ReportError(SystemExit):
    pass


def provenance(doc: dict, here: dict, other_machine: bool, path: Path) -> str:
    m = doc["machine"]
    where = f"{m['processor'] or 'unknown CPU'}, {m['cores']} cores, {m['threads']} threads" + (
        f", {m['cuda']}" if m.get("cuda") else ", no GPU")
    if m["id"] != here["id"]:
        if not other_machine:
            raise ReportError(f"{path} was measured on another machine ({where}, host {m['host']}); this one is "
                              f"{here['processor']}, {here['cores']} cores, host {here['host']}. Re-run the script "
                              "here, or pass --other-machine to publish it labelled as such.")
        where = f"**another machine**: {where}, host {m['host']}"
    load = doc["load_average"]
    return (f"{doc['date']}, {where}; load average {load['start'][0]:.2f} at start, {load['end'][0]:.2f} at end; "
            f"{doc['wall_s'] / 60:.0f} min. `{doc['command']}`")


def e2e_table(doc: dict, source: str) -> str:
    lines = [source, "",
             "| section | variant | tokens / step | s / step, min | s / step, median | tokens/s (median) "
             "| speed vs TRL best (median) | (min) | over floor (MB) | memory vs optsys | step-1 loss |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    f = lambda x, spec: format(x, spec) if x is not None else "-"  # noqa: E731
    for r in doc["table"]:
        lines.append(
            f"| {SECTION_NAMES[r['section']]} | {LABELS.get(r['variant'], r['variant'])} | {r['tokens_per_step']:.0f} "
            f"| {r['s_per_step_min']:.2f} | {r['s_per_step_median']:.2f} | {r['tokens_per_s_median']:.0f} "
            f"| {f(r['speed_vs_baseline_median'], '.2f')}x | {f(r['speed_vs_baseline_min'], '.2f')}x "
            f"| {r['peak_over_floor_mb']:.0f} | {f(r['mem_vs_optsys'], '.2f')} | {f(r['loss_step1'], '.5f')} |")
        if r["section"] == "grpo":
            lines.append(f"| GRPO, generation excluded | {LABELS.get(r['variant'], r['variant'])} | | | "
                         f"{r['s_per_step_no_gen_median']:.2f} | | "
                         f"{f(r['speed_vs_baseline_no_gen_median'], '.2f')}x | | | | |")
    for name, why in doc.get("absent", {}).items():
        lines.append(f"| {SECTION_NAMES.get(name.split(':')[0], name)} | {name.split(':')[1]}: absent | {why} "
                     "| | | | | | | | |")
    lines += floor_lines(doc["table"])
    reps = {r["repeats"] for r in doc["table"]}
    lines += ["", f"Repeats per variant: {', '.join(map(str, sorted(reps)))}, interleaved, each in its own process; "
              "timed: optimizer steps 2.. of each process; excluded: process start, model load, data preparation, "
              "the reference precompute. Speed = TRL-best's s/step over the row's (> 1: the row is faster)."]
    return "\n".join(lines)


def floor_lines(table: list[dict]) -> list[str]:
    """GRPO: each row's step over optsys's floor, measured in the same run (absent without a floor row)."""
    rows = [r for r in table if r["section"] == "grpo" and r["variant"] != "optsys-floor"
            and r.get("over_floor_median") is not None]
    if not rows:
        return []
    parts = [f"{LABELS.get(r['variant'], r['variant'])} {r['over_floor_median']:.2f}x (min {r['over_floor_min']:.2f}x)"
             for r in rows]
    return ["", "GRPO step over optsys's floor (generation + one packed forward and backward of the same tokens, "
            "the least a step must do; median of repeats): " + "; ".join(parts) + "."]


E2E_JOBS = {  # README row's first cell, per e2e section
    "e2e": "one SFT / DPO / GRPO step vs TRL 1.16 at its best settings here (gradient checkpointing off on both "
           "sides; packing + padding-free; precomputed reference; HF generate), optsys at its defaults, same ids, "
           "step-1 loss and grad norm equal",
    "e2e-smollm2": "the same on the real model, SmolLM2-135M-Instruct (134.5M, LoRA on both sides; GRPO on word "
                   "problems from the model itself, so completion lengths vary)",
    "e2e-smollm2-full": "the same real model, full fine-tuning on both sides",
}


def e2e_headline(doc: dict, name: str = "e2e") -> str:
    """The README results table's row: optsys at its defaults against TRL's best, medians over repeats."""
    rows = {(r["section"], r["variant"]): r for r in doc["table"]}
    parts = []
    for sec in ("sft", "dpo", "grpo"):
        r = rows.get((sec, "optsys"))
        if r and r["speed_vs_baseline_median"] is not None:
            floor = f" ({r['over_floor_median']:.2f}x its floor)" if r.get("over_floor_median") is not None else ""
            parts.append(f"{SECTION_NAMES[sec]} {r['speed_vs_baseline_median']:.2f}x{floor}")
    extra = [f"{SECTION_NAMES[s]} {r['speed_vs_baseline_median']:.2f}x" for (s, v), r in rows.items()
             if v == "optsys-varlen" and r["speed_vs_baseline_median"] is not None]
    reps = min(r["repeats"] for r in doc["table"])
    claims = ", ".join(parts) + f" TRL-best's speed (median of {reps} interleaved repeats)"
    if extra:
        claims += f"; with the opt-in `sdpa_varlen`: {', '.join(extra)}"
    m, load = doc["machine"], doc["load_average"]
    return (f"| {E2E_JOBS[name]} | `{doc['command']}` | {claims} | {doc['wall_s'] / 60:.0f} min "
            f"({doc['date']}) | {m['cores']}-core CPU, {m['threads']} threads, load {load['start'][0]:.1f} |")


def replace_block(text: str, name: str, body: str, path: Path) -> str:
    pattern = re.compile(rf"(<!-- report:{name} -->\n).*?(\n<!-- /report:{name} -->)", re.S)
    if not pattern.search(text):
        raise ReportError(f"{path}: no `<!-- report:{name} -->` ... `<!-- /report:{name} -->` block to fill")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def replace_row(text: str, name: str, row: str, path: Path) -> str:
    """The table row that carries `<!-- report:NAME -->` after its last `|` (a comment line would end a markdown
    table; an extra cell is ignored) becomes `row`, marker kept."""
    marker = f"<!-- report:{name} -->"
    lines = text.split("\n")
    hits = [i for i, line in enumerate(lines) if line.startswith("|") and line.rstrip().endswith(marker)]
    if len(hits) != 1:
        raise ReportError(f"{path}: expected one table row ending in `{marker}`, found {len(hits)}")
    lines[hits[0]] = f"{row} {marker}"
    return "\n".join(lines)


def load_note(doc: dict) -> str:
    """Whether the run shared the machine: the load average at start or end, less the benchmark's own threads (a
    1-thread run alone shows a load of ~1), above half the cores."""
    start, end = doc["load_average"]["start"][0], doc["load_average"]["end"][0]
    own = min(doc["machine"].get("threads") or 0, doc["machine"]["cores"])
    if max(start, end) - own > doc["machine"]["cores"] / 2:
        return (" **Loaded machine** (other jobs ran beside it): read the ratios, measured interleaved in the same "
                "run, before the seconds.")
    return " Quiet machine."


def section_block(doc: dict, source: str, json_path: str) -> str:
    """A harnessed bench's block: where and how it ran, then its tables (harness.markdown_tables, as printed)."""
    head = f"Written by `bench/report.py` from `{json_path}`: {source}{load_note(doc)}"
    return f"{head}\n\n{harness.markdown_tables(doc)}"


def median_row(doc: dict, **match) -> dict:
    (row,) = [r for t in doc["tables"] for r in t["rows"] if all(r.get(k) == v for k, v in match.items())]
    return row


def eval_headline(doc: dict) -> str:
    """The README row of bench/eval.py: engine against engine at the same batching, and the eval's policy."""
    st = doc["settings"]
    parts = []
    for method in ("greedy", f"sample pool n={st['n']}"):
        r = median_row(doc, method=method, key="vllm")
        parts.append(f"{method} {r['vs_hf_batched_median']:.2f}x")
    claims = ("engine against engine at the same batching (HF generate batched as vLLM): vLLM " + ", ".join(parts)
              + f" HF's tokens/s (median of {st['repeats']} interleaved repeats)")
    pool = f"sample pool n={st['n']}"
    per_q = [r for t in doc["tables"] for r in t["rows"] if r["method"] == pool and r["key"] == "hf-per-question"]
    if per_q:
        ratio = median_row(doc, method=pool, key="vllm")["tokens_per_s_median"] / per_q[0]["tokens_per_s_median"]
        claims += (f"; against optsys.eval's HF policy (one seeded call per question, so samples do not depend on "
                   f"batching) the pool is {ratio:.2f}x: a policy, not the engine")
    g = median_row(doc, method="greedy", key="hf-batched")
    if g.get("greedy_equal_to_vllm") is not None:
        claims += f"; greedy answers equal {g['greedy_equal_to_vllm']}/{st['num']}"
    m, load = doc["machine"], doc["load_average"]
    return (f"| eval generation, vLLM in process vs HF generate, same model and prompts ({st['model']}, {st['num']} "
            f"questions) | `{doc['command']}` | {claims} | {doc['wall_s'] / 60:.0f} min ({doc['date']}) "
            f"| {m['cores']}-core CPU, {m['threads']} thread(s), load {load['start'][0]:.1f} |")


def preference_headline(doc: dict) -> str:
    """The README row of bench/preference.py: fused padding-free against naive padded, medians over repeats."""
    st, r = doc["settings"], median_row(doc, key="fused")
    m, load = doc["machine"], doc["load_average"]
    return (f"| one DPO step, fused padding-free vs materialized logits + padded ({st['model']} model, "
            f"{st['pairs']} long-tailed pairs a step) | `{doc['command']}` | {r['speed_vs_naive']:.2f}x tokens/s, "
            f"{r['mem_vs_naive']:.2f}x peak memory (median of {st['repeats']} interleaved repeats; step-0 loss, "
            f"log-probs and grad norm equal) | {doc['wall_s'] / 60:.0f} min ({doc['date']}) "
            f"| {m['cores']}-core CPU, {m['threads']} thread(s), load {load['start'][0]:.1f} |")


GEN_WEIGHTS = {"merged": "merged weights (no adapter)", "adapter": "LoRA adapter active", "base": "base model"}
GEN_ENGINES = {"vllm": "vLLM (in process)", "hf": "HF generate"}


def generation_table(doc: dict, source: str) -> str:
    """bench/generation.py's table: tokens/s of each engine, mode and weights, with vLLM over HF and adapter over
    merged from the medians."""
    f = lambda x, spec: format(x, spec) if x is not None else "-"  # noqa: E731
    s = doc["settings"]
    a = s["args"]
    lora = f"LoRA r={a['lora']}, alpha {a['lora_alpha']} ({s['adapter_params'] / 1e6:.2f}M params, random)" \
        if a["lora"] else "no adapter"
    lines = [source, "",
             f"{a['prompts']} word problems (prompt tokens {min(s['prompt_tokens'])}-{max(s['prompt_tokens'])}); "
             f"greedy: {a['prompts']} x 1; sampled: {a['prompts'] // a['group']} x {a['group']} at "
             f"T={a['temperature']}; <= {a['max_new_tokens']} new tokens, ending at the stop token; {lora}; fp32.", "",
             "| engine | mode | weights | tokens / call | tokens/s, min | tokens/s, median | tokens / CPU-s, median "
             "| vLLM / HF | (CPU) | adapter / merged | (CPU) | setup (s) | ended at stop | greedy same as first row |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    x = lambda v: f"{v:.2f}x" if v is not None else "-"  # noqa: E731
    for r in doc["table"]:
        lines.append(f"| {GEN_ENGINES.get(r['engine'], r['engine'])} | {r['mode']} "
                     f"| {GEN_WEIGHTS.get(r['weights'], r['weights'])} | {r['tokens_per_call']:.0f} "
                     f"| {r['tokens_per_s_min']:.1f} | {r['tokens_per_s_median']:.1f} "
                     f"| {r['tokens_per_cpu_s_median']:.1f} | {x(r['vllm_over_hf'])} | {x(r['vllm_over_hf_cpu'])} "
                     f"| {x(r['vs_merged'])} | {x(r['vs_merged_cpu'])} "
                     f"| {r['setup_s_median']:.1f} | {r['stopped_fraction']:.2f} "
                     f"| {f(r['greedy_same_as_first'], '.2f')} |")
    for name, why in doc.get("absent", {}).items():
        lines.append(f"| {name}: absent | {why} | | | | | | | | | | | | |")
    reps = {r["repeats"] for r in doc["table"]}
    lines += ["", f"Repeats per variant: {', '.join(map(str, sorted(reps)))}, interleaved, each in its own process, "
              f"{a['rounds']} timed call(s) after a warm-up call; tokens/s = generated tokens (stop token included) "
              "over the calls' wall time; tokens / CPU-s = the same over the process's CPU time in those calls (with "
              "1 thread, the speed on a core of its own: far steadier than wall time on a shared machine); ratios "
              "from the medians; setup (model load, engine start, adapter load) is not timed."]
    return "\n".join(lines)


README_ROWS = {"e2e": e2e_headline, "eval": eval_headline, "preference": preference_headline}


def load_doc(name: str, path: Path) -> dict:
    doc = json.loads(path.read_text())
    script = SECTIONS[name][0]
    if doc.get("script") != script or "tables" not in doc:
        raise ReportError(f"{path} was not written by {script}'s harness (its `script` is {doc.get('script')!r}, "
                          "or it has no `tables`): re-run the script")
    if doc.get("problems") and name != "e2e":
        raise ReportError(f"{path}: {script} recorded failed checks, not published: {doc['problems']}")
    return doc


def json_paths(args) -> tuple[dict[str, Path], set[str]]:
    """Each section's JSON and the sections asked for by name (whose JSON must exist)."""
    paths = {name: ROOT / "bench" / "results" / default for name, (_, default) in SECTIONS.items()}
    named = set(args.sections.split(",")) if args.sections else set()
    if args.e2e:
        paths["e2e"] = Path(args.e2e)
        named.add("e2e")
    for item in args.json or []:
        name, _, path = item.partition("=")
        if name not in SECTIONS or not path:
            raise ReportError(f"--json {item!r}: expected NAME=PATH with NAME one of {', '.join(SECTIONS)}")
        paths[name] = Path(path)
        named.add(name)
    unknown = named - set(SECTIONS)
    if unknown:
        raise ReportError(f"--sections: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return paths, named


def render(args) -> dict[Path, str]:
    here = harness.machine(0)
    paths, named = json_paths(args)
    # --sections picks; else the sections given a JSON by --e2e / --json; else every section whose JSON is here
    wanted = set(args.sections.split(",")) if args.sections else (named or set(SECTIONS))
    bench_readme, readme = Path(args.bench_readme), Path(args.readme)
    texts = {bench_readme: bench_readme.read_text(), readme: readme.read_text()}
    for name in SECTIONS:
        path = paths[name]
        if name not in wanted and name not in named:
            continue
        if not path.exists():
            if name in named:
                raise ReportError(f"{path} does not exist: run `python {SECTIONS[name][0]}` first")
            print(f"kept {name}: no {path} here (run `python {SECTIONS[name][0]}` to regenerate it)")
            continue
        if name == "e2e":
            texts.update(render_e2e(args, here, path, bench_readme, readme, texts))
            continue
        if name in ("e2e-smollm2", "e2e-smollm2-full", "generation"):  # their own tables (no harness `tables`)
            doc = json.loads(path.read_text())
            if doc.get("script") != SECTIONS[name][0]:
                raise ReportError(f"{path} was not written by {SECTIONS[name][0]}'s harness (its `script` is "
                                  f"{doc.get('script')!r}): re-run it")
            table = generation_table if name == "generation" else e2e_table
            body = table(doc, provenance(doc, here, args.other_machine, path))
            texts[bench_readme] = replace_block(texts[bench_readme], name, body, bench_readme)
            if name in E2E_JOBS:
                texts[readme] = replace_row(texts[readme], name, e2e_headline(doc, name), readme)
            continue
        doc = load_doc(name, path)
        source = provenance(doc, here, args.other_machine, path)
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
        texts[bench_readme] = replace_block(texts[bench_readme], name, section_block(doc, source, str(shown)),
                                            bench_readme)
        if name in README_ROWS:
            texts[readme] = replace_row(texts[readme], name, README_ROWS[name](doc), readme)
    return texts


def render_e2e(args, here, e2e: Path, bench_readme: Path, readme: Path, texts: dict) -> dict[Path, str]:
    doc = json.loads(e2e.read_text())
    if doc.get("script") != "bench/e2e.py":
        raise ReportError(f"{e2e} was not written by bench/e2e.py's harness (no `script` field): re-run it")
    source = provenance(doc, here, args.other_machine, e2e)
    return {bench_readme: replace_block(texts[bench_readme], "e2e", e2e_table(doc, source), bench_readme),
            readme: replace_row(texts[readme], "e2e", e2e_headline(doc), readme)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=None, help=f"comma-separated, of {', '.join(SECTIONS)} (default: all "
                   "whose JSON is here)")
    p.add_argument("--e2e", default=None, help="bench/e2e.py's JSON (default bench/results/e2e.json)")
    p.add_argument("--json", action="append", metavar="NAME=PATH", help="another section's JSON (repeatable)")
    p.add_argument("--bench-readme", default=str(ROOT / "bench" / "README.md"))
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--other-machine", action="store_true", help="publish a JSON from another machine, labelled")
    p.add_argument("--check", action="store_true", help="exit 1 if a table differs from its JSON; write nothing")
    args = p.parse_args()
    stale = []
    for path, text in render(args).items():
        if path.read_text() != text:
            stale.append(path)
            if not args.check:
                path.write_text(text)
    if args.check and stale:
        raise SystemExit(f"out of date: {', '.join(map(str, stale))} (run python bench/report.py)")
    print("up to date" if not stale else f"wrote {', '.join(map(str, stale))}")


if __name__ == "__main__":
    main()
