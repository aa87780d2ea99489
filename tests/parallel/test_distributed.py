"""torchrun with 2 processes on gloo (FSDP2) follows the 1-process loss curve on the same global batch, on one
node and on two (two torchrun launchers joined by a c10d rendezvous)."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import free_port, run_torchrun, sft_run_overrides, torchrun_cmd, train_losses, worker_env
from safetensors.torch import load_file

from optsys.parallel.dist import World, local_steps, rank_share


def overrides(tiny_path, out):
    # max_tokens 128 / batch_tokens 360: steps of ~3 micro-batches (rows of ~116 tokens), so shares are uneven
    # and the zero-weighted filler path runs too (asserted below through batch/filler_fraction; at
    # batch_tokens 300 every step had exactly 2 micro-batches and no filler ever ran).
    return sft_run_overrides(tiny_path, out, "data.max_tokens=128", "trainer.batch_tokens=360", "trainer.max_steps=6")


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=worker_env(), **kw)


EXTRA = {"full": [], "lora": ["model.lora.r=8", "eval.before=true", "eval.after=true", "eval.max_new_tokens=4"],
         "bf16": ["model.dtype=bfloat16", "trainer.precision=bf16"]}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_path):
    """kind -> the output dir of its 1-process run, run once per module (the 2-node test reuses "full")."""
    done = {}

    def get(kind):
        if kind not in done:
            out = tmp_path_factory.mktemp(f"one-{kind}")
            proc = run([sys.executable, "-m", "optsys.train", *overrides(tiny_path, out), *EXTRA[kind]])
            assert proc.returncode == 0, proc.stderr[-3000:]
            done[kind] = out
        return done[kind]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "lora", "bf16"])
def test_two_ranks_match_one_process(tmp_path, tiny_path, one_process, kind):
    # LoRA: adapters on a frozen base, with the before/after task eval on (a peft model's generate must be
    # registered with FSDP2: it calls the wrapped model's forward, not the root's).
    # bf16: bf16-stored weights, fp32 master shards, FSDP2 MixedPrecisionPolicy (bf16 all-gathers, fp32
    # reduce-scatter) against one process's autocast: the same bf16 roundings of the same fp32 weights.
    lora, extra = kind == "lora", EXTRA[kind]
    tol = 2e-2 if kind == "bf16" else 1e-4  # bf16 compute: reduction order and the norms' weight dtype differ
    one_dir = one_process(kind)
    two = run_torchrun(["-m", "optsys.train", *overrides(tiny_path, tmp_path / "two"), *extra], timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = train_losses(one_dir), train_losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    diff = max(abs(a[s] - b[s]) for s in a)
    print(f"1 vs 2 processes ({kind}): steps 1..6, max |train/loss diff| = {diff:.3g}")
    assert diff < tol
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    w1 = load_file(one_dir / "final" / weights)
    w2 = load_file(tmp_path / "two" / "final" / weights)
    assert w1.keys() == w2.keys()
    for k in w1:
        if kind == "bf16":  # final/ is bf16: one ulp apart at most where the fp32 masters straddle a rounding
            assert w1[k].dtype == w2[k].dtype == torch.bfloat16
            torch.testing.assert_close(w1[k].float(), w2[k].float(), rtol=1e-2, atol=1e-3)
        else:
            torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["parallel/world_size"] == summary["batch/world_size"] == 2
    # ~3 micro-batches for 2 ranks: rank 1 runs a filler in most steps
    assert 0.1 < summary["batch/filler_fraction"] < 0.5
    assert 1.0 < summary["batch/micro_batches_per_rank_per_step"] <= 2.0
    if lora:  # the ranks split the eval problems (optsys.eval.accuracy): the same accuracy as one process
        summary_one = json.loads((one_dir / "summary.json").read_text())
        for key in ("eval/accuracy_before", "eval/accuracy_after"):
            assert summary[key] == summary_one[key], key


@pytest.mark.slow
def test_two_nodes_match_one_process(tmp_path, tiny_path, one_process):
    """`torchrun --nnodes 2 --nproc_per_node 1` twice on this machine, as on two hosts: a c10d rendezvous on
    localhost (node 0 hosts the store), gloo, FSDP2 over both "nodes". RANK is 0 and 1 while LOCAL_RANK is 0
    on both: the same losses and final weights as one process (the run the 2-rank test compares with)."""
    endpoint = f"localhost:{free_port()}"
    nodes = [subprocess.Popen(torchrun_cmd(["-m", "optsys.train", *overrides(tiny_path, tmp_path / "two")], nproc=1,
                                           launcher=["--nnodes=2", f"--node_rank={n}", "--rdzv_backend=c10d",
                                                     f"--rdzv_endpoint={endpoint}", f"--rdzv_id={tmp_path.name}",
                                                     f"--rdzv_conf=is_host={int(n == 0)}"]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env())
             for n in (0, 1)]
    try:
        for node in nodes:
            _, err = node.communicate(timeout=600)
            assert node.returncode == 0, err[-3000:]
    finally:
        for node in nodes:
            node.kill()  # after a failure: no launcher left waiting for its peer
    one_dir = one_process("full")
    a, b = train_losses(one_dir), train_losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    diff = max(abs(a[s] - b[s]) for s in a)
    print(f"1 process vs 2 nodes: steps 1..6, max |train/loss diff| = {diff:.3g}")
    assert diff < 1e-4
    w1, w2 = (load_file(out / "final" / "model.safetensors") for out in (one_dir, tmp_path / "two"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["parallel/world_size"] == 2 and summary["parallel/nodes"] == 2
    assert json.loads((one_dir / "summary.json").read_text())["parallel/nodes"] == 1


@pytest.mark.parametrize("n, size", [(1, 2), (2, 2), (3, 2), (7, 3)])
def test_rank_shares_cover_every_micro_batch_once(n, size):
    items = list(range(n))
    shares = [rank_share(items, World(r, size, r, torch.device("cpu"))) for r in range(size)]
    assert sorted(x for s in shares for x in s) == items
    steps = local_steps(n, World(0, size, 0, torch.device("cpu")))
    assert all(len(s) <= steps for s in shares) and max(len(s) for s in shares) == steps
