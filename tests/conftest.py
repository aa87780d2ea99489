"""Shared fixtures. The tiny-model cache lives in a per-session temp folder so tests never
depend on what an earlier run left in ~/.cache."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="session")
def tiny_path(tiny_cache):
    from optsys.models.tiny import build_tiny

    return build_tiny("test", seed=0, cache_dir=tiny_cache)


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """The default job, run once per session for the slow tests that need a trained model:
    returns (summary, output dir). Its final/ is the SFT'd model the DPO test starts from."""
    from optsys.config import load_config
    from optsys.trainers import sft

    out = tmp_path_factory.mktemp("quickstart") / "run"
    cfg = load_config("quickstart", overrides=[f"output_dir={out}", "trainer.progress=false"])
    return sft.train(cfg), out
