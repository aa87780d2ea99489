"""Progress bars (optsys/telemetry/progress.py): one display per process, bars for the long phases of a run."""

from __future__ import annotations

from helpers import sft_run_overrides

from optsys.telemetry import progress
from optsys.telemetry.progress import StepProgress, progress_items


def test_a_bar_opened_under_another_joins_its_display_and_leaves_with_close():
    """rich allows one live display: the held-out loss every trainer.eval_every steps opens its bar while the
    training bar runs (before, rich raised 'Only one live display may be active at once')."""
    outer = StepProgress(3, "train")
    try:
        seen = list(progress_items(range(4), "eval/loss"))
        assert seen == [0, 1, 2, 3]
        assert [t.description for t in outer.bar.tasks] == ["train"]  # the inner bar left the display
        for _ in progress_items(range(5), "eval/accuracy"):
            break  # a loop that stops early closes its bar too
        assert [t.description for t in outer.bar.tasks] == ["train"]
    finally:
        outer.close()
    assert progress._live == []
    outer.close()  # closing twice is harmless (a run that stops on a nan loss closes it, then ends)
    disabled = StepProgress(3, "off", enabled=False)
    disabled.update(1)
    disabled.close()
    assert progress._live == []


def test_sft_shows_the_held_out_loss_and_accuracy_phases(tmp_path, tiny_path, capsys):
    """With trainer.progress=true the phases after the steps have bars of their own, and a cut held-out set says
    so (eval.loss_max_rows)."""
    from optsys.trainers import sft
    from optsys.validation import load_config

    overrides = sft_run_overrides(tiny_path, tmp_path / "run", "trainer.max_steps=2", "trainer.progress=true",
                                  "eval.after=true", "eval.max_new_tokens=4", "eval.batch_size=8",
                                  "eval.loss_max_rows=12")
    summary = sft.train(load_config("quickstart", overrides=overrides))
    out = capsys.readouterr().out
    assert "eval/loss: on the first 12 of 20 held-out rows (eval.loss_max_rows" in out
    assert "eval/loss (12 rows)" in out and "eval/accuracy (20 questions)" in out and "3/3" in out  # 20 in 8s
    assert summary["eval/loss_rows"] == 12


def test_an_eval_engines_generation_shows_a_bar_and_the_same_completions(tiny_path, capsys):
    """python -m optsys.eval sets engine.show_progress (eval's `progress=true`, the default): the HF engine counts
    its batches (greedy) or prompts (sampling) with a bar; what it generates does not change."""
    import torch
    from transformers import AutoModelForCausalLM

    from optsys.rollout.engine import Sampling
    from optsys.rollout.hf_engine import HFEngine

    engine = HFEngine(AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32), pad_token_id=0,
                      greedy_batch=2)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    runs = {}
    for show in (False, True):
        engine.show_progress = show
        greedy = engine.generate(prompts, Sampling(temperature=0.0, max_new_tokens=3), [0, 1, 2])
        sampled = engine.generate(prompts, Sampling(n=2, temperature=1.0, max_new_tokens=3), [0, 1, 2])
        runs[show] = [[c.token_ids for c in g] for g in greedy + sampled]
    assert runs[True] == runs[False]
    out = capsys.readouterr().out
    assert "generate (3 prompts, greedy)" in out and "2/2" in out and "generate (3 prompts x 2)" in out
