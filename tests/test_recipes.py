"""Every shipped tiny recipe does what its header says when run as the header says (slow: minutes each).

The preference and RL recipes start from SFT stages (`stage:quickstart` is the shared `quickstart_run` fixture's
model, trained through the stage cache); nothing is overridden but the output folder and the progress bar.
quickstart itself: tests/trainers/test_sft.py::test_quickstart_learns_addition; dpo_tiny:
tests/trainers/test_preference_trainer.py::test_dpo_on_sft_model_raises_heldout_reward_accuracy."""

import json
from pathlib import Path

import pytest

from optsys.sources import resolve_source
from optsys.trainers import preference, reward
from optsys.validation import load_config

# recipe -> the header's claim, as (held-out reward accuracy at least, task accuracy may not drop)
PREFERENCE_CLAIMS = {
    "kto_tiny": 0.7,  # header: held-out reward accuracy 0.785-0.985 by SFT model (>= 0.7), task accuracy 1.0 -> 1.0
    "orpo_tiny": 0.95,  # header: 1.0 -> 1.0, task accuracy 1.0 -> 1.0 (2026-12-01 in CI: 1.0, margin 0.47)
    "simpo_tiny": 0.95,  # header: 1.0 -> 1.0, task accuracy 1.0 -> 1.0 (2026-12-01 in CI: 1.0, margin 10.0)
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(PREFERENCE_CLAIMS))
def test_preference_recipe_keeps_its_header(tmp_path, quickstart_run, recipe):
    # as written: stage:quickstart is the fixture's model (it trained through the stage cache)
    cfg = load_config(recipe, overrides=[f"output_dir={tmp_path / recipe}", "trainer.progress=false"])
    s = preference.train(cfg, resolve=resolve_source)
    print(recipe, {k: round(v, 3) for k, v in s.items() if k.startswith("eval/") and isinstance(v, float)})
    assert s["eval/reward_accuracy"] >= PREFERENCE_CLAIMS[recipe]
    assert s["eval/accuracy_before"] >= 0.8  # it starts from a model that can add
    assert s["eval/accuracy_after"] >= s["eval/accuracy_before"] - 0.0051  # no drop beyond one problem in 200


@pytest.mark.slow
def test_rm_tiny_as_written(tmp_path):
    """Header: held-out pair accuracy 0.604 -> 0.964 from the random-init tiny:quickstart backbone."""
    cfg = load_config("rm_tiny", overrides=[f"output_dir={tmp_path / 'rm'}", "trainer.progress=false"])
    s = reward.train(cfg, resolve=resolve_source)
    print({k: round(v, 3) for k, v in s.items() if k.startswith("eval/") and isinstance(v, float)})
    assert s["eval/accuracy_before"] < 0.75 and s["eval/accuracy"] >= 0.93


# RL recipes: (recipe, the header's claim as the least rise in held-out greedy accuracy from its SFT start).
# grpo_tiny runs first: its SFT stage (stage:grpo_sft) is then cached for ppo_tiny and distill_tiny (the quickstart
# fixture caches stage:quickstart, distill_tiny's teacher).
RL_CLAIMS = {"grpo_tiny": 0.10, "ppo_tiny": 0.10, "distill_tiny": 0.10}


# ppo_tiny (~4 min) runs on request (-m recipe_full) to keep CI within its time budget; PPO itself is exercised
# end to end in tests/trainers/test_rl.py (every method, kill-and-resume).
@pytest.mark.slow
@pytest.mark.parametrize("recipe", [pytest.param(r, marks=pytest.mark.recipe_full) if r == "ppo_tiny" else r
                                    for r in RL_CLAIMS])
def test_rl_recipe_keeps_its_header(tmp_path, quickstart_run, recipe):
    from optsys.trainers import rl

    cfg = load_config(recipe, overrides=[f"output_dir={tmp_path / recipe}", "trainer.progress=false"])
    s = rl.train(cfg, resolve=resolve_source)
    print(recipe, {k: round(v, 3) for k, v in s.items() if isinstance(v, float) and k.startswith(("eval/", "time/"))})
    assert s["eval/accuracy_after"] >= s["eval/accuracy_before"] + RL_CLAIMS[recipe]
    assert s["sync/canary_error"] < 1e-4


@pytest.mark.slow
@pytest.mark.recipe_full
def test_guess_tiny_as_written(tmp_path):
    """Header: sampled held-out success 0.590 -> 0.735 (greedy stays 1.0). About 12 minutes with its stage, so it
    runs on request: `python -m pytest -m recipe_full tests/test_recipes.py`."""
    from optsys.trainers import rl

    cfg = load_config("guess_tiny", overrides=[f"output_dir={tmp_path / 'guess'}", "trainer.progress=false"])
    s = rl.train(cfg, resolve=resolve_source)
    assert s["eval/sampled_success_rate_after"] >= s["eval/sampled_success_rate_before"] + 0.10
    assert s["eval/success_rate_after"] >= s["eval/success_rate_before"] - 0.02


@pytest.mark.slow
@pytest.mark.recipe_full
def test_smol_grpo_and_its_sft_stage_keep_their_headers(tmp_path, monkeypatch):
    """The real-model recipes as written, on a fresh cache (the stage trains first): smol_sft's header 0.12 -> 0.66,
    smol_grpo's 0.67 -> 0.74 and 0.12 -> 0.74 in all (issue 21's goal: +20 points within 30 minutes on 2 cores).
    About 25 minutes with the `real` extra: `python -m pytest -m recipe_full tests/test_recipes.py -k smol`."""
    pytest.importorskip("gguf", reason="the `real` extra")
    from optsys.stages import stage_config
    from optsys.trainers import rl

    monkeypatch.setenv("OPTSYS_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config("smol_grpo", overrides=[f"output_dir={tmp_path / 'grpo'}", "trainer.progress=false"])
    s = rl.train(cfg, resolve=resolve_source)
    stage = json.loads((Path(stage_config("smol_sft").output_dir) / "summary.json").read_text())
    print({k: round(v, 3) for k, v in s.items() if isinstance(v, float) and k.startswith(("eval/", "time/"))})
    assert s["eval/match"] == "numeric" and s["eval/accuracy_questions"] == 100
    assert stage["eval/accuracy_before"] <= 0.2 and stage["eval/accuracy_after"] >= 0.6  # the SFT stage
    # GRPO starts where the stage ended (its merged weights vs the stage's adapter on top of the base: a question
    # may flip on rounding)
    assert abs(s["eval/accuracy_before"] - stage["eval/accuracy_after"]) <= 0.02
    assert s["eval/accuracy_after"] >= s["eval/accuracy_before"] + 0.05  # GRPO's own gain (header: +0.10)
    assert s["eval/accuracy_after"] >= stage["eval/accuracy_before"] + 0.20  # the goal, stages included
    assert (tmp_path / "grpo" / "final-merged" / "config.json").exists()  # what --compare and serve take


@pytest.mark.slow
@pytest.mark.recipe_full
def test_smol_dpo_keeps_its_header(tmp_path):
    """smol_dpo as written (its SFT stage cached or trained first): on-policy pairs from the SFT model's own samples,
    DPO + RPO's NLL term; it builds pairs, logs the chosen NLL and raises held-out accuracy (header 0.66 -> 0.76)."""
    pytest.importorskip("gguf", reason="the `real` extra")
    cfg = load_config("smol_dpo", overrides=[f"output_dir={tmp_path / 'dpo'}", "trainer.progress=false"])
    s = preference.train(cfg, resolve=resolve_source)
    print({k: round(v, 3) for k, v in s.items() if isinstance(v, float) and k.startswith(("eval/", "time/", "data/"))})
    assert s["eval/match"] == "numeric" and s["eval/accuracy_questions"] == 100
    assert s["data/pairs_built"] > 0 and "eval/nll_chosen" in s
    assert s["eval/accuracy_after"] >= s["eval/accuracy_before"] + 0.05  # header: 0.66 -> 0.76
