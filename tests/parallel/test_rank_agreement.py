"""Ranks that loaded different inputs stop together with a clear error (torchrun --nnodes: a node with its own
cache or folder), instead of FSDP2 training a silently mixed model."""

import json
import os

import torch
from helpers import REPO_ROOT, run_torchrun

from optsys.parallel.dist import weight_checksums

SCRIPT = r'''
import hashlib, json, os, sys
from pathlib import Path
import torch
from optsys.config import ConfigError
from optsys.validation import load_config
from optsys.models.tiny import build_tiny
from optsys.parallel.dist import barrier, rank0_mismatch, torchrun_world, weight_checksums
from optsys.sources import ensure_stage
from optsys.stages import stage_config
from optsys.trainers.common import ready_for_training
from optsys.trainers.run import run_output_dir
from optsys.trainers.precision import resolve_precision

root = Path(sys.argv[1])


def outcome(fn):
    try:
        return {"ok": str(fn())}
    except ConfigError as e:
        return {"error": str(e)}


def model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))


def stage(cache):
    os.environ["OPTSYS_CACHE_DIR"] = str(root / cache)
    return ensure_stage(stage_config("quickstart"))


with torchrun_world("cpu") as world:
    r = world.rank
    result = {"same": rank0_mismatch("weights", weight_checksums(model(0)), world)}
    p = resolve_precision("auto", "float32", world.device)
    result["weights"] = outcome(lambda: ready_for_training(model(r), world, p))  # rank 1: another init
    (root / f"cwd{r}").mkdir()
    if r == 0:  # a complete stage (summary.json + final weights) in the shared cache root only
        os.environ["OPTSYS_CACHE_DIR"] = str(root / "shared")
        out = Path(stage_config("quickstart").output_dir)
        (out / "final").mkdir(parents=True)
        (out / "final" / "model.safetensors").write_bytes(b"")
        (out / "summary.json").write_text("{}")
    barrier(world)
    result["shared_cache"] = outcome(lambda: stage("shared"))
    result["own_cache"] = outcome(lambda: stage("shared" if r == 0 else f"rank{r}"))  # node 1's local disk
    cfg = lambda out: load_config("quickstart", overrides=[f"output_dir={out}"])  # noqa: E731
    result["shared_out"] = outcome(lambda: run_output_dir(cfg(root / "out"), world))
    os.chdir(root / f"cwd{r}")  # a relative output_dir on ranks in different working directories (not shared)
    result["relative_out"] = outcome(lambda: run_output_dir(cfg("out"), world))
    tiny = build_tiny("test", cache_dir=root / f"tiny{r}")  # each rank its own cache, inside the group
    result["tiny"] = sorted(p.name for p in tiny.iterdir())
    result["tiny_sha256"] = hashlib.sha256((tiny / "model.safetensors").read_bytes()).hexdigest()
(root / f"rank{r}.json").write_text(json.dumps(result))
'''


def test_weight_checksums_are_exact_and_tell_inits_apart():
    torch.manual_seed(0)
    a = torch.nn.Linear(7, 3)
    b = torch.nn.Linear(7, 3)
    b.load_state_dict(a.state_dict())
    assert weight_checksums(a) == weight_checksums(b) and set(weight_checksums(a)) == {"weight", "bias"}
    with torch.no_grad():
        b.weight[2, 6] = torch.nextafter(b.weight[2, 6], torch.tensor(1.0))  # one ulp in one element
    assert weight_checksums(a)["weight"] != weight_checksums(b)["weight"]
    assert weight_checksums(a)["bias"] == weight_checksums(b)["bias"]
    half, other = torch.nn.Linear(7, 3).to(torch.bfloat16), torch.nn.Linear(7, 3).to(torch.bfloat16)
    other.load_state_dict(half.state_dict())  # 2-byte weights: summed as int16 bits
    assert weight_checksums(half) == weight_checksums(other) and len(weight_checksums(half)) == 2
    with torch.no_grad():
        other.bias[0] = -other.bias[0]  # a sign bit
    assert weight_checksums(half)["bias"] != weight_checksums(other)["bias"]


def test_ranks_with_different_weights_or_cache_views_stop_alike(tmp_path):
    """Two ranks: the same weights pass; other weights on rank 1 are a ConfigError on both ranks naming rank 1 and
    the first differing parameter; a stage in a shared cache root is reused by both; a rank whose cache root is
    its own (a node-local disk) makes both ranks stop with the error that says to share OPTSYS_CACHE_DIR; so
    does an output_dir that rank 1 does not share (relative, in another working directory). A tiny
    model built by rank 1 inside the group is complete (transformers saves weights on rank 0 only) and the same
    bytes as rank 0's, so node-local tiny caches agree."""
    script = tmp_path / "agree.py"
    script.write_text(SCRIPT)
    res = run_torchrun([script, tmp_path], timeout=300,
                       env={"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])})
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in ranks:
        assert result["same"] is None
        assert result["weights"]["error"] == ranks[0]["weights"]["error"]  # every rank raises the same error
        assert "the loaded weights differ from rank 0's" in result["weights"]["error"]
        assert "on 1 of 2 ranks: rank 1 on" in result["weights"]["error"]
        assert "4 of 4 entries differ (0.bias, 0.weight, 1.bias, ...)" in result["weights"]["error"]
        assert "OPTSYS_CACHE_DIR" in result["weights"]["error"]
        assert result["shared_cache"]["ok"].startswith(str(tmp_path / "shared" / "stages" / "quickstart-"))
        error = result["own_cache"]["error"]
        assert "stage quickstart: the ranks' views of its cache folder" in error and "rank 1 on" in error
        assert "2 of 2 entries differ (complete, folder)" in error and "filesystem every node shares" in error
        assert error == ranks[0]["own_cache"]["error"]
        assert result["shared_out"] == {"ok": str(tmp_path / "out")}
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.yaml"]  # the probe is gone
        error = result["relative_out"]["error"]
        assert error.startswith("the ranks' views of output_dir out differ from rank 0's") and "rank 1 on" in error
        assert "1 of 1 entries differ (sees rank 0's files)" in error and "filesystem every node shares" in error
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(result["tiny"])
    assert ranks[0]["tiny_sha256"] == ranks[1]["tiny_sha256"]
