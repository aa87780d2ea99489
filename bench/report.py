"""Regenerate the benchmark tables in bench/README.md and README.md from the JSON the scripts wrote.

    python bench/report.py [--e2e bench/results/e2e.json] [--e2e-real bench/results/e2e_smollm2.json]
                           [--generation bench/results/generation.json] [--other-machine] [--check]

A number in a table cannot drift from its run: the tables between `<!-- report:NAME -->` and `<!-- /report:NAME -->`
in bench/README.md, and the README row that ends in `<!-- report:NAME -->`, are written by this script only. A JSON
from another machine (its `machine.id` differs from this one's: another processor, core count or host) is refused
unless --other-machine is given, and then the table says where it was measured. The e2e block is always filled; the
real-model e2e block (`e2e-smollm2`, bench/e2e.py --model smollm2-135m-instruct) and the `generation` block
(bench/generation.py) are filled when bench/README.md has them, from their own JSON. --check exits 1 if a table differs
from what the JSON gives (for CI or a pre-commit hook).
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
}
SECTION_NAMES = {"sft": "SFT", "dpo": "DPO", "grpo": "GRPO"}


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
    reps = {r["repeats"] for r in doc["table"]}
    lines += ["", f"Repeats per variant: {', '.join(map(str, sorted(reps)))}, interleaved, each in its own process; "
              "timed: optimizer steps 2.. of each process; excluded: process start, model load, data preparation, "
              "the reference precompute. Speed = TRL-best's s/step over the row's (> 1: the row is faster)."]
    return "\n".join(lines)


def e2e_headline(doc: dict) -> str:
    """The README results table's row: optsys at its defaults against TRL's best, medians over repeats."""
    rows = {(r["section"], r["variant"]): r for r in doc["table"]}
    parts = []
    for sec in ("sft", "dpo", "grpo"):
        r = rows.get((sec, "optsys"))
        if r and r["speed_vs_baseline_median"] is not None:
            parts.append(f"{SECTION_NAMES[sec]} {r['speed_vs_baseline_median']:.2f}x")
    extra = [f"{SECTION_NAMES[s]} {r['speed_vs_baseline_median']:.2f}x" for (s, v), r in rows.items()
             if v == "optsys-varlen" and r["speed_vs_baseline_median"] is not None]
    reps = min(r["repeats"] for r in doc["table"])
    claims = ", ".join(parts) + f" TRL-best's speed (median of {reps} interleaved repeats)"
    if extra:
        claims += f"; with the opt-in `sdpa_varlen`: {', '.join(extra)}"
    m, load = doc["machine"], doc["load_average"]
    return (f"| one SFT / DPO / GRPO step vs TRL 1.16 at its best settings here (gradient checkpointing off on both "
            f"sides; packing + padding-free; precomputed reference; HF generate), optsys at its defaults, same ids, "
            f"step-1 loss and grad norm equal | `{doc['command']}` | {claims} | {doc['wall_s'] / 60:.0f} min "
            f"({doc['date']}) | {m['cores']}-core CPU, {m['threads']} threads, load {load['start'][0]:.1f} |")


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


def load_doc(path: Path, script: str, how: str) -> dict:
    if not path.exists():
        raise ReportError(f"{path} does not exist: run `{how}` first")
    doc = json.loads(path.read_text())
    if doc.get("script") != script:
        raise ReportError(f"{path} was not written by {script}'s harness (its `script` is {doc.get('script')!r}): "
                          "re-run it")
    return doc


def optional_blocks(text: str, args, here: dict, path: Path) -> str:
    """The blocks bench/README.md may hold beside e2e: each filled from its own JSON when the block is there."""
    blocks = (("e2e-smollm2", Path(args.e2e_real), "bench/e2e.py",
               "python bench/e2e.py --model smollm2-135m-instruct --out bench/results/e2e_smollm2.json", e2e_table),
              ("generation", Path(args.generation), "bench/generation.py", "python bench/generation.py",
               generation_table))
    for name, json_path, script, how, table in blocks:
        if f"<!-- report:{name} -->" not in text:
            continue
        doc = load_doc(json_path, script, how)
        text = replace_block(text, name, table(doc, provenance(doc, here, args.other_machine, json_path)), path)
    return text


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


def render(args) -> dict[Path, str]:
    here = harness.machine(0)
    out: dict[Path, str] = {}
    e2e = Path(args.e2e)
    if not e2e.exists():
        raise ReportError(f"{e2e} does not exist: run `python bench/e2e.py` first")
    doc = json.loads(e2e.read_text())
    if doc.get("script") != "bench/e2e.py":
        raise ReportError(f"{e2e} was not written by bench/e2e.py's harness (no `script` field): re-run it")
    source = provenance(doc, here, args.other_machine, e2e)
    bench_readme, readme = Path(args.bench_readme), Path(args.readme)
    text = replace_block(bench_readme.read_text(), "e2e", e2e_table(doc, source), bench_readme)
    out[bench_readme] = optional_blocks(text, args, here, bench_readme)
    out[readme] = replace_row(readme.read_text(), "e2e", e2e_headline(doc), readme)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--e2e", default=str(ROOT / "bench" / "results" / "e2e.json"))
    p.add_argument("--e2e-real", default=str(ROOT / "bench" / "results" / "e2e_smollm2.json"),
                   help="bench/e2e.py on the real model (the `e2e-smollm2` block)")
    p.add_argument("--generation", default=str(ROOT / "bench" / "results" / "generation.json"),
                   help="bench/generation.py's JSON (the `generation` block)")
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
