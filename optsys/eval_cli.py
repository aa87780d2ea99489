"""`python -m optsys.eval --model PATH --tasks arithmetic_reversed [--n 1,4,16] [--method greedy,self_consistency]`

Evaluates a model (a folder, tiny:<preset>, stage:<recipe>), two models on the same questions (`--compare A B`),
or an OpenAI-compatible server (`--endpoint URL`, e.g. `python -m optsys.serve`), with test-time methods:
greedy, sample (pass@k), self_consistency (maj@k), best_of_n (--scorer), self_correct (--rounds, --verifier),
budget (--budgets, --extend). Writes results.json, results.md, samples.jsonl and PNG curves into --out.
Settings come from an eval recipe (--recipe NAME, optsys/recipes/eval/) or a YAML file (--config), then the
flags, then key=value overrides (any EvalRunConfig field, e.g. temperature=0.7).

This is the eval entry point (optsys/eval/__main__.py only hands over to it): it sits above the trainers, so a
`stage:<recipe>` model is trained first or reused (optsys.sources), and the eval package below never trains.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,4,16, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m optsys.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value settings (EvalRunConfig fields)")
    p.add_argument("--recipe", help="an eval recipe in optsys/recipes/eval/")
    p.add_argument("--config", help="a YAML file of eval settings")
    p.add_argument("--model", help="HF folder, hub id, tiny:<preset> or stage:<recipe>")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two models on the same questions and samples")
    p.add_argument("--endpoint", help="an OpenAI-compatible server URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", dest="api_key", help="--endpoint's API key (default: the OPENAI_API_KEY environment "
                   "variable); never written to the results")
    p.add_argument("--tasks", type=_names, help="comma-separated task names (see --list-tasks)")
    p.add_argument("--task-file", dest="task_files", action="append", help="a YAML file of task entries")
    p.add_argument("--method", dest="methods", type=_names, help="greedy,sample,self_consistency,best_of_n,"
                   "self_correct,budget")
    p.add_argument("--n", type=_ints, help="samples per question, the curve's k values: 1,4,16")
    p.add_argument("--num", type=int, help="questions per task")
    p.add_argument("--difficulty", type=int, help="built-in tasks: digits (arithmetic) or list length (sorting)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    p.add_argument("--scorer", help="best_of_n: confidence (mean token log-prob), reward_model:<folder>, a reward "
                   "function or a dotted path")
    p.add_argument("--verifier", help="self_correct: reward_model:<folder>, a reward function or a dotted path "
                   "(score > 0.5 accepts an answer)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--budgets", type=_ints, help="thinking budgets in tokens: 16,32,64")
    p.add_argument("--extend", type=int, help="budget forcing: 'Wait' extensions when thinking stops early")
    p.add_argument("--engine", choices=["auto", "vllm", "hf"])
    p.add_argument("--seed", type=int)
    p.add_argument("--out", dest="output_dir", help="output folder (default runs/eval-<timestamp>)")
    p.add_argument("--list-tasks", action="store_true", help="print the registered tasks and exit")
    return p.parse_args(argv)


def check_stage_sources(cfg) -> None:
    """The `stage:<recipe>` models and reward models the eval names: each recipe validates (optsys.validation), before
    anything loads or trains (optsys.eval.config checked the rest)."""
    from optsys.validation import check_stage_reward, check_stage_source

    for key, value in (("model", cfg.model), *((f"compare[{i}]", m) for i, m in enumerate(cfg.compare))):
        if value and value.startswith("stage:"):
            check_stage_source(key, value)
    for key in ("scorer", "verifier"):
        if getattr(cfg, key):
            check_stage_reward(f"--{key}", getattr(cfg, key))


def list_tasks(task_files: list[str]) -> None:
    """Print the registered tasks, then those of each --task-file (a bad file is one clear error)."""
    from optsys.errors import InputError, input_error_message
    from optsys.eval.tasks import EVAL_TASKS, read_task_file

    try:
        tasks = [(t, "") for t in EVAL_TASKS.values()]
        for path in task_files:
            tasks += [(t, f" [{path}]") for t in read_task_file(path).values()]
    except InputError as e:
        sys.exit(input_error_message(e))
    for t, where in tasks:
        print(f"{t.name:24s} {t.kind:10s} {t.description}{where}")


def main(argv=None) -> dict | None:
    from optsys.errors import ConfigError, InputError, input_error_message
    from optsys.eval.config import load_eval_config, to_dict

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list_tasks:
        list_tasks(args.task_files or [])
        return None
    flags = {k: v for k, v in vars(args).items()
             if k not in ("overrides", "recipe", "config", "list_tasks") and v is not None}
    try:
        cfg = load_eval_config(args.recipe, args.config, flags, args.overrides)
        check_stage_sources(cfg)
        from optsys.eval.report import write_results
        from optsys.eval.run import compare, evaluate
        from optsys.sources import resolve_source

        out = Path(cfg.output_dir or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
        try:  # made now, not after the evaluation: a folder that cannot be written fails before a model loads
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--out {out} cannot be created: {e.strerror or e}; pick another --out") from None
        payload = {"config": to_dict(cfg)}
        if cfg.compare:
            comparison = compare(cfg, resolve=resolve_source)
            payload.update(results=[comparison["a"], comparison["b"]], comparison=comparison)
        else:
            payload["results"] = [evaluate(cfg, resolve=resolve_source)]
        files = write_results(out, payload, plots=cfg.plots)
    except InputError as e:
        sys.exit(input_error_message(e))
    print(files["results.md"].read_text())
    print(f"wrote {', '.join(str(p) for p in files.values())}")
    return payload


if __name__ == "__main__":
    main()
