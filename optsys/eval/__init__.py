"""Evaluation: tasks, metrics, the answer rule, test-time methods, reports, the endpoint client.

    from optsys.eval import pass_at_k, maj_at_k, best_of_n_at_k, canonical_answer, EVAL_TASKS
    pass_at_k(n=16, c=3, k=4)

Importing this package is cheap (numpy, PyYAML): the metrics, the answer rule (optsys.data.answers) and the task
registry load here; `evaluate`, `compare`, `load_eval_config`, `EvalRunConfig` and `write_results` load on first
use (they bring torch and the engines). `python -m optsys.eval` is the command line (optsys.eval_cli).
"""

from optsys.data.answers import (
    MATCH_MODES,
    answers_match,
    canonical_answer,
    canonical_reference,
    extract_answer,
    numeric_answer,
    parse_number,
)
from optsys.eval.metrics import (
    accuracy_interval,
    best_of_n,
    best_of_n_at_k,
    maj_at_k,
    majority_vote,
    mcnemar,
    paired_interval,
    pass_at_k,
)
from optsys.eval.tasks import EVAL_TASKS, EvalTask, Question, read_task_file, register_task, resolve_tasks

_LAZY = {"evaluate": "optsys.eval.run", "compare": "optsys.eval.run", "load_eval_config": "optsys.eval.config",
         "EvalRunConfig": "optsys.eval.config", "write_results": "optsys.eval.report"}

__all__ = ["MATCH_MODES", "answers_match", "canonical_answer", "canonical_reference", "extract_answer",
           "numeric_answer", "parse_number", "accuracy_interval", "best_of_n", "best_of_n_at_k", "maj_at_k",
           "majority_vote", "mcnemar", "paired_interval", "pass_at_k", "EVAL_TASKS", "EvalTask", "Question",
           "read_task_file", "register_task", "resolve_tasks", *_LAZY]


def __getattr__(name: str):
    """The run-time entry points, imported on first use so that `import optsys.eval` stays light."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'optsys.eval' has no attribute {name!r}")
