"""results.md as optsys.eval.report writes it: the interval headers name the level the intervals use."""

import pytest

from optsys.eval.report import write_results


def _result(model: str) -> dict:
    point = {"x": 1, "accuracy": 0.5, "low": 0.3, "high": 0.7, "tokens_per_question": 3.0}
    method = {**point, "unparsed_rate": 0.0, "engine_tokens_per_s": None, "points": [point]}
    return {"model": model, "engine": "hf", "tasks": {"t": {"kind": "generate", "methods": {"greedy": method},
                                                           "samples": [], "per_question": {"greedy": [1.0, 0.0]}}}}


@pytest.mark.parametrize("level,header", [(0.9, "90% interval"), (0.95, "95% interval"), (0.995, "99.5% interval")])
def test_interval_headers_say_the_configured_level(tmp_path, level, header):
    """Issue 23, item 12: the headers said "95%" whatever `level` was."""
    comparison = {"a": _result("A"), "b": _result("B"), "differences": {"t": {"greedy": {
        "a": 0.5, "b": 0.5, "difference": 0.0, "low": -0.1, "high": 0.1, "questions": 2}}}}
    payload = {"config": {"level": level}, "results": [comparison["a"], comparison["b"]], "comparison": comparison}
    md = write_results(tmp_path, payload, plots=False)["results.md"].read_text()
    assert md.count(f"| {header} |") == 2 and f"| {header.replace(' ', ' paired ')} |" in md
    others = {"90% interval", "95% interval", "99.5% interval"} - {header}
    assert not any(o in md for o in others), md
