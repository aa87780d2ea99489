"""DeepSpeed ZeRO as the SFT backend (parallel.backend=deepspeed): the generated config, bad input, and 2-process
runs on gloo: a ZeRO-3 job follows the 1-process loss curve, and when its rank 1 dies mid-run it resumes and
continues exactly (the steps it logged after its checkpoint come out bit for bit the same). One 2-process
scenario fits CI's time: ZeRO-3 partitions the weights too, so it runs every path ZeRO-2 runs and more (ZeRO-2 was
checked by hand the same way; README.md, GPUs and torchrun)."""

import importlib.util
import json
import sys

import pytest
import torch
from failing_rank import failing_rank_script
from helpers import needs_no_cuda, profiling_dry_run, run_torchrun, sft_run_overrides, train_losses
from safetensors.torch import load_file

import optsys.checkpoint as ck
from optsys.config import ConfigError
from optsys.parallel.zero import deepspeed_config
from optsys.validation import load_config

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install deepspeed; the dev extra has it)")


def overrides(tiny_path, out):
    # As tests/parallel/test_distributed.py (steps of ~3 micro-batches for 2 ranks: uneven shares, zero-weight
    # fillers), 8 steps, a checkpoint at step 4 (and at the end).
    return sft_run_overrides(tiny_path, out, "data.max_tokens=128", "trainer.batch_tokens=360", "trainer.max_steps=8",
                             "trainer.save_every=4", "trainer.tensorboard=false")


def rows(out):
    found = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            found[row["step"]] = row
    return found


# ---------------------------------------------------------------------------- config (no DeepSpeed needed)


def test_generated_config_maps_the_token_budget_precision_and_clipping():
    cfg = deepspeed_config(zero_stage=3, batch_tokens=4096, max_tokens=1024, world_size=2, grad_clip=0.5, bf16=True)
    json.dumps(cfg)  # written as JSON
    # a micro-batch is one packed row; a step of full rows is 4096 / 1024 = 4 rows, 2 per rank
    assert cfg["train_micro_batch_size_per_gpu"] == 1
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 4  # DeepSpeed asserts micro x accumulation x world == train_batch_size
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["zero_optimization"] == {"stage": 3}
    # rounded up to whole rows, and at least one per rank
    odd = deepspeed_config(zero_stage=2, batch_tokens=4097, max_tokens=1024, world_size=2, grad_clip=0, bf16=False)
    assert (odd["gradient_accumulation_steps"], odd["train_batch_size"]) == (3, 6)
    assert odd["bf16"] == {"enabled": False} and odd["gradient_clipping"] == 0.0
    wide = deepspeed_config(zero_stage=2, batch_tokens=1024, max_tokens=1024, world_size=8, grad_clip=1, bf16=False)
    assert (wide["gradient_accumulation_steps"], wide["train_batch_size"]) == (1, 8)


@pytest.mark.parametrize("recipe, extra, words", [
    ("dpo_tiny", ["parallel.backend=deepspeed"], r"implemented for method=sft only; method=dpo runs on "
                                                 r"parallel.backend=fsdp2"),
    ("rm_tiny", ["parallel.backend=deepspeed"], r"method=rm runs on parallel.backend=fsdp2"),
    ("quickstart", ["parallel.zero_stage=3"], r"parallel.zero_stage=3 applies to parallel.backend=deepspeed"),
    ("quickstart", ["parallel.backend=deepspeed", "parallel.zero_stage=1"], r"parallel.zero_stage must be 2 .* or 3"),
    ("quickstart", ["parallel.backend=deepspeed", "model.lora.r=8"], r"trains full weights; model.lora.r > 0"),
    ("quickstart", ["parallel.backend=zero3"], r"parallel.backend='zero3' is not one of \['fsdp2', 'deepspeed'\]"),
    ("quickstart", ["parallel.zero_stage=two"], r"parallel.zero_stage expects an integer"),
])
def test_bad_parallel_settings_are_refused_naming_the_key(recipe, extra, words):
    with pytest.raises(ConfigError, match=words):
        load_config(recipe, overrides=extra)


def test_deepspeed_without_the_package_is_refused_before_anything_loads(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # importlib.util.find_spec("deepspeed") -> None
    with pytest.raises(ConfigError, match=r"parallel.backend=deepspeed needs the deepspeed package, which is not "
                                          r"installed: pip install deepspeed"):
        load_config("quickstart", overrides=["parallel.backend=deepspeed"])
    load_config("quickstart")  # the default backend (FSDP2) does not need it


def test_the_backend_is_not_part_of_a_stage_cache_key():
    """How a stage is spread over ranks changes its weights only by rounding (like the world size), so a stage
    trained under either backend is reused by the other (optsys/stages.py)."""
    from optsys.stages import stage_key

    base, ds = load_config("quickstart"), load_config("quickstart")
    ds.parallel.backend, ds.parallel.zero_stage = "deepspeed", 3  # set directly: validating needs deepspeed
    assert stage_key(ds) == stage_key(base)
    ds.trainer.lr = 2e-3
    assert stage_key(ds) != stage_key(base)


def test_a_deepspeed_checkpoint_resumes_only_under_deepspeed_with_its_world_size(tmp_path):
    """The manifest's backend and world size are checked with the fingerprint (rank 0, before anything loads);
    DeepSpeed's per-rank files are hashed by the rank that wrote them."""
    names = ["deepspeed/mp_rank_00_model_states.pt", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
             "deepspeed/zero_pp_rank_1_mp_rank_00_model_states.pt", "rng-rank-0.pt", "rng-rank-1.pt",
             "trainer_state.json", "zero_to_fp32.py"]
    assert [ck.file_owner(n) for n in names] == [0, 0, 1, 1, 0, 1, 0, 0]
    fp = {"method": "sft"}
    ds, plain = tmp_path / "checkpoints" / "step-00000004", tmp_path / "checkpoints" / "step-00000002"
    for path, extra in ((ds, {"backend": "deepspeed"}), (plain, {})):
        path.mkdir(parents=True)
        ck._write_json(path / "manifest.json", {"files": {}, "fingerprint": fp, "sharded": True, "world_size": 2,
                                                **extra})
    assert ck._fingerprint_checked(ds, fp, world_size=2, backend="deepspeed")["backend"] == "deepspeed"
    with pytest.raises(ck.CheckpointError, match=r"saved by a parallel.backend=deepspeed run; this run has "
                                                 r"parallel.backend=fsdp2.*Resume with parallel.backend=deepspeed"):
        ck._fingerprint_checked(ds, fp, world_size=2)
    with pytest.raises(ck.CheckpointError, match=r"saved by a parallel.backend=fsdp2 run; this run has "
                                                 r"parallel.backend=deepspeed"):
        ck._fingerprint_checked(plain, fp, world_size=2, backend="deepspeed")
    with pytest.raises(ck.CheckpointError, match=r"saved by 2 DeepSpeed rank\(s\) and this job has 1: ZeRO "
                                                 r"partitions are not resharded"):
        ck._fingerprint_checked(ds, fp, world_size=1, backend="deepspeed")


@needs_no_cuda
def test_the_gpu_suite_stage_trains_a_valid_config_and_resumes_it(monkeypatch):
    """profiling/gpu_suite.sh deepspeed (its dry run here): both runs' overrides validate, so a GPU session does not
    find a typo; the second resumes the first."""
    import optsys.parallel.zero

    monkeypatch.setattr(optsys.parallel.zero, "deepspeed_missing", lambda: False)  # validated without the package
    res = profiling_dry_run("gpu_suite.sh", "deepspeed")
    assert res.returncode == 3, res.stdout + res.stderr
    runs = [line.split("-m optsys.train ", 1)[1].split(" 2>&1")[0].split()
            for line in res.stdout.splitlines() if line.startswith("  [deepspeed] ") and "-m optsys.train " in line]
    assert len(runs) == 2 and runs[1] == [*runs[0], "resume=true"]
    cfg = load_config(overrides=runs[1])
    assert (cfg.parallel.backend, cfg.parallel.zero_stage, cfg.trainer.precision) == ("deepspeed", 3, "bf16")
    assert cfg.trainer.save_every * 2 == cfg.trainer.max_steps  # the resume starts halfway
    assert "profiling/same_metrics.py /tmp/ds-full-metrics.jsonl /tmp/ds-run/metrics.jsonl --steps 4 5 6" in res.stdout


# ---------------------------------------------------------------------------- runs (slow, need DeepSpeed)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_path):
    """The reference: the plain trainer (no DeepSpeed) in this process (no interpreter start-up to pay), 8 steps."""
    from optsys.trainers import sft

    out = tmp_path_factory.mktemp("ds-ref") / "one"
    sft.train(load_config(overrides=overrides(tiny_path, out)))
    return out, train_losses(out)


def assert_follows_one_process(one_process, out, tol=1e-4) -> float:
    """Steps 1..8 of `out` within `tol` of the 1-process losses, final/ within 1e-5 of its weights; the max diff."""
    ref_dir, ref = one_process
    got = train_losses(out)
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    diff = max(abs(ref[s] - got[s]) for s in ref)
    assert diff < tol
    w1, w2 = load_file(ref_dir / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:  # final/ holds the fp32 master weights, gathered from the ZeRO partitions
        assert w2[k].dtype == torch.float32
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)
    return diff




@needs_deepspeed
@pytest.mark.slow
def test_zero3_job_whose_rank_dies_resumes_exactly(one_process, tmp_path, tiny_path):
    """Rank 1 raises in step 7 while rank 0 waits in a ZeRO-3 collective: torchrun ends the job (checkpoint at step
    4, steps 1..6 logged). resume=true continues from step 4 through DeepSpeed's load_checkpoint plus optsys's data
    position, RNG and counters: steps 5 and 6 come out bit for bit as the dead job logged them, and the whole run
    follows the 1-process trainer."""
    script = tmp_path / "fail_rank1.py"
    script.write_text(failing_rank_script(7))
    out = tmp_path / "zero3"
    args = [*overrides(tiny_path, out), "parallel.backend=deepspeed", "parallel.zero_stage=3"]
    proc = run_torchrun([script, *args], timeout=600)
    assert proc.returncode != 0 and "RuntimeError: injected failure on rank 1 at step 7" in proc.stderr
    before = rows(out)
    assert sorted(before) == list(range(1, 7)) and not (out / "summary.json").exists()
    latest = ck.latest_checkpoint(out)
    manifest = ck.read_manifest(latest)
    assert latest.name == "step-00000004" and manifest["backend"] == "deepspeed" and manifest["world_size"] == 2
    assert {"deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng-rank-1.pt", "trainer_state.json",
            "deepspeed/zero_pp_rank_1_mp_rank_00_model_states.pt"} <= set(manifest["files"])
    assert "scheduler.pt" not in manifest["files"]  # DeepSpeed saves the schedule

    resumed = run_torchrun(["-m", "optsys.train", *args, "resume=true"], timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(step 4 of 8)" in resumed.stdout
    after = rows(out)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == list(range(1, 9))  # the dead job's rows after step 4 were rewound, then logged once
    for s in (5, 6):
        for key in ("train/loss", "train/grad_norm", "train/lr", "train/tokens"):
            assert after[s][key] == before[s][key], (s, key)
    diff = assert_follows_one_process(one_process, out)
    print(f"\nZeRO-3, 2 processes, rank 1 died at step 7, resumed from step 4: steps 5-6 equal to the bit; "
          f"steps 1..8 vs the 1-process trainer: max |train/loss diff| = {diff:.3g}")
    written = json.loads((out / "deepspeed_config.json").read_text())
    assert written == deepspeed_config(zero_stage=3, batch_tokens=360, max_tokens=128, world_size=2, grad_clip=1.0,
                                       bf16=False)  # fp32 on CPU (trainer.precision=auto)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parallel/world_size"] == 2 and 0.1 < summary["batch/filler_fraction"] < 0.5
    assert "FutureWarning" not in resumed.stderr  # DeepSpeed's deprecated collectives are silenced (dozens a step)
