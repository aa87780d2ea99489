import pytest

from optsys.config import ConfigError, TrainConfig, dump_yaml, load_config


def test_default_is_quickstart_recipe():
    cfg = load_config()
    assert cfg.recipe == "quickstart"
    assert cfg.method == "sft"
    assert cfg.model.name_or_path == "tiny:quickstart"
    assert cfg.trainer.max_steps == 2500 and cfg.data.task == "arithmetic_reversed"


def test_overrides_are_typed():
    cfg = load_config("quickstart", overrides=["trainer.lr=2e-5", "data.max_tokens=4096", "trainer.progress=false",
                                              "trainer.betas=[0.8,0.9]", "output_dir=/tmp/x", "data.eval_dataset=null"])
    assert cfg.trainer.lr == pytest.approx(2e-5) and isinstance(cfg.trainer.lr, float)
    assert cfg.data.max_tokens == 4096 and isinstance(cfg.data.max_tokens, int)
    assert cfg.trainer.progress is False
    assert cfg.trainer.betas == (0.8, 0.9)
    assert cfg.output_dir == "/tmp/x"
    assert cfg.data.eval_dataset is None


@pytest.mark.parametrize(
    "override, words",
    [
        ("trainer.lr=abc", ["trainer.lr", "abc"]),
        ("trainer.lrr=1", ["trainer.lrr", "did you mean 'lr'"]),
        ("trainr.lr=1", ["trainr", "did you mean 'trainer'"]),
        ("data.max_tokens=1.5", ["data.max_tokens", "integer"]),
        ("trainer.progress=maybe", ["trainer.progress", "true or false"]),
        ("data.overlong=drop", ["data.overlong", "truncate"]),
        ("data.max_tokens=0", ["data.max_tokens", "positive"]),
        ("data.task=arithmetc", ["arithmetc", "did you mean 'arithmetic'"]),
        ("trainer.lr", ["key.sub=value"]),
    ],
)
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("quickstart", overrides=[override])
    for w in words:
        assert w in str(e.value)


def test_task_and_dataset_are_exclusive():
    with pytest.raises(ConfigError, match="exactly one of data.task"):
        load_config(overrides=["data.dataset=rows.jsonl"])
    cfg = load_config(overrides=["data.dataset=rows.jsonl", "data.task=null"])
    assert cfg.data.dataset == "rows.jsonl" and cfg.data.task is None


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="unknown recipe 'quickstrat'.*did you mean 'quickstart'"):
        load_config("quickstrat")


def test_config_file_roundtrip(tmp_path):
    cfg = load_config(overrides=["trainer.lr=0.01"])
    path = tmp_path / "my.yaml"
    path.write_text(dump_yaml(cfg))
    again = load_config(config_file=str(path))
    assert again == cfg


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(config_file=str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(config_file=str(bad))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("trainer: 3\n")
    with pytest.raises(ConfigError, match="trainer expects a mapping"):
        load_config(config_file=str(wrong))


def test_defaults_validate_and_a_broken_default_does_not():
    TrainConfig().validate()  # raises ConfigError if the shipped defaults were inconsistent
    broken = TrainConfig()
    broken.data.dataset = "rows.jsonl"  # now both data.task and data.dataset are set
    with pytest.raises(ConfigError, match="exactly one of data.task"):
        broken.validate()


def test_every_shipped_recipe_loads_and_validates():
    """Each YAML in optsys/recipes fills the dataclasses without unknown keys or bad values (full-size
    ones need only their dataset named)."""
    from optsys.config import RECIPES_DIR

    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    assert {"quickstart", "dpo_tiny", "orpo_tiny", "simpo_tiny", "kto_tiny", "rm_tiny", "dpo_llama3_8b",
            "rm_llama3_8b"} <= set(names)
    for name in names:
        full_size = "tiny" not in name and name != "quickstart"
        cfg = load_config(name, overrides=["data.dataset=pairs.jsonl"] if full_size else [])
        assert cfg.recipe == name
