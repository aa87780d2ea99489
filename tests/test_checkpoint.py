"""Checkpoints: kill-and-resume bit for bit, atomic saves, verification, fingerprints, pruning."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import sft_run_overrides
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from optsys.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rewind_metrics,
    run_fingerprint,
    save_checkpoint,
)
from optsys.config import ConfigError
from optsys.data.tasks import get_task
from optsys.data.tokenize import tokenize_rows
from optsys.models.load import load_tokenizer
from optsys.trainers import sft
from optsys.trainers.common import build_optimizer, warmup_cosine
from optsys.trainers.run import prepare_output_dir
from optsys.validation import load_config

RUN = ["data.max_tokens=256", "trainer.batch_tokens=1024", "trainer.max_steps=8", "trainer.warmup_steps=2",
       "trainer.save_every=1"]  # on top of sft_run_overrides


def cli(tiny_path, out, *extra):
    return [sys.executable, "-m", "optsys.train", *sft_run_overrides(tiny_path, out, *RUN, *extra)]


def metric_rows(out):
    rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written right now
            pass
    return rows


def train_rows(out):
    return {r["step"]: r for r in metric_rows(out) if "train/loss" in r}


def test_kill_and_resume_is_bit_for_bit(tmp_path, tiny_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(cli(tiny_path, full), env=env, check=True, capture_output=True, timeout=120)

    proc = subprocess.Popen(cli(tiny_path, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if (killed / "metrics.jsonl").exists() and max(train_rows(killed), default=0) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the run ended on its own (rc {proc.returncode}) before the kill"
    assert not (killed / "summary.json").exists()
    k = int(latest_checkpoint(killed).name.removeprefix("step-"))
    logged_before = max(train_rows(killed))

    resumed = subprocess.run(cli(tiny_path, killed, "resume=true"), env=env, capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {k} of 8)" in resumed.stdout

    a, b = train_rows(full), train_rows(killed)
    steps = [r["step"] for r in metric_rows(killed) if "train/loss" in r]
    assert steps == list(range(1, 9))  # rows after the checkpoint were rewound, then logged once
    compared = list(range(k + 1, 9))
    diffs = {key: max(abs(a[s][key] - b[s][key]) for s in compared)
             for key in ("train/loss", "train/grad_norm", "train/lr")}
    print(f"\nkill-and-resume: killed after metrics showed step {logged_before}, resumed from checkpoint step {k}; "
          f"compared steps {compared[0]}..{compared[-1]} with an uninterrupted run: max |diff| "
          + ", ".join(f"{key} {d}" for key, d in diffs.items()))
    assert diffs == {"train/loss": 0.0, "train/grad_norm": 0.0, "train/lr": 0.0}, (compared, diffs)
    wa, wb = load_file(full / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    assert all(torch.equal(wa[n], wb[n]) for n in wa)  # final weights identical too
    assert json.loads((killed / "summary.json").read_text())["train/tokens"] == \
        json.loads((full / "summary.json").read_text())["train/tokens"]


def test_in_process_resume_keeps_eval_before_and_rewinds_metrics(tmp_path, tiny_path):
    base = sft_run_overrides(tiny_path, tmp_path / "run", *RUN, "trainer.max_steps=4", "trainer.save_every=2",
                             "trainer.log_every=1", "eval.before=true", "eval.batch_size=20", "eval.max_new_tokens=4")
    first = sft.train(load_config("quickstart", overrides=base))
    out = tmp_path / "run"
    losses = {s: r["train/loss"] for s, r in train_rows(out).items()}
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002", "step-00000004"]
    # Pretend the run died between step 4's metrics line and its checkpoint.
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    (out / "summary.json").unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')  # a line cut by the kill
    summary = sft.train(load_config("quickstart", overrides=[*base, "resume=true"]))
    assert summary["eval/accuracy_before"] == first["eval/accuracy_before"]
    rows = metric_rows(out)
    assert sum("eval/accuracy_before" in r for r in rows) == 1
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert {s: r["train/loss"] for s, r in train_rows(out).items()} == losses
    assert json.loads((out / "summary.json").read_text())["eval/accuracy_before"] == first["eval/accuracy_before"]


# ---------------------------------------------------------------------------- the library


def tiny_cfg(tmp_path, tiny_path, *extra):
    return load_config("quickstart", overrides=sft_run_overrides(tiny_path, tmp_path / "run", *RUN, *extra))


def trained_parts(cfg, model=None):
    """Model, optimizer with Adam state, scheduler a few steps in."""
    model = model or AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path)
    opt = build_optimizer(model, 1e-3, 0.0, (0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(2, 8, 0.1))
    for _ in range(2):
        sum((p.float() ** 2).sum() for p in model.parameters()).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def save(out, step, cfg, parts, keep_last=2):
    model, opt, sched = parts
    return save_checkpoint(out, step, model=model, optimizer=opt, scheduler=sched, keep_last=keep_last,
                           trainer_state={"data": {"epoch": 0, "index": step}}, fingerprint=run_fingerprint(cfg, model))


def test_save_load_round_trip_restores_model_optimizer_scheduler_rng(tmp_path, tiny_path):
    cfg = tiny_cfg(tmp_path, tiny_path)
    parts = trained_parts(cfg)
    torch.manual_seed(123)
    path = save(tmp_path, 5, cfg, parts)
    expect_rand = torch.rand(3)
    fresh = trained_parts(cfg)  # different state: Adam moments and schedule from scratch + 2 steps
    with torch.no_grad():
        for p in fresh[0].parameters():
            p.add_(1.0)
    state = load_checkpoint(path, model=fresh[0], optimizer=fresh[1], scheduler=fresh[2],
                            fingerprint=run_fingerprint(cfg, fresh[0]))
    assert state == {"step": 5, "data": {"epoch": 0, "index": 5}}
    assert all(torch.equal(a, b) for a, b in zip(parts[0].state_dict().values(), fresh[0].state_dict().values()))
    sa, sb = parts[1].state_dict(), fresh[1].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert all(torch.equal(sa["state"][i][k], sb["state"][i][k]) for i in sa["state"] for k in sa["state"][i])
    assert parts[2].state_dict() == fresh[2].state_dict()
    assert torch.equal(torch.rand(3), expect_rand)


def test_tied_weights_are_saved_once_and_stay_tied(tmp_path, tiny_path):
    cfg = tiny_cfg(tmp_path, tiny_path)
    config = AutoConfig.from_pretrained(tiny_path, tie_word_embeddings=True)
    torch.manual_seed(0)
    parts = trained_parts(cfg, AutoModelForCausalLM.from_config(config))
    assert parts[0].lm_head.weight.data_ptr() == parts[0].model.embed_tokens.weight.data_ptr()
    path = save(tmp_path, 1, cfg, parts)
    assert len(load_file(path / "model.safetensors")) == len(parts[0].state_dict()) - 1
    torch.manual_seed(1)
    fresh = trained_parts(cfg, AutoModelForCausalLM.from_config(config))
    load_checkpoint(path, model=fresh[0], optimizer=fresh[1], scheduler=fresh[2],
                    fingerprint=run_fingerprint(cfg, fresh[0]))
    assert fresh[0].lm_head.weight.data_ptr() == fresh[0].model.embed_tokens.weight.data_ptr()
    assert torch.equal(fresh[0].lm_head.weight, parts[0].lm_head.weight)


def test_incomplete_checkpoints_are_ignored_and_stale_tmp_removed(tmp_path, tiny_path):
    cfg = tiny_cfg(tmp_path, tiny_path)
    parts = trained_parts(cfg)
    good = save(tmp_path, 2, cfg, parts)
    root = tmp_path / "checkpoints"
    (root / "step-00000003.tmp-999-abcd").mkdir()  # killed mid-save, before the rename
    (root / "step-00000003.tmp-999-abcd" / "model.safetensors").write_bytes(b"half")
    (root / "step-00000004").mkdir()  # a folder without a manifest is not a checkpoint
    (root / "step-00000004" / "model.safetensors").write_bytes(b"x")
    assert latest_checkpoint(tmp_path) == good
    save(tmp_path, 5, cfg, parts)
    assert not (root / "step-00000003.tmp-999-abcd").exists()
    assert latest_checkpoint(tmp_path).name == "step-00000005"
    with pytest.raises(CheckpointError, match="no manifest.json.*Delete"):
        load_checkpoint(root / "step-00000004", model=parts[0], optimizer=parts[1], scheduler=parts[2],
                        fingerprint=run_fingerprint(cfg, parts[0]))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_file_is_named_and_model_untouched(tmp_path, tiny_path, damage):
    cfg = tiny_cfg(tmp_path, tiny_path)
    parts = trained_parts(cfg)
    save(tmp_path, 1, cfg, parts)
    path = save(tmp_path, 2, cfg, parts)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 1]))
    fresh = trained_parts(cfg)
    before = {k: v.clone() for k, v in fresh[0].state_dict().items()}
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*Delete the folder .*step-00000002 to resume "
                                              r"from step-00000001"):
        load_checkpoint(path, model=fresh[0], optimizer=fresh[1], scheduler=fresh[2],
                        fingerprint=run_fingerprint(cfg, fresh[0]))
    assert all(torch.equal(before[k], v) for k, v in fresh[0].state_dict().items())


def test_fingerprint_mismatch_names_the_field(tmp_path, tiny_path):
    cfg = tiny_cfg(tmp_path, tiny_path)
    parts = trained_parts(cfg)
    path = save(tmp_path, 1, cfg, parts)
    kw = dict(model=parts[0], optimizer=parts[1], scheduler=parts[2])
    other_data = tiny_cfg(tmp_path, tiny_path, "data.num_train=200")
    with pytest.raises(CheckpointError, match="data.num_rows: checkpoint has 300, this run has 200"):
        load_checkpoint(path, fingerprint=run_fingerprint(other_data, parts[0]), **kw)
    bigger = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_path, intermediate_size=384))
    other_model = tiny_cfg(tmp_path, tiny_path, "model.name_or_path=tiny:small")
    with pytest.raises(CheckpointError, match=r"(?s)model.config_sha256.*model.name_or_path.*drop resume=true"):
        load_checkpoint(path, fingerprint=run_fingerprint(other_model, bigger), **kw)


def test_keep_last_prunes_older_checkpoints(tmp_path, tiny_path):
    cfg = tiny_cfg(tmp_path, tiny_path)
    parts = trained_parts(cfg)
    for step in range(1, 6):
        save(tmp_path, step, cfg, parts, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]


def test_resume_errors_say_what_to_do(tmp_path, tiny_path):
    with pytest.raises(ConfigError, match="holds no run to continue.*drop resume=true"):
        sft.train(tiny_cfg(tmp_path, tiny_path, "resume=true"))
    prepare_output_dir(tiny_cfg(tmp_path, tiny_path))  # a run folder with its config but no checkpoint
    with pytest.raises(CheckpointError, match=r"holds no complete checkpoint.*Drop resume=true"):
        sft.train(tiny_cfg(tmp_path, tiny_path, "resume=true"))
    with pytest.raises(ConfigError, match=r"changes it:\n  data.max_tokens: 256 -> 128\n  trainer.lr"):
        sft.train(tiny_cfg(tmp_path, tiny_path, "resume=true", "trainer.lr=1e-4", "data.max_tokens=128"))
    with pytest.raises(ConfigError, match="only one of them"):
        tiny_cfg(tmp_path, tiny_path, "resume=true", "overwrite=true")
    with pytest.raises(ConfigError, match="trainer.keep_last must be >= 1"):
        tiny_cfg(tmp_path, tiny_path, "trainer.keep_last=0")


def test_step_groups_resume_at_any_position_matches_uninterrupted(tiny_path):
    tok = load_tokenizer(str(tiny_path))
    examples, _ = tokenize_rows(get_task("arithmetic").sft_rows("train", 120, difficulty=2), tok, max_tokens=64)
    stream = sft.step_groups(examples, max_tokens=64, batch_tokens=200, seed=3)
    steps, positions = [], []
    for _ in range(40):  # several epochs, so resumes land on epoch boundaries too
        steps.append(next(stream))
        positions.append(stream.position)
    assert len({e for e, _ in steps}) >= 3

    def same(a, b):
        return a[0] == b[0] and len(a[1]) == len(b[1]) and all(
            torch.equal(x.input_ids, y.input_ids) and x.seq_lens == y.seq_lens for x, y in zip(a[1], b[1]))

    for k in range(len(steps) - 5):
        resumed = sft.step_groups(examples, max_tokens=64, batch_tokens=200, seed=3, position=positions[k])
        assert all(same(next(resumed), steps[j]) for j in range(k + 1, k + 6)), k


def test_rewind_metrics_keeps_rows_up_to_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "eval/accuracy_before": 0.1}\n{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    rewind_metrics(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_overwrite_starts_from_an_empty_folder_and_resume_takes_the_new_run(tmp_path, tiny_path, capsys):
    """A run with checkpoints at steps 2, 4, 6, then overwrite=true with another config that checkpoints 2 and 4:
    none of the old step-* remain (they would have been pruned as the new run's, and step 6 resumed), the old run
    is moved aside whole, and resume=true continues the new run from its own step 4."""
    quiet = ["trainer.save_every=2", "trainer.keep_last=3", "trainer.log_every=2"]
    sft.train(tiny_cfg(tmp_path, tiny_path, *quiet, "trainer.max_steps=6"))
    out = tmp_path / "run"
    old_manifest = (out / "checkpoints" / "step-00000004" / "manifest.json").read_text()
    new = [*quiet, "trainer.max_steps=4", "trainer.lr=5e-4"]
    capsys.readouterr()
    sft.train(tiny_cfg(tmp_path, tiny_path, *new, "overwrite=true"))
    printed = capsys.readouterr().out
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002", "step-00000004"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    (aside,) = tmp_path.glob("run.old-*")
    assert f"moved the previous run in {out} to {aside}" in printed
    assert [p.name for p in list_checkpoints(aside)] == ["step-00000002", "step-00000004", "step-00000006"]
    assert (aside / "checkpoints" / "step-00000004" / "manifest.json").read_text() == old_manifest
    assert "trainer.lr: 5e-4" not in (aside / "config.yaml").read_text()
    assert [r["step"] for r in metric_rows(out) if "train/loss" in r] == [2, 4]  # the old history left with it

    shutil.rmtree(out / "final")
    sft.train(tiny_cfg(tmp_path, tiny_path, *new, "resume=true"))
    assert "from step-00000004 (step 4 of 4)" in capsys.readouterr().out


SHARDED_FILES = ["dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "rng-rank-0.pt", "rng-rank-1.pt",
                 "scheduler.pt", "trainer_state.json"]


def test_each_rank_hashes_and_verifies_only_the_files_it_wrote(tmp_path, monkeypatch):
    """A sharded checkpoint of a 2-rank job: rank 1 hashes its DCP shard and RNG file only, rank 0 the rest; the
    shares cover every file once. At load the same split verifies (a damaged rank-0 file is rank 0's to find),
    and a 1-process resume verifies everything."""
    import optsys.checkpoint as ck

    root = tmp_path / "step-00000001"
    for i, name in enumerate(SHARDED_FILES):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(bytes([i]) * (100 + i))
    hashed = {}
    real_sha256 = ck._sha256
    for rank in (0, 1):
        hashed[rank] = []
        monkeypatch.setattr(ck, "_sha256", lambda p, r=rank: hashed[r].append(p.relative_to(root).as_posix())
                            or real_sha256(p))
        share = ck.hash_files(root, ck.rank_share(ck._relative_files(root), rank, 2))
        assert sorted(share) == hashed[rank]
    assert hashed[1] == ["dcp/__1_0.distcp", "rng-rank-1.pt"]
    assert sorted(hashed[0] + hashed[1]) == SHARDED_FILES
    monkeypatch.setattr(ck, "_sha256", real_sha256)

    files = ck.hash_files(root, SHARDED_FILES)
    ck._write_json(root / "manifest.json", {"files": files, "fingerprint": {}, "sharded": True, "world_size": 2})
    (root / "dcp" / "__0_0.distcp").write_bytes(b"\xff" * files["dcp/__0_0.distcp"]["bytes"])  # other bytes
    ck.verify_checkpoint(root, rank=1, world_size=2)  # not rank 1's file
    with pytest.raises(CheckpointError, match=r"__0_0.distcp does not match the sha256"):
        ck.verify_checkpoint(root, rank=0, world_size=2)
    with pytest.raises(CheckpointError, match=r"__0_0.distcp does not match the sha256"):
        ck.verify_checkpoint(root)  # one process checks every file
    assert ck.rank_share(SHARDED_FILES, 0, 1) == SHARDED_FILES
    assert ck.rank_share(SHARDED_FILES, 1, 4) == ["dcp/__1_0.distcp", "rng-rank-1.pt"]
    assert ck.rank_share(SHARDED_FILES, 3, 4) == []


def test_checkpoints_without_a_run_config_are_refused(tmp_path, tiny_path):
    cfg = tiny_cfg(tmp_path, tiny_path)
    (tmp_path / "run" / "checkpoints" / "step-00000002").mkdir(parents=True)
    for extra in ([], ["overwrite=true"]):
        with pytest.raises(ConfigError, match=r"holds checkpoints/ but no config.yaml.*Move them away"):
            prepare_output_dir(tiny_cfg(tmp_path, tiny_path, *extra))
    assert not (tmp_path / "run" / "config.yaml").exists() and cfg.output_dir == str(tmp_path / "run")


def test_overwrite_of_a_run_folder_below_the_working_directory_is_allowed(tmp_path, tiny_path, monkeypatch, capsys):
    """The README's own usage, `output_dir=runs/a overwrite=true` from the folder that holds runs/: the old run moves
    aside. Only a folder that holds the working directory (the cwd is inside it) is refused."""
    from optsys.trainers.run import check_output_dir

    monkeypatch.chdir(tmp_path)
    overrides = sft_run_overrides(tiny_path, "runs/a", *RUN)
    prepare_output_dir(load_config("quickstart", overrides=overrides))
    again = load_config("quickstart", overrides=[*overrides, "overwrite=true"])
    out = prepare_output_dir(again)
    assert out == Path("runs/a") and (out / "config.yaml").exists()
    assert [p.name.split(".old-")[0] for p in (tmp_path / "runs").iterdir()] == ["a", "a"]  # the old run, moved
    monkeypatch.chdir(tmp_path / "runs" / "a")
    here = load_config("quickstart", overrides=[*sft_run_overrides(tiny_path, str(tmp_path / "runs"), *RUN),
                                                "overwrite=true"])
    (tmp_path / "runs" / "config.yaml").write_text("recipe: other\n")
    with pytest.raises(ConfigError, match="holds the current directory"):
        check_output_dir(here)


def test_an_output_dir_that_cannot_be_made_is_a_config_error(tmp_path, tiny_path):
    """Below a file, or where the filesystem refuses: a ConfigError naming output_dir, not an OSError."""
    from optsys.trainers.run import check_output_dir

    (tmp_path / "afile").write_text("")
    for out, words in [(tmp_path / "afile", "is a file"), (tmp_path / "afile" / "sub", "afile is a file")]:
        cfg = load_config("quickstart", overrides=sft_run_overrides(tiny_path, out, *RUN))
        with pytest.raises(ConfigError, match=f"output_dir.*{words}"):
            check_output_dir(cfg)
        with pytest.raises(ConfigError, match=f"output_dir.*{words}"):
            prepare_output_dir(cfg)
    if Path("/proc/self").is_dir():  # a folder no user can create, root included
        cfg = load_config("quickstart", overrides=sft_run_overrides(tiny_path, "/proc/no/such", *RUN))
        with pytest.raises(ConfigError, match="output_dir.*/proc/no/such cannot be"):
            prepare_output_dir(cfg)
