"""`python -m optsys.eval --model PATH --task arithmetic`: greedy exact-match accuracy on held-out problems."""

from __future__ import annotations

import argparse
import json

import torch

from optsys.data.tasks import TASKS, get_task
from optsys.eval.accuracy import task_accuracy
from optsys.models.load import load_tokenizer, resolve_model_path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m optsys.eval", description=__doc__)
    p.add_argument("--model", required=True, help="HF folder, hub id, or tiny:<preset>")
    # single-turn tasks (a multi-turn one, e.g. guess, is scored by playing it: the RL trainer's eval/success_rate)
    p.add_argument("--task", default="arithmetic",
                   choices=sorted(n for n, t in TASKS.items() if not getattr(t, "environment", None)))
    p.add_argument("--difficulty", type=int, default=2)
    p.add_argument("--num", type=int, default=200, help="held-out problems to score")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM

    path = resolve_model_path(args.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(path, trust_remote_code=args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True,
                                                 trust_remote_code=args.trust_remote_code).to(device)
    task = get_task(args.task)
    problems = task.problems("test", args.num, difficulty=args.difficulty)
    acc, records = task_accuracy(model, tok, task, problems, max_new_tokens=args.max_new_tokens,
                                 batch_size=args.batch_size)
    print(json.dumps({"eval/accuracy": acc, "eval/num_samples": len(records), "examples": records[:3]}, indent=2))


if __name__ == "__main__":
    main()
