"""Training stages (optsys/stages.py): `model.name_or_path: stage:<recipe>` trains that recipe first into the
cache, or reuses a complete cached run. Stage recipes here are tiny (a few SFT steps of the `test` preset)
and live in a temp recipes dir; the cache is a temp OPTSYS_CACHE_DIR."""

import itertools
import json
import os
from pathlib import Path

import pytest
import yaml
from helpers import run_torchrun

import optsys.checkpoint
import optsys.config
from optsys import sources, stages
from optsys.config import ConfigError
from optsys.sources import resolve_source
from optsys.trainers import preference, sft
from optsys.validation import load_config

SMALL_DATA = {"task": "arithmetic_reversed", "num_train": 40, "num_eval": 8, "max_tokens": 128}


def sft_recipe(model, **trainer):
    return {"method": "sft", "model": {"name_or_path": str(model)}, "data": dict(SMALL_DATA),
            "trainer": {"max_steps": 3, "warmup_steps": 1, "batch_tokens": 256, "log_every": 1, "progress": False,
                        "lr": 1e-3, **trainer},
            "eval": {"before": False, "after": False}}


@pytest.fixture
def recipes(tmp_path, monkeypatch, tiny_path):
    """A temp recipes dir holding `sft_stage` (3 SFT steps from the tiny test model) and `main` (SFT from
    stage:sft_stage); returns a writer `write(name, recipe_dict)`."""
    root = tmp_path / "recipes"
    root.mkdir()
    monkeypatch.setattr(optsys.config, "RECIPES_DIR", root)
    monkeypatch.setenv("OPTSYS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "_announced", set())

    def write(name, recipe):
        (root / f"{name}.yaml").write_text(yaml.safe_dump(recipe))

    write("sft_stage", sft_recipe(tiny_path))
    write("main", sft_recipe("stage:sft_stage", max_steps=2))
    return write


_runs = itertools.count()


def main_cfg(tmp_path, name="main", *extra):
    return load_config(name, overrides=[f"output_dir={tmp_path / 'runs' / f'{name}-{next(_runs)}'}", *extra])


def stage_dirs(tmp_path, name="sft_stage"):
    return sorted(p.name for p in (tmp_path / "cache" / "stages").glob(f"{name}-*") if p.is_dir())


def test_first_run_trains_the_stage_and_the_second_reuses_it(tmp_path, recipes, capsys):
    first = sft.train(main_cfg(tmp_path), resolve=resolve_source)
    out = capsys.readouterr().out
    assert "stage sft_stage: training it first into" in out
    (folder,) = stage_dirs(tmp_path)
    stage = tmp_path / "cache" / "stages" / folder
    assert (stage / "summary.json").is_file() and (stage / "final" / "model.safetensors").is_file()
    assert first["model/stage"] == str(stage / "final")  # provenance
    saved = json.loads(Path(first["output_dir"], "summary.json").read_text())
    assert saved["model/stage"] == str(stage / "final")
    stamp = (stage / "summary.json").stat().st_mtime_ns

    sources._announced.clear()  # as a new process would
    second = sft.train(main_cfg(tmp_path), resolve=resolve_source)
    out = capsys.readouterr().out
    assert f"stage sft_stage: reusing {stage / 'final'} (trained " in out and "training it first" not in out
    assert (stage / "summary.json").stat().st_mtime_ns == stamp  # not retrained
    assert stage_dirs(tmp_path) == [folder]
    # the caller's RNG is kept around the stage's training: a run continues alike whether it trained or reused
    assert second["train/loss"] == first["train/loss"]


def test_a_model_load_never_trains_a_stage(tmp_path, recipes):
    """Below the entry points a `stage:` source is refused, naming what resolves it: a trainer called without the
    entry point's resolver trains nothing (no stage folder, no run folder contents beyond the config)."""
    from optsys.errors import ConfigError
    from optsys.models.sources import local_source

    with pytest.raises(ConfigError, match=r"'stage:sft_stage' is a training stage.*optsys.train"):
        local_source("stage:sft_stage")
    with pytest.raises(ConfigError, match="is a training stage"):
        sft.train(main_cfg(tmp_path))
    assert optsys.checkpoint.weights_stamp("stage:sft_stage") is None  # a source string, not a folder: no stamp
    assert stage_dirs(tmp_path) == []


def test_a_changed_stage_setting_trains_a_new_cached_stage(tmp_path, recipes, tiny_path):
    a = stages.stage_config("sft_stage").output_dir
    recipes("sft_stage", sft_recipe(tiny_path, progress=True, log_every=2, save_every=1))  # logging only
    assert stages.stage_config("sft_stage").output_dir == a
    recipes("sft_stage", sft_recipe(tiny_path, lr=5e-4))
    b = stages.stage_config("sft_stage").output_dir
    assert b != a and Path(b).parent == tmp_path / "cache" / "stages"
    assert Path(b).name.startswith("sft_stage-") and len(Path(b).name) == len("sft_stage-") + 16
    # a stage's key covers the stages it starts from: changing the inner recipe gives the outer a new folder
    recipes("outer", sft_recipe("stage:sft_stage"))
    outer = stages.stage_config("outer").output_dir
    recipes("sft_stage", sft_recipe(tiny_path, lr=2e-4))
    assert stages.stage_config("outer").output_dir != outer

    sources.ensure_stage(stages.stage_config("sft_stage"))
    recipes("sft_stage", sft_recipe(tiny_path, max_steps=4))
    sources.ensure_stage(stages.stage_config("sft_stage"))
    assert len(stage_dirs(tmp_path)) == 2


@pytest.mark.parametrize("damage", ["no_summary", "no_weights"])
def test_an_incomplete_cached_stage_is_moved_aside_and_retrained(tmp_path, recipes, capsys, damage):
    cfg = stages.stage_config("sft_stage")
    sources.ensure_stage(cfg)
    out = Path(cfg.output_dir)
    if damage == "no_summary":  # killed before the end: summary.json is written last
        (out / "summary.json").unlink()
    else:
        (out / "final" / "model.safetensors").unlink()
    assert not stages.is_complete(cfg)
    capsys.readouterr()
    final = sources.ensure_stage(stages.stage_config("sft_stage"))
    printed = capsys.readouterr().out
    assert "is incomplete" in printed and "training again" in printed
    assert stages.is_complete(cfg) and final == out / "final"
    (aside,) = [p for p in out.parent.iterdir() if p.name.startswith(out.name + ".old-")]
    assert (aside / "config.yaml").exists()  # the killed run's folder, kept


def test_bad_stages_are_config_errors_naming_the_key(tmp_path, recipes, tiny_path):
    with pytest.raises(ConfigError, match=r"model.name_or_path='stage:sft_stag': unknown recipe 'sft_stag' "
                                          r"\(did you mean 'sft_stage'\?\)"):
        main_cfg(tmp_path, "main", "model.name_or_path=stage:sft_stag")
    with pytest.raises(ConfigError, match=r"model.name_or_path='stage:' names no recipe"):
        main_cfg(tmp_path, "main", "model.name_or_path=stage:")
    recipes("a", sft_recipe("stage:b"))
    recipes("b", sft_recipe("stage:a"))
    with pytest.raises(ConfigError, match=r"model.name_or_path='stage:b': in stage recipe b .*"
                                          r"model.name_or_path='stage:a': the stages form a cycle a -> b -> a"):
        load_config("a")
    recipes("self", sft_recipe("stage:self"))
    with pytest.raises(ConfigError, match=r"cycle self -> self"):
        load_config("self")
    for name, inner in (("d1", "d2"), ("d2", "d3"), ("d3", "d4"), ("d4", "sft_stage")):
        recipes(name, sft_recipe(f"stage:{inner}"))
    load_config("d2")  # d2 -> d3 -> d4 -> sft_stage: 3 deep
    with pytest.raises(ConfigError, match=r"more than 3 deep \(d1 -> d2 -> d3 -> d4 -> sft_stage\)"):
        load_config("d1")
    # a bad setting inside the stage's recipe: named with the stage
    recipes("bad", {**sft_recipe(tiny_path), "trainer": {"lr": 0}})
    with pytest.raises(ConfigError, match=r"pref.reference_model='stage:bad': in stage recipe bad .*bad.yaml\): "
                                          r"trainer.lr must be positive"):
        load_config("main", overrides=["method=dpo", "pref.reference_model=stage:bad"])
    recipes("lora", {**sft_recipe(tiny_path), "model": {"name_or_path": str(tiny_path), "lora": {"r": 4}}})
    with pytest.raises(ConfigError, match=r"model.name_or_path='stage:lora': stage recipe lora trains LoRA adapters"
                                          r".*model.lora.save_merged=true"):
        main_cfg(tmp_path, "main", "model.name_or_path=stage:lora")


def test_stage_as_the_reference_model(tmp_path, recipes, capsys):
    """DPO with both the policy and the reference a stage: the stage trains once, both name its final/."""
    overrides = ["method=dpo", "pref.reference_model=stage:sft_stage", "pref.reference=precompute",
                 "trainer.max_steps=1", "data.max_tokens=256"]
    cfg = main_cfg(tmp_path, "main", *overrides)
    assert cfg.pref.reference_model == "stage:sft_stage"
    s = preference.train(cfg, resolve=resolve_source)
    printed = capsys.readouterr().out
    assert printed.count("stage sft_stage: training it first") == 1 and "reusing" not in printed
    (folder,) = stage_dirs(tmp_path)
    assert s["model/stage"] == s["model/reference_stage"] == str(tmp_path / "cache" / "stages" / folder / "final")


def test_cache_key_ignores_logging_keys_and_the_cache_root_follows_the_environment(tmp_path, monkeypatch):
    """What conftest's quickstart_run relies on: the quickstart stage's folder is the same with the progress bar
    off (the fixture) and on (`stage:quickstart` in a recipe), and lies under OPTSYS_CACHE_DIR."""
    import importlib.util

    # tests/conftest.py by path: `import conftest` may find tests/kernels/conftest.py in a whole-suite run
    spec = importlib.util.spec_from_file_location("optsys_tests_conftest", Path(__file__).parent / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    quickstart_stage_config = conftest.quickstart_stage_config

    assert os.environ["OPTSYS_CACHE_DIR"]  # set for the whole session by conftest
    assert Path(quickstart_stage_config().output_dir).parent == Path(os.environ["OPTSYS_CACHE_DIR"]) / "stages"
    assert quickstart_stage_config().output_dir == stages.stage_config("quickstart").output_dir
    base = stages.stage_config("quickstart")
    for override in ("trainer.log_every=7", "trainer.save_every=100", "trainer.keep_last=5", f"output_dir={tmp_path}",
                     "trainer.tensorboard=false", "trainer.plots=false"):
        cfg = load_config("quickstart", overrides=[override])
        assert stages.stage_key(cfg) == stages.stage_key(base), override
    for override in ("trainer.lr=2e-3", "seed=1", "data.num_train=5000", "model.dtype=bfloat16"):
        assert stages.stage_key(load_config("quickstart", overrides=[override])) != stages.stage_key(base), override

    from optsys.models.tiny import cache_root, default_cache_dir

    monkeypatch.setenv("OPTSYS_CACHE_DIR", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c" and default_cache_dir() == tmp_path / "c" / "tiny"
    assert stages.stage_root() == tmp_path / "c" / "stages"
    monkeypatch.delenv("OPTSYS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert stages.stage_root() == tmp_path / "xdg" / "optsys" / "stages"


TORCHRUN_SCRIPT = """
import sys
from pathlib import Path
import optsys.checkpoint
import optsys.config
optsys.config.RECIPES_DIR = Path(sys.argv[1])
from optsys.train import main
main(["--recipe", "main", f"output_dir={sys.argv[2]}"])
"""


@pytest.mark.slow
def test_torchrun_ranks_train_the_stage_then_the_run(tmp_path, recipes):
    """Two ranks: the same ranks train the 3-step stage (FSDP2) and then the main run; a second job reuses it."""
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {"OPTSYS_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}

    def job(out):
        return run_torchrun([script, tmp_path / "recipes", out], env=env, timeout=300)

    first = job(tmp_path / "one")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("stage sft_stage: training it first") == 1
    (folder,) = stage_dirs(tmp_path)
    stage = tmp_path / "cache" / "stages" / folder
    assert json.loads((stage / "summary.json").read_text())["parallel/world_size"] == 2
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["model/stage"] == str(stage / "final") and summary["parallel/world_size"] == 2
    second = job(tmp_path / "two")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "stage sft_stage: reusing" in second.stdout and "training it first" not in second.stdout


def test_resolving_a_stage_under_torchrun_needs_the_trainers_group(recipes, monkeypatch):
    """Ranks outside a process group could not agree who trains: refused at once (no hang), saying what to do."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"train the stage first in one process \(python -m optsys.train "
                                          r"--recipe <stage>; it is cached in .*stages\)"):
        sources.resolve_stage("stage:sft_stage")
