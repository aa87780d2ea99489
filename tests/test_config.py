import json

import pytest

from optsys.config import ConfigError, TrainConfig, dump_yaml
from optsys.validation import load_config


def test_default_is_quickstart_recipe():
    cfg = load_config()
    assert cfg.recipe == "quickstart"
    assert cfg.method == "sft"
    assert cfg.model.name_or_path == "tiny:quickstart"
    assert cfg.trainer.max_steps == 2500 and cfg.data.task == "arithmetic_reversed"


def test_overrides_are_typed():
    cfg = load_config("quickstart", overrides=["trainer.lr=2e-5", "data.max_tokens=4096", "trainer.batch_tokens=8192",
                                              "trainer.progress=false",
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
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("recipe: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin.yaml is not UTF-8"):
        load_config(config_file=str(latin))
    with pytest.raises(ConfigError, match="is a folder; pass a YAML file"):
        load_config(config_file=str(tmp_path))


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
    import yaml

    for name in names:
        data = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text()).get("data", {})
        full_size = data.get("task", "default") is None and data.get("dataset") is None  # "required: ..." datasets
        cfg = load_config(name, overrides=["data.dataset=pairs.jsonl"] if full_size else [])
        assert cfg.recipe == name


# ---------------------------------------------------------------------------- bad input, refused before any load
# Each case: recipe, overrides -> words the ConfigError must contain (the key, the bound, the fix). The table in
# tests/README.md lists these with every other bad-input case.
BAD = [
    # ranges
    ("quickstart", ["trainer.lr=0"], ["trainer.lr", "positive"]),
    ("quickstart", ["trainer.lr=nan"], ["trainer.lr", "finite"]),
    ("quickstart", ["trainer.lr=inf"], ["trainer.lr", "finite"]),
    ("quickstart", ["trainer.max_steps=0"], ["trainer.max_steps", "positive"]),
    ("quickstart", ["trainer.min_lr_ratio=5"], ["trainer.min_lr_ratio", "[0, 1]", "got 5.0"]),
    ("quickstart", ["trainer.min_lr_ratio=-0.1"], ["trainer.min_lr_ratio", "[0, 1]"]),
    ("quickstart", ["trainer.grad_clip=-1"], ["trainer.grad_clip", ">= 0", "0 disables"]),
    ("quickstart", ["trainer.warmup_steps=-1"], ["trainer.warmup_steps", ">= 0"]),
    ("quickstart", ["trainer.weight_decay=-0.1"], ["trainer.weight_decay", ">= 0"]),
    ("quickstart", ["trainer.betas=[0.9,1.0]"], ["trainer.betas[1]", "[0, 1)"]),
    ("quickstart", ["trainer.betas=[-0.1,0.9]"], ["trainer.betas[0]", "[0, 1)"]),
    ("quickstart", ["trainer.batch_tokens=0"], ["trainer.batch_tokens", "positive"]),
    ("quickstart", ["trainer.batch_tokens=128"], ["trainer.batch_tokens=128", "data.max_tokens=256"]),
    ("quickstart", ["trainer.log_every=0"], ["trainer.log_every", "positive"]),
    ("quickstart", ["trainer.eval_every=-1"], ["trainer.eval_every", ">= 0"]),
    ("quickstart", ["trainer.save_every=-1"], ["trainer.save_every", ">= 0"]),
    ("quickstart", ["eval.batch_size=0"], ["eval.batch_size", "positive"]),
    ("quickstart", ["eval.max_new_tokens=0"], ["eval.max_new_tokens", "positive"]),
    ("quickstart", ["model.lora.r=-1"], ["model.lora.r", ">= 0"]),
    ("quickstart", ["model.lora.r=4", "model.lora.alpha=0"], ["model.lora.alpha", "positive"]),
    ("quickstart", ["model.lora.r=4", "model.lora.dropout=1.0"], ["model.lora.dropout", "[0, 1)"]),
    ("quickstart", ["model.lora.quantize=nf4"], ["model.lora.r must be > 0 for QLoRA"]),
    ("quickstart", ["model.lora.r=4", "model.lora.target_modules=[]"], ["model.lora.target_modules", "empty"]),
    ("dpo_tiny", ["pref.beta=0"], ["pref.beta", "positive", "constant"]),
    ("dpo_tiny", ["pref.label_smoothing=0.7"], ["pref.label_smoothing", "[0, 0.5)"]),
    ("dpo_tiny", ["pref.label_smoothing=0.5"], ["pref.label_smoothing", "[0, 0.5)"]),
    ("simpo_tiny", ["pref.gamma=-1"], ["pref.gamma", ">= 0"]),
    ("orpo_tiny", ["pref.lam=0"], ["pref.lam", "positive"]),
    ("dpo_tiny", ["method=cpo", "pref.alpha=-1"], ["pref.alpha", ">= 0"]),
    ("kto_tiny", ["pref.undesirable_weight=-1"], ["pref.undesirable_weight", ">= 0"]),
    ("dpo_tiny", ["pref.rpo_alpha=0"], ["pref.rpo_alpha must be a finite number > 0", "null turns the NLL term off"]),
    ("dpo_tiny", ["pref.rpo_alpha=-1"], ["pref.rpo_alpha must be a finite number > 0"]),
    ("dpo_tiny", ["pref.rpo_alpha=inf"], ["pref.rpo_alpha must be a finite number"]),
    ("kto_tiny", ["pref.desirable_weight=0", "pref.undesirable_weight=0"], ["both 0"]),
    ("rm_tiny", ["rm.center_coef=-0.1"], ["rm.center_coef", ">= 0"]),
    ("rm_tiny", ["rm.margin=nan"], ["rm.margin", "finite"]),
    # built-in task sizes
    ("quickstart", ["data.num_train=0"], ["data.num_train", ">= 1"]),
    ("quickstart", ["data.num_eval=0"], ["data.num_eval", ">= 1", "eval.before=false"]),
    ("quickstart", ["data.difficulty=0"], ["data.difficulty", ">= 1"]),
    ("quickstart", ["data.difficulty=1", "data.num_train=5000"],
     ["88 distinct training and 12 held-out", "data.num_train=5000", "data.num_eval=500", "raise data.difficulty"]),
    ("quickstart", ["data.num_eval=1500"], ["1019 held-out", "data.num_eval=1500"]),
    ("quickstart", ["data.task=sorting", "data.difficulty=3", "data.num_train=999990"],
     ["1000000 distinct problems", "data.num_train=999990"]),
    # settings the method would ignore
    ("dpo_tiny", ["method=ipo", "pref.label_smoothing=0.1"],
     ["pref.label_smoothing=0.1", "method=ipo", "loss takes it: dpo, robust, simpo, cpo"]),
    ("orpo_tiny", ["pref.label_smoothing=0.1"], ["pref.label_smoothing", "method=orpo"]),
    ("kto_tiny", ["pref.label_smoothing=0.1"], ["pref.label_smoothing", "method=kto"]),
    ("orpo_tiny", ["pref.rpo_alpha=1"], ["pref.rpo_alpha=1.0", "for methods dpo, robust, ipo, simpo",
                                         "method=orpo already has an NLL term", "pref.rpo_alpha=null"]),
    ("dpo_tiny", ["method=cpo", "pref.beta=0.1", "pref.rpo_alpha=1"],
     ["method=cpo already has an NLL term", "weighted by pref.alpha", "pref.rpo_alpha=null"]),
    ("kto_tiny", ["pref.rpo_alpha=1"], ["method=kto is unpaired", "pref.rpo_alpha=null"]),
    ("quickstart", ["pref.rpo_alpha=1"], ["pref.rpo_alpha=1.0", "method=sft does not read the pref section"]),
    ("dpo_tiny", ["data.train_on_prompt=true"], ["data.train_on_prompt", "method=dpo"]),
    ("rm_tiny", ["data.train_on_prompt=true"], ["data.train_on_prompt", "method=rm"]),
    ("dpo_tiny", ["data.packing=false"], ["data.packing=false", "method=sft only"]),
    ("quickstart", ["data.on_bad_pair=skip"], ["data.on_bad_pair", "method=sft"]),
    ("quickstart", ["pref.beta=0.5"], ["pref.beta", "method=sft does not read the pref section", "pref.beta=null"]),
    ("dpo_tiny", ["eval.loss_max_rows=10"], ["eval.loss_max_rows", "method=dpo computes no eval/loss"]),
    ("quickstart", ["eval.loss_max_rows=-1"], ["eval.loss_max_rows"]),
    ("dpo_tiny", ["rm.margin=1"], ["rm.margin", "method=dpo"]),
    ("simpo_tiny", ["pref.reference=copy"], ["reference-free", "pref.reference=copy"]),
    ("quickstart", ["model.lora.save_merged=true"], ["model.lora.save_merged", "model.lora.r=0"]),
    ("rm_tiny", ["model.lora.r=4", "model.lora.save_merged=true"], ["method=rm", "final-adapter"]),
    ("quickstart", ["data.eval_dataset=rows.jsonl"], ["data.eval_dataset", "data.task=arithmetic_reversed"]),
    ("quickstart", ["data.split=validation"], ["data.split", "fixed train/test splits"]),
    # device and model
    ("quickstart", ["device=tpu"], ["device='tpu'", "auto, cpu, cuda or cuda:<index>"]),
    ("quickstart", ["device=cuda:x"], ["device='cuda:x'"]),
    ("quickstart", ["model.name_or_path=tiny:huge"], ["model.name_or_path", "tiny preset 'huge'"]),
    ("quickstart", ["model.name_or_path=./no/such/model"], ["model.name_or_path", "does not exist"]),
    ("quickstart", ["model.name_or_path=/no/such"], ["model.name_or_path", "does not exist"]),
    ("dpo_tiny", ["pref.reference_model=~/no/such"], ["pref.reference_model", "does not exist"]),
    # the run folder; a recipe's setting the new method does not take names the way to drop it
    ("quickstart", ["output_dir="], ["output_dir is empty", "runs/<recipe>-<timestamp>"]),
    ("dpo_tiny", ["method=orpo"], ["pref.beta=0.5 is not used by method=orpo", "pref.beta=null"]),
    # RL group sizes: GRPO-family advantages compare completions of one prompt
    ("grpo_tiny", ["rl.group_size=0"], ["rl.group_size must be >= 2 for method=grpo"]),
    ("ppo_tiny", ["rl.group_size=0"], ["rl.group_size must be >= 1"]),
]


@pytest.mark.parametrize("recipe, overrides, words", BAD, ids=[f"{r}:{' '.join(o)}" for r, o, _ in BAD])
def test_bad_settings_are_refused_naming_the_key(recipe, overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(recipe, overrides=overrides)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_the_bounds_themselves_are_accepted():
    """The edges of each range load (a check that refused its own bound would fail here)."""
    load_config("quickstart", overrides=["trainer.min_lr_ratio=1", "trainer.grad_clip=0", "trainer.betas=[0,0.999]",
                                         "trainer.batch_tokens=256", "trainer.warmup_steps=0"])
    load_config("quickstart", overrides=["trainer.min_lr_ratio=0"])
    load_config("quickstart", overrides=["data.difficulty=1", "data.num_train=88", "data.num_eval=12"])
    load_config("dpo_tiny", overrides=["pref.label_smoothing=0.49", "method=robust"])
    load_config("dpo_tiny", overrides=["method=cpo", "pref.label_smoothing=0.2", "pref.alpha=0"])
    load_config("kto_tiny", overrides=["pref.desirable_weight=0"])
    for method in ("dpo", "robust", "ipo"):  # and simpo (simpo_tiny): the methods that take pref.rpo_alpha
        assert load_config("dpo_tiny", overrides=[f"method={method}", "pref.rpo_alpha=1e-6"]).pref.rpo_alpha == 1e-6
    assert load_config("simpo_tiny", overrides=["pref.rpo_alpha=2"]).pref.rpo_alpha == 2.0


def test_cuda_without_a_gpu_is_refused():
    import torch

    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"device=cuda:99, but this machine has \d+ CUDA device"):
            load_config(overrides=["device=cuda:99"])
    else:
        with pytest.raises(ConfigError, match="device=cuda but no CUDA device is available"):
            load_config(overrides=["device=cuda"])


def test_save_merged_under_torchrun_is_refused(monkeypatch):
    overrides = ["model.lora.r=4", "model.lora.save_merged=true"]
    load_config(overrides=overrides)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="model.lora.save_merged=true is not supported under torchrun"):
        load_config(overrides=overrides)


def test_model_folder_checks(tmp_path):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"model.name_or_path=.*no-weights.*holds no \*.safetensors"):
        load_config(overrides=[f"model.name_or_path={empty}"])
    with pytest.raises(ConfigError, match=r"model.name_or_path=.*is a file"):
        load_config(overrides=[f"model.name_or_path={empty / 'pytorch_model.bin'}"])
    (empty / "model.safetensors").write_bytes(b"")
    assert load_config(overrides=[f"model.name_or_path={empty}"]).model.name_or_path == str(empty)
    assert load_config(overrides=["model.name_or_path=org/model"]).model.name_or_path == "org/model"  # a hub id


def test_unreachable_hub_id_is_a_config_error(monkeypatch):
    import transformers

    from optsys.models.load import load_tokenizer

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ConfigError, match=r"cannot load model 'org/model' \(model.name_or_path.*couldn't connect"):
        load_tokenizer("org/model")


def test_unknown_lora_target_is_a_config_error(tiny_path):
    """Known only once the model is built: still a ConfigError (one paragraph from the CLI), naming the key."""
    import torch

    from optsys.config import LoraConfig, ModelConfig
    from optsys.models.load import load_model_and_tokenizer

    cfg = ModelConfig(name_or_path=str(tiny_path), lora=LoraConfig(r=4, target_modules=["qkv"]))
    with pytest.raises(ConfigError, match=r"model.lora.target_modules names \['qkv'\]"):
        load_model_and_tokenizer(cfg, torch.device("cpu"))


def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path):
    """YAML's safe_load keeps the last of two equal keys, silently; optsys names the key and both lines."""
    path = tmp_path / "dup.yaml"
    path.write_text("method: sft\ntrainer:\n  lr: 0.1\n  max_steps: 3\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"dup.yaml.*key 'lr' appears twice in one mapping \(lines 3 and 5\)"):
        load_config(config_file=str(path))
    path.write_text("method: sft\ntrainer:\n  lr: 0.1\neval:\n  lr: 0.2\n")  # one key per mapping is fine
    with pytest.raises(ConfigError, match="unknown config key 'eval.lr'"):
        load_config(config_file=str(path))


def test_null_drops_a_recipe_value_and_still_means_none_where_none_is_allowed():
    """`pref.beta=null` takes a recipe's value back to the default (the way out the 'not used by' error offers);
    on a key that may be None (data.task) it is None, as before."""
    from optsys.config import PreferenceConfig

    cfg = load_config("dpo_tiny", overrides=["method=orpo", "pref.beta=null"])
    assert cfg.method == "orpo" and cfg.pref.beta == PreferenceConfig().beta
    cfg = load_config(overrides=["data.dataset=rows.jsonl", "data.task=null"])
    assert cfg.data.task is None


def test_a_recipe_of_the_other_entry_point_says_which_to_run():
    from optsys.eval.config import load_eval_config

    with pytest.raises(ConfigError, match="'scaling_tiny' is an eval recipe.*python -m optsys.eval --recipe "
                                          "scaling_tiny"):
        load_config("scaling_tiny")
    with pytest.raises(ConfigError, match="'quickstart' is a training recipe.*python -m optsys.train --recipe "
                                          "quickstart"):
        load_eval_config("quickstart")


def test_a_run_folder_or_a_lora_adapter_as_the_model_says_what_to_use(tmp_path):
    """Both hold *.safetensors somewhere optsys writes them, and neither is a model: a run's model is <run>/final;
    an adapter folder would load over its base with every weight frozen and fail in backward."""
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text("method: sft\n")
    with pytest.raises(ConfigError, match=f"is a training run's folder.*use {run / 'final'}"):
        load_config(overrides=[f"model.name_or_path={run}"])
    adapter = run / "final"
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "base/model", "r": 4}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    for key in ("model.name_or_path", "rl.teacher"):
        recipe = "distill_tiny" if key == "rl.teacher" else "quickstart"
        with pytest.raises(ConfigError, match=rf"{key}=.*is a LoRA adapter.*\(base/model\).*save_merged=true"):
            load_config(recipe, overrides=[f"{key}={adapter}"])
