"""The worked example in optsys/trainers/rl_batch.py's docstring, step by step: it must stay true."""

import threading
from types import SimpleNamespace

import pytest
import torch

import optsys.trainers.rl_batch as rl_batch
from optsys.methods import RL_ALGORITHMS
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
                          "rewards": {"correct": 0.0, "format": 1.0}, "correct": None, "advantage": 2.0,
                          "finish_reason": "stop"}
    assert len(rl_batch.completion_records(rollouts[:2], 7, 4)) == 2  # never more than the step has
    path = tmp_path / "completions.jsonl"
    rl_batch.write_completions(path, rollouts, 7, 0)
    assert not path.exists()
    rl_batch.write_completions(path, rollouts, 7, 2)
    rl_batch.write_completions(path, rollouts, 8, 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [7, 7, 8, 8]


# ---------------------------------------------------------------------------- issue 23: DAPO's filter, the KL,
# REINFORCE++'s whitening, truncation


def _single():
    return SimpleNamespace(size=1, rank=0, distributed=False)


def test_dapo_filters_on_correctness_not_on_the_length_penalty():
    """DAPO eq. 11 keeps a group when 0 < #correct < G. An all-wrong group whose lengths differ gets overlong
    penalties [0, -0.125, -0.52, -1]: its shaped rewards differ, but it is not informative (GRPO would turn its
    length penalties into full-size advantages). Rows without an answer are filtered on the unshaped reward."""
    from optsys.config import RLConfig
    from optsys.rollout.rewards import build_rewards

    def group(answer, texts, lengths):
        p = Prompt([1], "q", answer)
        return [Rollout(p, 0, [5] * n, [0.0] * n, "stop", text) for text, n in zip(texts, lengths)]

    ramp = [700, 800, 901, 1024]  # penalties 0, -0.125, -0.52, -1 (max_new_tokens 1024, overlong_buffer 256)
    short = [10, 20, 30, 40]
    answered = (group("8", ["#### 1", "#### 2", "#### 3", "#### 4"], ramp)  # all wrong: dropped
                + group("8", ["#### 8", "#### 2", "#### 3", "#### 4"], short)  # one right: kept
                + group("8", ["#### 8"] * 4, ramp))  # all right: dropped
    unanswered = (group(None, ["#### 1"] * 4, ramp)  # format all 1, only the penalty differs: dropped
                  + group(None, ["#### 1", "<think>x", "#### 1", "#### 1"], short))  # format differs: kept
    score_kw = dict(timeout_s=5, on_error="error", overlong_buffer=256, max_new_tokens=1024, stats=rl_batch.StepStats())
    rl_batch.score(answered, build_rewards(["correct", "digits"], None, "cpu"), **score_kw)
    rl_batch.score(unanswered, build_rewards(["format"], None, "cpu"), **score_kw)
    rollouts = answered + unanswered
    assert [round(r.reward, 3) for r in rollouts[:4]] == [0.0, -0.125, -0.52, -1.0]  # the advantages keep them
    assert [r.correct for r in rollouts[:8]] == [0, 0, 0, 0, 1, 0, 0, 0] and rollouts[-1].correct is None
    kept = rl_batch.keep_informative(rollouts, None, None, None, None, rl=RLConfig(group_size=4, max_refills=0),
                                     seed=0, step=1, train_prompts=[], groups=[0, 1, 2, 3, 4], world=_single(),
                                     stats=rl_batch.StepStats())
    assert kept == rollouts[4:8] + rollouts[16:20]


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo", "reinforce_pp", "ppo"])
def test_the_kl_to_the_reference_is_applied_once(method):
    """rl.kl_coef > 0 puts the KL either in the loss (GRPO family: k3) or in the token rewards (PPO, REINFORCE++:
    k1), never both: REINFORCE++ used to fold k1 into its returns and add k3 to the loss as well."""
    from optsys.config import RLConfig
    from optsys.trainers.rl import loss_kl

    g = torch.Generator().manual_seed(0)
    lengths = [3, 5, 2, 4]

    def token_advantages(shift: float) -> torch.Tensor:
        rollouts = []
        for i, n in enumerate(lengths):
            old = -torch.rand(n, generator=g)
            r = Rollout(Prompt([1], "q", None), i // 2, [5] * n, [0.0] * n, "stop", reward=float(i % 2),
                        old_logp=old, ref_logp=old - shift * torch.rand(n, generator=g), old_values=torch.zeros(n))
            rollouts.append(r)
        group_advantages(rollouts, 2, method)
        rl_batch.set_token_advantages(rollouts, method, kl_coef=0.1, gamma=1.0, lam=0.95, world=_single())
        return torch.cat([r.token_adv if r.token_adv is not None else torch.full((r.n_trained,), r.advantage)
                          for r in rollouts])

    in_reward = not torch.allclose(token_advantages(0.0), token_advantages(1.0))
    in_loss = loss_kl(RLConfig(kl_coef=0.1), method).get("kl_coef", 0.0) > 0
    assert in_loss != in_reward
    assert in_reward == RL_ALGORITHMS[method].kl_in_reward


class FakeAllReduce:
    """all_reduce_sum across rank threads: each rank's list, summed elementwise, back to every rank."""

    def __init__(self, ranks: int):
        self.barrier, self.slots = threading.Barrier(ranks, timeout=10), {}

    def __call__(self, values, world):
        self.slots[world.rank] = list(values)
        self.barrier.wait()
        out = [sum(v) for v in zip(*(self.slots[r] for r in sorted(self.slots)))]
        self.barrier.wait()
        return out


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_reinforce_pp_whitens_over_all_ranks(kl_coef, monkeypatch):
    """2 ranks give the token advantages of 1 process: the returns are whitened with statistics of every rank's
    tokens. Rank 0's rewards are all 0: whitened alone they would give all-zero advantages (kl_coef 0)."""
    g = torch.Generator().manual_seed(1)
    lengths, rewards = [3, 5, 2, 4, 6, 1, 3, 2], [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]

    def rollouts():
        out = []
        for i, (n, reward) in enumerate(zip(lengths, rewards)):
            old = -torch.rand(n, generator=torch.Generator().manual_seed(i))
            out.append(Rollout(Prompt([1], "q", None), i // 2, [5] * n, [0.0] * n, "stop", reward=reward,
                               old_logp=old, ref_logp=old - 0.5 * torch.rand(n, generator=g)))
        return out

    one = rollouts()
    rl_batch.set_token_advantages(one, "reinforce_pp", kl_coef=kl_coef, gamma=1.0, lam=0.95, world=_single())
    want = torch.cat([r.token_adv for r in one])
    assert float(torch.cat([r.token_adv for r in one[:4]]).abs().max()) > 0.1

    monkeypatch.setattr(rl_batch, "all_reduce_sum", FakeAllReduce(2))
    two, errors = rollouts(), []
    for r, o in zip(two, one):
        r.ref_logp = o.ref_logp

    def rank(i):
        try:
            world = SimpleNamespace(size=2, rank=i, distributed=True)
            rl_batch.set_token_advantages(two[4 * i : 4 * i + 4], "reinforce_pp", kl_coef=kl_coef, gamma=1.0,
                                          lam=0.95, world=world)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    torch.testing.assert_close(torch.cat([r.token_adv for r in two]), want, rtol=1e-5, atol=1e-6)


def test_truncated_fraction_counts_cut_episodes():
    """train/truncated_fraction: single-turn completions that hit max_new_tokens; multi-turn episodes cut by
    rl.max_turns or the context (their stop reasons are max_turns / max_tokens, never "length")."""
    p = Prompt([1], "q", None)

    def episode(reason):
        return SimpleNamespace(truncated=reason in ("max_turns", "max_tokens"), stop_reason=reason)

    rollouts = [Rollout(p, 0, [5], [0.0], "length"), Rollout(p, 0, [5], [0.0], "stop")]
    rollouts += [Rollout(p, 1, [5], [0.0], reason, episode=episode(reason))
                 for reason in ("max_turns", "max_tokens", "done", "done")]
    stats = rl_batch.StepStats()
    rl_batch.rollout_stats(rollouts, 2, stats)
    assert stats.means(_single())["train/truncated_fraction"] == pytest.approx(3 / 6)
