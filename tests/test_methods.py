"""The method registry (optsys.methods) agrees with the losses, the trainers and the config it drives."""

import inspect

import pytest

from optsys.config import ConfigError, PreferenceConfig, RewardConfig, TrainConfig, dump_yaml
from optsys.losses import PREFERENCE_LOSSES
from optsys.methods import FAMILY_SECTIONS, METHODS, takes
from optsys.validation import load_config


def test_every_preference_method_has_its_loss_and_the_loss_takes_its_hyper_parameters():
    pref = [name for name, m in METHODS.items() if m.section == "pref"]
    assert sorted(pref) == sorted(PREFERENCE_LOSSES)
    for name in pref:
        spec = PREFERENCE_LOSSES[name]
        assert METHODS[name].reference == spec.needs_reference, name
        params = inspect.signature(spec.fn).parameters
        keyword = {k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        fields = set(PreferenceConfig.__dataclass_fields__)
        # every hyper-parameter the registry passes is a keyword of the loss and a key of cfg.pref ...
        assert set(METHODS[name].hyper) <= keyword & fields, name
        # ... and every pref key the loss takes is passed (nothing a user sets is dropped on the way)
        assert keyword & fields <= set(METHODS[name].hyper), name
    assert set(METHODS["rm"].hyper) <= set(RewardConfig.__dataclass_fields__)
    assert takes("label_smoothing") == ["dpo", "robust", "simpo", "cpo"]
    # pref.rpo_alpha: the paired losses without an NLL term of their own (the trainer adds it)
    assert [n for n, m in METHODS.items() if m.rpo] == ["dpo", "robust", "ipo", "simpo"]


def test_sections_exist_and_trainers_import():
    import importlib

    for name, m in METHODS.items():
        assert m.section is None or m.section in TrainConfig.__dataclass_fields__, name
        assert callable(importlib.import_module(m.trainer).train), name
    assert FAMILY_SECTIONS == ["pref", "rl", "rm"]


def test_unknown_method_names_the_key_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"method='dpoo' is not a training method \(did you mean 'dpo'\?\)"):
        load_config(overrides=["method=dpoo"])


@pytest.mark.parametrize("method, kept, dropped", [("sft", [], ["pref", "rm"]), ("dpo", ["pref"], ["rm"]),
                                                   ("rm", ["rm"], ["pref"])])
def test_a_run_config_carries_only_its_family_section(method, kept, dropped):
    import yaml

    dumped = yaml.safe_load(dump_yaml(load_config(overrides=[f"method={method}"])))
    assert all(k in dumped for k in kept) and not any(k in dumped for k in dropped)
    assert dumped["method"] == method


@pytest.mark.parametrize("overrides, words", [
    (["method=ipo", "pref.label_smoothing=0.1"], "pref.label_smoothing=0.1 is not used by method=ipo (methods whose "
                                                 "loss takes it: dpo, robust, simpo, cpo)"),
    (["method=kto", "pref.label_smoothing=0.1"], "is not used by method=kto"),
    (["method=orpo", "pref.beta=0.5"], "pref.beta=0.5 is not used by method=orpo"),
    (["method=dpo", "pref.gamma=2"], "pref.gamma=2.0 is not used by method=dpo (methods whose loss takes it: simpo)"),
    (["method=dpo", "rm.margin=1"], "rm.margin=1.0: method=dpo does not read the rm section (its methods: rm)"),
    (["method=sft", "pref.beta=0.2"], "method=sft does not read the pref section"),
    (["method=rm", "pref.reference=copy"], "method=rm does not read the pref section"),
    (["method=simpo", "pref.reference=copy"], "pref.reference=copy has no effect: method=simpo is reference-free"),
])
def test_settings_a_method_would_ignore_are_refused(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert words in str(e.value)


def test_every_shipped_recipe_sets_only_what_its_method_reads():
    from optsys.config import RECIPES_DIR

    recipes = sorted(RECIPES_DIR.glob("*.yaml"))
    assert len(recipes) >= 8
    for path in recipes:  # load_config raises ConfigError on a setting the recipe's method would ignore
        import yaml

        data = yaml.safe_load(path.read_text()).get("data", {})
        full_size = data.get("task", "default") is None and data.get("dataset") is None  # "required: ..." datasets
        cfg = load_config(path.stem, overrides=["data.dataset=x.jsonl"] if full_size else [])
        assert cfg.recipe == path.stem and cfg.method in METHODS
