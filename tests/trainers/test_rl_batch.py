"""The worked example in optsys/trainers/rl_batch.py's docstring, step by step: it must stay true."""

from types import SimpleNamespace

import pytest

import optsys.trainers.rl_batch as rl_batch
from optsys.trainers.rl_batch import Prompt, Rollout, group_advantages, rank_groups, step_prompts


def test_prompt_schedule_and_rank_groups():
    prompts = [Prompt([100 + i], f"q{i}", str(i)) for i in range(8)]
    drawn = {step: [p.text for p in step_prompts(prompts, step, 4, seed=0)] for step in (1, 2, 3)}
    assert drawn == {1: ["q4", "q1", "q5", "q2"], 2: ["q0", "q3", "q7", "q6"], 3: ["q3", "q6", "q1", "q5"]}
    ranks = [SimpleNamespace(size=2, rank=r) for r in (0, 1)]
    assert [rank_groups(4, 1, w) for w in ranks] == [[0, 1], [2, 3]]
    assert [rank_groups(4, 2, w) for w in ranks] == [[0, 2], [1, 3]]


def test_token_rows_single_and_multi_turn():
    prompt = Prompt([11, 12, 13], "q", "a")
    single = Rollout(prompt, 0, [21, 22, 2], [-0.1, -0.2, -0.3], "stop")
    ex = single.example()
    assert (ex.input_ids, ex.targets, single.n_trained) == ([11, 12, 13, 21, 22], [-100, -100, 21, 22, 2], 3)
    multi = Rollout(prompt, 0, [21, 2, 31, 32, 33, 23, 2], [-0.1, -0.2, 0.0, 0.0, 0.0, -0.3, -0.4], "stop",
                    loss_mask=[True, True, False, False, False, True, True])
    ex = multi.example()
    assert ex.input_ids == [11, 12, 13, 21, 2, 31, 32, 33, 23]
    assert ex.targets == [-100, -100, 21, 2, -100, -100, -100, 23, 2]
    assert multi.n_trained == 4 and multi.trained_sampler_logp == [-0.1, -0.2, -0.3, -0.4]


@pytest.mark.parametrize("method, want", [
    ("grpo", [0.7071, -0.7071, 0, 0, 0, 0, -0.7071, 0.7071]),
    ("dr_grpo", [0.5, -0.5, 0, 0, 0, 0, -0.25, 0.25]),
    ("rloo", [1, -1, 0, 0, 0, 0, -0.5, 0.5]),
])
def test_group_advantages(method, want):
    rollouts = [Rollout(Prompt([1], "q", None), i // 2, [5], [0.0], "stop", reward=r)
                for i, r in enumerate([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.5, 1.0])]
    group_advantages(rollouts, 2, method)
    assert [r.advantage for r in rollouts] == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("agg, want", [
    ("token_mean", [[1 / 20] * 4, [1 / 20] * 4]),
    ("seq_mean_token_mean", [[1 / 24, 1 / 16, 1 / 32, 1 / 8], [1 / 24, 1 / 24, 1 / 16, 1 / 16]]),
    ("seq_sum_norm", [[1 / 32] * 4, [1 / 32] * 4]),  # 1 / (8 sequences x max_len 4)
])
def test_loss_weights_over_two_ranks(agg, want, monkeypatch):
    shares = [[3, 2, 4, 1], [3, 3, 2, 2]]  # trained tokens of each rank's completions
    # the all-gathers of a 2-rank job: the completion lengths, then the micro-batch counts
    monkeypatch.setattr(rl_batch, "all_gather_objects",
                        lambda obj, world: shares if isinstance(obj, list) else [obj, obj])
    for rank in (0, 1):
        rollouts = [Rollout(Prompt([11, 12, 13], "q", "a"), i // 2, list(range(20, 20 + n)), [0.0] * n, "stop")
                    for i, n in enumerate(shares[rank])]
        world = SimpleNamespace(size=2, rank=rank, distributed=True)
        got = {}
        for mb in rl_batch.micro_batches(rollouts, 64, agg, 4, world, filler=[]):
            start = 0
            for r in mb.rollouts:
                got[rollouts.index(r)] = mb.weights[start : start + r.n_trained].tolist()
                start += r.n_trained
        for i, n in enumerate(shares[rank]):
            assert got[i] == pytest.approx([want[rank][i]] * n)


def test_completion_records_spread_over_the_groups_and_zero_writes_nothing(tmp_path):
    """rl.log_completions: `count` rollouts spread evenly over the step's (4 groups x 2 here: one per group), each
    with its prompt, reward per function and advantage (per-token methods: the mean); 0 writes no file."""
    import json

    import torch

    rollouts = []
    for g in range(4):
        for j in range(2):
            r = Rollout(Prompt([1], f"q{g}", str(g)), g, [5, 2], [0.0, 0.0], "stop", f"c{g}{j}", reward=g + j,
                        advantage=j - 0.5, rewards={"correct": float(j), "format": float(g)})
            rollouts.append(r)
    rollouts[2].token_adv = torch.tensor([1.0, 3.0])
    records = rl_batch.completion_records(rollouts, 7, 4)
    assert [c["prompt"] for c in records] == ["q0", "q1", "q2", "q3"]
    assert records[1] == {"step": 7, "prompt": "q1", "answer": "1", "completion": "c10", "reward": 1,
                          "rewards": {"correct": 0.0, "format": 1.0}, "advantage": 2.0, "finish_reason": "stop"}
    assert len(rl_batch.completion_records(rollouts[:2], 7, 4)) == 2  # never more than the step has
    path = tmp_path / "completions.jsonl"
    rl_batch.write_completions(path, rollouts, 7, 0)
    assert not path.exists()
    rl_batch.write_completions(path, rollouts, 7, 2)
    rl_batch.write_completions(path, rollouts, 8, 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [7, 7, 8, 8]
