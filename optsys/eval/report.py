"""An evaluation's files: results.json, results.md (a markdown table), samples.jsonl (one row per question, every
method's completions, answers, correctness and tokens) and PNG curves (accuracy vs N, accuracy vs generated tokens)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from optsys.eval.scaling import POOL_METHODS

X_LABELS = {"greedy": "N", "self_correct": "rounds", "budget": "thinking budget"}


def _clean(x):
    """JSON without NaN/inf (strict parsers refuse them): they become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _interval(m: dict) -> str:
    if m.get("low") is None or not math.isfinite(m["low"]):
        return "-"
    return f"[{m['low']:.3f}, {m['high']:.3f}]"


def _percent(level: float) -> str:
    """The interval's confidence level as its header says it: 0.95 -> '95%', 0.9 -> '90%', 0.995 -> '99.5%'."""
    return f"{100 * level:.10g}%"


def table(result: dict, title: str = "", level: float = 0.95) -> str:
    """The markdown table of one model's results: a row per (task, method) and a row per curve point; `level` is
    the confidence level the intervals were computed at (the config's `level`)."""
    lines = [f"## {title or result['model']}", "", f"engine: {result.get('engine') or 'local model'}", "",
             f"| task | method | x | accuracy | {_percent(level)} interval | tokens/question | unparsed "
             "| engine tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for task, r in result["tasks"].items():
        for method, m in r["methods"].items():
            if r["kind"] == "perplexity":
                lines.append(f"| {task} | perplexity | - | ppl {_fmt(m['perplexity'])}, bpb {_fmt(m['bits_per_byte'])} "
                             f"| - | - | - | - |")
                continue
            for p in m.get("points", [m]):
                x = p.get("x", "-")
                label = f"{method} (k={x})" if method in POOL_METHODS else method
                lines.append(f"| {task} | {label} | {x} | {_fmt(p['accuracy'])} | {_interval(p)} | "
                             f"{_fmt(p.get('tokens_per_question'), 1)} | {_fmt(m.get('unparsed_rate'))} | "
                             f"{_fmt(m.get('engine_tokens_per_s'), 0)} |")
    return "\n".join(lines) + "\n"


def compare_table(comparison: dict, level: float = 0.95) -> str:
    a, b = comparison["a"]["model"], comparison["b"]["model"]
    lines = [f"## {a} (A) vs {b} (B): paired on the same questions and samples", "",
             f"| task | method | A | B | A - B | {_percent(level)} paired interval | McNemar p | questions |",
             "|---|---|---|---|---|---|---|---|"]
    for task, methods in comparison["differences"].items():
        for method, d in methods.items():
            p = d.get("mcnemar", {}).get("p_value")
            p_text = "-" if p is None else f"{p:.3g}"
            lines.append(f"| {task} | {method} | {_fmt(d['a'])} | {_fmt(d['b'])} | {_fmt(d['difference'])} | "
                         f"{_interval(d)} | {p_text} | {d['questions']} |")
    return "\n".join(lines) + "\n"


def plot_results(result: dict, out: Path, prefix: str = "") -> list[Path]:
    """Per generation task: accuracy vs N (pool methods) and accuracy vs generated tokens (every method)."""
    from optsys.telemetry.curves import plot_curves

    paths = []
    for task, r in result["tasks"].items():
        if r["kind"] != "generate":
            continue
        by_n = {m: [{"n": p["x"], **p} for p in v["points"]] for m, v in r["methods"].items() if m in POOL_METHODS}
        if by_n and any(len(v) > 1 for v in by_n.values()):
            paths.append(plot_curves(by_n, x="n", path=out / f"{prefix}{task}_accuracy_vs_n.png",
                                     title=f"{task}: accuracy vs samples per question",
                                     xlabel="samples per question (N)"))
        by_tokens = {}
        for method, v in r["methods"].items():
            label = method if method in POOL_METHODS else f"{method} (x = {X_LABELS.get(method, 'N')})"
            by_tokens[label] = [{"tokens_per_question": max(p["tokens_per_question"], 1e-9), "n": p["x"], **p}
                                for p in v["points"]]
        paths.append(plot_curves(by_tokens, x="tokens_per_question",
                                 path=out / f"{prefix}{task}_accuracy_vs_tokens.png",
                                 title=f"{task}: accuracy vs generated tokens",
                                 xlabel="generated tokens per question"))
    return paths


def write_results(out: Path, payload: dict, *, plots: bool = True) -> dict:
    """Write every file; returns {name: path}. payload: {"config", "results": [one per model], "comparison"?}."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    slim = {k: v for k, v in payload.items() if k != "results"}
    slim["results"] = [{**r, "tasks": {t: {k: v for k, v in tr.items() if k not in ("samples", "per_question")}
                                       for t, tr in r["tasks"].items()}} for r in payload["results"]]
    if "comparison" in payload:
        slim["comparison"] = {"differences": payload["comparison"]["differences"]}
    files["results.json"] = out / "results.json"
    files["results.json"].write_text(json.dumps(_clean(slim), indent=2) + "\n")
    level = payload.get("config", {}).get("level", 0.95)
    md = "".join(table(r, f"{'AB'[i] + ': ' if len(payload['results']) > 1 else ''}{r['model']}", level) + "\n"
                 for i, r in enumerate(payload["results"]))
    if "comparison" in payload:
        md += compare_table(payload["comparison"], level)
    files["results.md"] = out / "results.md"
    files["results.md"].write_text(md)
    files["samples.jsonl"] = out / "samples.jsonl"
    with open(files["samples.jsonl"], "w") as f:
        for r in payload["results"]:
            for tr in r["tasks"].values():
                for row in tr["samples"]:
                    f.write(json.dumps(_clean({"model": r["model"], **row})) + "\n")
    if plots:
        for i, r in enumerate(payload["results"]):
            prefix = f"{'AB'[i]}_" if len(payload["results"]) > 1 else ""
            for p in plot_results(r, out, prefix):
                files[p.name] = p
    return files
