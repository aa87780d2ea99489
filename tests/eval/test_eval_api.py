"""The public API of optsys.eval as a user writes it (issue 23, item 9), and that importing it stays light."""

import subprocess
import sys

import pytest


def test_the_documented_functions_import_from_optsys_eval():
    import optsys.eval
    from optsys.eval import (  # noqa: F401
        EVAL_TASKS,
        answers_match,
        best_of_n_at_k,
        canonical_answer,
        canonical_reference,
        extract_answer,
        maj_at_k,
        pass_at_k,
        register_task,
        resolve_tasks,
    )

    assert optsys.eval.pass_at_k(n=4, c=2, k=2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert maj_at_k(["4", "4", "5"], [True, True, False], 3) == 1.0
    assert best_of_n_at_k([0.9, 0.1], [True, False], 1) == 0.5
    assert canonical_answer("The answer is 1,234.", "numeric") == "1234"
    assert "arithmetic_reversed" in EVAL_TASKS
    assert [t.name for t in resolve_tasks(["arithmetic"])] == ["arithmetic"]
    for name in optsys.eval.__all__:
        assert getattr(optsys.eval, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'pass_at_kk'"):
        getattr(optsys.eval, "pass_at_kk")  # noqa: B009


def test_import_optsys_eval_loads_no_engine_or_model_library():
    code = ("import sys, optsys.eval; from optsys.eval import pass_at_k; "
            "print(sorted(m for m in ('torch', 'transformers', 'vllm', 'math_verify') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    code = "import optsys.eval; print(optsys.eval.evaluate.__module__, optsys.eval.load_eval_config.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["optsys.eval.run", "optsys.eval.config"]
