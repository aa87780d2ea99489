"""Checkpoints under torchrun (2 processes, gloo, FSDP2): kill-and-resume bit for bit, a resume with
another world size, and a job whose one rank dies."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from failing_rank import failing_rank_script
from helpers import run_torchrun, sft_run_overrides, torchrun_cmd, worker_env
from safetensors.torch import load_file

from optsys.checkpoint import CheckpointError, _checked_manifest, latest_checkpoint, read_manifest

ENV = worker_env()


def overrides(tiny_path, out):
    # As in test_distributed.py (uneven rank shares, filler micro-batches), plus a checkpoint every step;
    # keep_last=8 keeps them all, so the uninterrupted run can also serve as a run to resume.
    return sft_run_overrides(tiny_path, out, "data.max_tokens=128", "trainer.batch_tokens=300", "trainer.max_steps=8",
                             "trainer.save_every=1", "trainer.keep_last=8")


def run(cmd, timeout=300):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def train_rows(out):
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the line being written right now
            continue
        if "train/loss" in row:
            rows[row["step"]] = row
    return rows


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_path):
    """An uninterrupted 2-process run of 8 steps, a checkpoint after each."""
    out = tmp_path_factory.mktemp("dist-ckpt") / "full"
    proc = run_torchrun(["-m", "optsys.train", *overrides(tiny_path, out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, train_rows(out)


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers at once, like a node that loses power. torchrun starts each
    worker in a session of its own (start_new_session=True in torch.distributed.elastic), so killing
    torchrun's process group alone leaves the workers running on as orphans: kill their groups too."""
    workers = _children(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    deadline = time.time() + 30
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in workers):
        assert time.time() < deadline, "workers outlived the kill"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"


@pytest.mark.slow
def test_kill_and_resume_two_ranks_is_bit_for_bit(full_run, tmp_path, tiny_path):
    full, a = full_run
    killed = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(torchrun_cmd(["-m", "optsys.train", *overrides(tiny_path, killed)]), env=ENV,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if (killed / "metrics.jsonl").exists() and max(train_rows(killed), default=0) >= 3:
                kill_job(proc)
                break
            time.sleep(0.005)
    assert proc.returncode == -signal.SIGKILL, f"the job ended on its own (rc {proc.returncode}) before the kill"
    assert not (killed / "summary.json").exists()
    logged_before = max(train_rows(killed))
    k = int(latest_checkpoint(killed).name.removeprefix("step-"))
    assert read_manifest(latest_checkpoint(killed))["world_size"] == 2

    resumed = run_torchrun(["-m", "optsys.train", *overrides(tiny_path, killed), "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {k} of 8)" in resumed.stdout
    assert resumed.stdout.count("resuming ") == 1  # rank 0 alone reports (and rewinds metrics.jsonl)

    b = train_rows(killed)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == list(range(1, 9))  # rows after the checkpoint were rewound, then logged once
    compared = list(range(k + 1, 9))
    diffs = {key: max(abs(a[s][key] - b[s][key]) for s in compared)
             for key in ("train/loss", "train/grad_norm", "train/lr")}
    print(f"\nkill-and-resume (2 processes): killed after step {logged_before}, resumed from step {k}; "
          f"compared steps {compared[0]}..{compared[-1]}: max |diff| = {diffs['train/loss']} "
          f"(train/grad_norm {diffs['train/grad_norm']}, train/lr {diffs['train/lr']})")
    assert diffs == {"train/loss": 0.0, "train/grad_norm": 0.0, "train/lr": 0.0}, (compared, diffs)
    wa, wb = load_file(full / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_process(full_run, tmp_path, tiny_path):
    """World-size change is allowed (see optsys/checkpoint.py): DCP reshards, the printed line says what
    is not carried over, and the losses follow the 2-process run to rounding."""
    full, a = full_run
    out = tmp_path / "one"
    shutil.copytree(full, out)
    config = out / "config.yaml"
    config.write_text(config.read_text().replace(str(full), str(out)))
    for ck in (out / "checkpoints").iterdir():
        if int(ck.name.removeprefix("step-")) > 4:
            shutil.rmtree(ck)
    (out / "summary.json").unlink()

    proc = run([sys.executable, "-m", "optsys.train", *overrides(tiny_path, out), "resume=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "saved by 2 ranks and resumes with 1" in proc.stdout
    assert "per-rank RNG streams cannot be carried over exactly" in proc.stdout
    assert "(step 4 of 8)" in proc.stdout
    b = train_rows(out)
    assert sorted(b) == list(range(1, 9))
    diff = max(abs(a[s]["train/loss"] - b[s]["train/loss"]) for s in range(5, 9))
    print(f"\nworld size 2 -> 1: resumed from step 4; steps 5..8: max |train/loss diff| = {diff:.3g}")
    assert diff < 1e-4  # the 1 vs 2 process tolerance of test_distributed.py

    # The other direction is refused: a single-process checkpoint's optimizer state is keyed by index.
    single = latest_checkpoint(out)
    assert read_manifest(single)["sharded"] is False
    with pytest.raises(CheckpointError, match=r"saved by a single process.*this job's 2 ranks.*one process"):
        _checked_manifest(single, read_manifest(single)["fingerprint"], world_size=2)


@pytest.mark.slow
def test_a_damaged_shard_stops_every_rank_with_one_message(full_run, tmp_path, tiny_path):
    """Each rank verifies the files it wrote, and the verdicts are shared: a flipped byte in rank 1's shard is
    found by rank 1, and rank 0 (which never reads that file) stops with the same error and prints it once."""
    full, _ = full_run
    out = tmp_path / "damaged"
    shutil.copytree(full, out)
    config = out / "config.yaml"
    config.write_text(config.read_text().replace(str(full), str(out)))
    latest = latest_checkpoint(out)
    files = read_manifest(latest)["files"]
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "rng-rank-0.pt", "rng-rank-1.pt"} <= set(files)
    shard = latest / "dcp" / "__1_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))

    t0 = time.time()
    proc = run_torchrun(["-m", "optsys.train", *overrides(tiny_path, out), "resume=true"], timeout=300)
    print(f"\ndamaged rank-1 shard: torchrun exited rc {proc.returncode} after {time.time() - t0:.1f} s")
    assert proc.returncode != 0
    assert proc.stderr.count("checkpoint error: checkpoint file") == 1, proc.stderr[-3000:]
    assert "dcp/__1_0.distcp does not match the sha256" in proc.stderr


COUNTING_HASHES = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import optsys.checkpoint as ck

    real = ck._sha256

    def logged_sha256(path):
        name = path.name if path.parent.name != "dcp" else "dcp/" + path.name
        with open(Path(os.environ["HASH_LOG"]) / f"rank-{os.environ['RANK']}.log", "a") as f:
            f.write(name + "\\n")
        return real(path)

    ck._sha256 = logged_sha256
    from optsys.train import main

    main(sys.argv[1:])
""")


@pytest.mark.slow
def test_each_rank_hashes_only_its_own_files_at_save_and_load(tmp_path, tiny_path):
    """A real 2-rank job: at every save and at the resume's verification, rank 1 reads only its own shard and RNG
    file, and rank 0 never reads those (before, rank 0 alone hashed everything while rank 1 waited)."""
    script = tmp_path / "count_hashes.py"
    script.write_text(COUNTING_HASHES)
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    args = [script, *overrides(tiny_path, out), "trainer.max_steps=2"]  # the last value wins
    for extra in ([], ["resume=true"]):
        proc = run_torchrun([*args, *extra], env={"HASH_LOG": str(logs)}, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    hashed = {r: (logs / f"rank-{r}.log").read_text().split() for r in (0, 1)}
    print(f"\nfiles hashed over 2 saves and 1 resume: rank 0 {len(hashed[0])}, rank 1 {len(hashed[1])}")
    assert sorted(set(hashed[1])) == ["dcp/__1_0.distcp", "rng-rank-1.pt"]
    assert len(hashed[1]) == 2 * 3  # 2 saves + the resume's check
    assert not {"dcp/__1_0.distcp", "rng-rank-1.pt"} & set(hashed[0])
    assert {"dcp/__0_0.distcp", "dcp/.metadata", "rng-rank-0.pt", "scheduler.pt", "trainer_state.json"} <= \
        set(hashed[0])




@pytest.mark.slow
def test_a_rank_that_dies_ends_the_job(tmp_path, tiny_path):
    """Rank 1 raises mid-step while rank 0 waits in an FSDP collective: torchrun's agent sees the
    failed worker and SIGTERMs the other (or gloo fails rank 0's collective first), so the job exits
    non-zero promptly with rank 1's error, instead of rank 0 hanging until the process-group timeout."""
    script = tmp_path / "fail_rank1.py"
    script.write_text(failing_rank_script(3))
    out = tmp_path / "fail"
    t0 = time.time()
    proc = run_torchrun([script, *overrides(tiny_path, out)], timeout=180)
    elapsed = time.time() - t0
    print(f"\nrank 1 raised at step 3: torchrun exited rc {proc.returncode} after {elapsed:.1f} s")
    assert proc.returncode != 0
    assert elapsed < 120
    assert "RuntimeError: injected failure on rank 1 at step 3" in proc.stderr
    assert max(train_rows(out)) == 2 and not (out / "summary.json").exists()
