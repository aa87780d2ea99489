import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from optsys.models.tiny import PRESETS, build_tiny


def test_tiny_folder_loads_with_transformers(tiny_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    tok = AutoTokenizer.from_pretrained(tiny_path)
    cfg = json.loads((tiny_path / "config.json").read_text())
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64  # vLLM's CPU backend needs this
    assert (tiny_path / "model.safetensors").exists()
    assert not list(tiny_path.glob("*.bin"))
    ids = tok("12+345=")["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[:3] == ["1", "2", "+"]  # one token per digit
    text = tok.apply_chat_template([{"role": "user", "content": "1+1="}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tok.eos_token_id
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    assert out.logits.shape == (1, len(ids), cfg["vocab_size"])


def test_deterministic_for_a_seed(tmp_path, tiny_path):
    again = build_tiny("test", seed=0, cache_dir=tmp_path)
    a, b = load_file(tiny_path / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = load_file(build_tiny("test", seed=1, cache_dir=tmp_path) / "model.safetensors")
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_llama_preset(tiny_cache):
    model = AutoModelForCausalLM.from_pretrained(build_tiny("test-llama", cache_dir=tiny_cache))
    assert model.config.model_type == "llama"


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown tiny preset 'huge'"):
        build_tiny("huge")


def test_presets_use_head_dim_64():
    for name, spec in PRESETS.items():
        assert spec.hidden_size // spec.num_heads == 64, name


def test_a_cache_dir_that_is_a_file_is_a_config_error(tmp_path, monkeypatch):
    """OPTSYS_CACHE_DIR pointing at a file (or below one) is named, not a NotADirectoryError from mkdir."""
    from optsys.errors import ConfigError
    from optsys.models.tiny import build_tiny, cache_root

    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("OPTSYS_CACHE_DIR", str(tmp_path / "afile"))
    with pytest.raises(ConfigError, match=r"OPTSYS_CACHE_DIR=.*afile is a file; point it at a folder"):
        build_tiny("test")
    monkeypatch.setenv("OPTSYS_CACHE_DIR", str(tmp_path / "afile" / "cache"))
    with pytest.raises(ConfigError, match=r"OPTSYS_CACHE_DIR=.*cannot be created: .*afile is a file"):
        cache_root()
    monkeypatch.setenv("OPTSYS_CACHE_DIR", str(tmp_path / "new" / "cache"))
    assert cache_root() == tmp_path / "new" / "cache"  # a folder that does not exist yet is fine
