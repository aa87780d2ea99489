"""A rollout step's batch, from prompts to packed micro-batches: the batch types, the prompt schedule, rollouts
(generate + score), advantages and micro-batches. optsys.trainers.rl runs the loop over them.

Worked example (checked by tests/test_rl_batch.py): GRPO, 8 training prompts q0..q7, seed=0,
rl.prompts_per_step=4, rl.group_size=2, on 2 ranks.

1. Prompts. step_prompts draws a step's 4 prompts from epochs of shuffled prompts, a pure function of (seed,
   step), so a resumed run draws the same: step 1 -> q4 q1 q5 q2, step 2 -> q0 q3 q7 q6 (the rest of the
   epoch), step 3 -> q3 q6 q1 q5 (the next epoch's order). Prompt group g is the step's g-th prompt.

2. Ranks. rank_groups gives each rank contiguous groups: rank 0 generates groups 0 1 (q4 q1), rank 1 groups
   2 3 (q5 q2). With rl.updates_per_batch=2, mini-batch u is groups [2u, 2u + 2) split over the ranks: rank 0
   gets 0 2 and rank 1 gets 1 3, so each mini-batch holds the same groups whatever the world size. A rank
   samples rl.group_size=2 completions of each of its prompts, seeded by the global group index (the same
   samples on any world size): 4 Rollouts per rank, 8 in the step, in group order.

3. Token rows. Rollout.example: inputs are the prompt ids and the completion ids but the last; targets are the
   next token, -100 (IGNORE) at prompt positions. Prompt 11 12 13, completion 21 22 2 (2: the stop token):

       inputs    11    12    13   21   22
       targets  -100  -100   21   22    2        3 trained tokens (n_trained), the completion's

   Multi-turn (data.task=guess): token_ids are model turn, environment reply, model turn, and loss_mask marks
   the model's tokens. The environment's tokens are in the row (the model conditions on them) but are never
   targets, and their sampler log-prob is 0 (only the 4 trained tokens' log-probs are used):

       token_ids  21 2 | 31 32 33 | 23 2          loss_mask  1 1 0 0 0 1 1
       inputs    11    12    13   21    2    31    32    33   23
       targets  -100  -100   21    2  -100  -100  -100   23    2      4 trained tokens

4. Rewards and advantages. Rewards of the 4 groups [1, 0] [0, 0] [1, 1] [0.5, 1] give (group_advantages)

       grpo     (r - mean) / (std + 1e-6)   [0.71, -0.71]  [0, 0]  [0, 0]  [-0.71, 0.71]
       dr_grpo  r - mean                    [0.5, -0.5]    [0, 0]  [0, 0]  [-0.25, 0.25]
       rloo     r - mean of the others      [1, -1]        [0, 0]  [0, 0]  [-0.5, 0.5]

   A completion's advantage is on each of its trained tokens (REINFORCE++, distillation and PPO set per-token
   ones: set_token_advantages). A group all right or all wrong carries no signal: DAPO's dynamic sampling drops
   and refills it (keep_informative; on the answer check, never on the overlong penalty).

5. Loss weights. micro_batches packs a rank's rows (best fit, <= data.max_tokens tokens a row) and gives every
   trained token the aggregation weight of its completion, normalized over all ranks' completions of the
   mini-batch (their lengths all-gathered). Completions of 3 2 4 1 (rank 0) and 3 3 2 2 (rank 1) trained tokens:

       token_mean           (DAPO, CISPO, RLOO, ...)  1/20 on every token
       seq_mean_token_mean  (GRPO, GSPO)              1/(8 x length): 1/24 1/16 1/32 1/8 | 1/24 1/24 1/16 1/16
       seq_sum_norm         (Dr. GRPO)                1/(8 x rl.max_new_tokens)

   So the sum of weight x per-token loss over every micro-batch of every rank is the method's aggregate over
   the mini-batch, however the rows are packed. Prompt and environment tokens carry no weight (not targets);
   a rank with fewer micro-batches than another runs zero-weight fillers to keep FSDP in step.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import time
from dataclasses import dataclass, field, replace

import torch

from optsys.config import DataConfig, RLConfig
from optsys.data.packing import PackedBatch, collate_packed, pack_best_fit_decreasing
from optsys.data.tasks import get_task
from optsys.data.tokenize import IGNORE, TokenizedExample
from optsys.errors import DataError
from optsys.losses.policy import (
    ADVANTAGE_ESTIMATORS,
    aggregation_weights,
    informative_groups,
    overlong_penalty,
    reinforce_pp_token_returns,
)
from optsys.methods import RL_ALGORITHMS
from optsys.parallel.dist import all_gather_objects, all_reduce_sum
from optsys.rollout.engine import Sampling, stable_seed
from optsys.rollout.environments import make_environment, run_episodes, summarize_episodes
from optsys.rollout.rewards import correct, score_completions
from optsys.telemetry.nvtx import phase
from optsys.trainers.common import epoch_order

# ---------------------------------------------------------------------------- batch types


@dataclass
class Prompt:
    ids: list[int]
    text: str  # the user turn, what reward functions see as `prompt`
    answer: str | None
    row: dict | None = None  # the task's row (multi-turn: what the environment is reset with)


@dataclass(eq=False)
class Rollout:
    """One completion of one prompt, with everything the update needs, per completion token."""

    prompt: Prompt
    group: int  # index of its prompt group in the step
    token_ids: list[int]  # everything after the prompt (multi-turn: model and environment turns)
    sampler_logp: list[float]  # aligned with token_ids (0 at environment tokens)
    finish_reason: str
    text: str = ""
    reward: float = 0.0  # what the advantages use: the reward functions' sum, plus DAPO's overlong penalty
    rewards: dict[str, float] = field(default_factory=dict)  # each reward function's value (before weights)
    score: float = 0.0  # the reward functions' weighted sum alone (before the penalty)
    correct: float | None = None  # the answer check's 1 / 0 (None: the row has no answer); DAPO filters on it
    advantage: float = 0.0
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    token_adv: torch.Tensor | None = None  # per-token advantages (REINFORCE++), else `advantage` everywhere
    loss_mask: list[bool] | None = None  # multi-turn: True at the model's tokens (None: all of them)
    old_values: torch.Tensor | None = None  # PPO: the critic's values before the update, per trained token
    returns: torch.Tensor | None = None  # PPO: GAE returns (value targets), per trained token
    episode: object = None  # multi-turn: the optsys.rollout.environments.Episode

    @property
    def n_trained(self) -> int:
        """Tokens the loss sees (the per-token tensors of the update have this length)."""
        return len(self.token_ids) if self.loss_mask is None else sum(self.loss_mask)

    @property
    def truncated(self) -> bool:
        """Cut before its end: the completion hit max_new_tokens; an episode ran out of turns or context."""
        return self.episode.truncated if self.episode is not None else self.finish_reason == "length"

    @property
    def trained_sampler_logp(self) -> list[float]:
        if self.loss_mask is None:
            return self.sampler_logp
        return [lp for lp, m in zip(self.sampler_logp, self.loss_mask) if m]

    def example(self) -> TokenizedExample:
        """prompt + tokens[:-1] as inputs; targets are the model's tokens (prompt and environment tokens -100)."""
        n = len(self.prompt.ids)
        ids = self.prompt.ids + self.token_ids[:-1]
        mask = self.loss_mask or [True] * len(self.token_ids)
        return TokenizedExample(ids, [IGNORE] * (n - 1) + [t if m else IGNORE for t, m in zip(self.token_ids, mask)])


@dataclass
class MicroBatch:
    batch: PackedBatch
    rollouts: list[Rollout]
    weights: torch.Tensor  # [N] aggregation weight per completion token
    real: bool = True  # False: a zero-weight filler that keeps FSDP ranks in step

    def per_token(self, attr: str) -> torch.Tensor:
        if attr == "advantage":
            return torch.cat([r.token_adv if r.token_adv is not None else torch.full((r.n_trained,), r.advantage)
                              for r in self.rollouts])
        if attr == "sampler_logp":
            return torch.cat([torch.tensor(r.trained_sampler_logp) for r in self.rollouts])
        return torch.cat([getattr(r, attr) for r in self.rollouts])

    def seq_ids(self) -> torch.Tensor:
        return torch.cat([torch.full((r.n_trained,), i) for i, r in enumerate(self.rollouts)])


@dataclass
class StepStats:
    """Per-step metrics as (sum, count) pairs, reduced over ranks before logging."""

    sums: dict = field(default_factory=dict)

    def add(self, name: str, total: float, count: float = 1.0) -> None:
        s, c = self.sums.get(name, (0.0, 0.0))
        self.sums[name] = (s + float(total), c + float(count))

    def means(self, world) -> dict[str, float]:
        keys = sorted(self.sums)
        if world.distributed:  # ranks may hold different keys (a reward error, a rank of fillers): use the union
            keys = sorted({k for share in all_gather_objects(keys, world) for k in share})
        flat = all_reduce_sum([v for k in keys for v in self.sums.get(k, (0.0, 0.0))], world)
        return {k: flat[2 * i] / flat[2 * i + 1] for i, k in enumerate(keys) if flat[2 * i + 1]}


# ---------------------------------------------------------------------------- the prompt schedule


def build_prompts(d: DataConfig, tokenizer, *, seed: int, max_new_tokens: int,
                  model_name: str) -> tuple[list[Prompt], list[Prompt]]:
    """Training and held-out prompts of the built-in task (or data.dataset), tokenized with the chat template,
    length-checked against d.max_tokens with room for max_new_tokens."""
    if tokenizer.chat_template is None:
        raise DataError(f"the tokenizer of {model_name} has no chat template, so RL prompts cannot be "
                        "rendered; use a model whose tokenizer_config.json carries one")
    if d.task is not None:
        task = get_task(d.task)
        sources = [(f"task:{d.task}/{split}", task.rl_prompts(split, n, difficulty=d.difficulty, seed=seed))
                   for split, n in (("train", d.num_train), ("test", d.num_eval))]
    else:
        from optsys.data.sources import load_rows

        def dataset_rows(source: str | None, split: str) -> list[dict]:
            if source is None:
                return []
            return [prompt_row(r, source, i) for i, r in enumerate(load_rows(source, split=split))]

        sources = [(d.dataset, dataset_rows(d.dataset, d.split)), (d.eval_dataset, dataset_rows(d.eval_dataset,
                                                                                                  d.eval_split))]
    out = []
    for name, rows in sources:
        prompts = []
        for i, row in enumerate(rows):
            ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
            if len(ids) + max_new_tokens > d.max_tokens:
                raise DataError(f"{name} row {i}: the prompt has {len(ids)} tokens, and with "
                                f"rl.max_new_tokens={max_new_tokens} exceeds data.max_tokens="
                                f"{d.max_tokens} (the engine's context); raise data.max_tokens")
            prompts.append(Prompt(list(ids), row["prompt"][-1]["content"], row.get("answer"), row))
        out.append(prompts)
    return out[0], out[1]


def prompts_sha256(prompts: list[Prompt]) -> str:
    """Content hash of the training prompts (token ids and answers): part of the resume fingerprint."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(repr((p.ids, p.answer)).encode())
    return h.hexdigest()


def prompt_row(row: dict, source: str, index: int) -> dict:
    """An RL row of a dataset: `prompt` (a string, or chat messages ending with the user's turn) and an optional
    `answer` (the reference reward functions such as `correct` compare with); other fields are kept."""
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        messages = [{"role": "user", "content": prompt}]
    elif (isinstance(prompt, list) and prompt and all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                                                        for m in prompt) and prompt[-1]["role"] == "user"):
        messages = prompt
    else:
        raise DataError(f"{source} row {index}: RL rows need a 'prompt' (a non-empty string, or a list of "
                        f"{{role, content}} messages ending with a user turn); got {str(prompt)[:120]!r} (fields: "
                        f"{sorted(row)})")
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise DataError(f"{source} row {index}: 'answer' must be a string or a number, got {type(answer).__name__}")
    return {**row, "prompt": messages, "answer": None if answer is None else str(answer)}


def step_prompts(prompts: list[Prompt], step: int, count: int, seed: int, round_: int = 0) -> list[Prompt]:
    """The `count` prompts of rollout step `step` (1-based): epochs of shuffled prompts, step after step;
    refill rounds (DAPO) draw from a separate seeded stream. Pure in (step, round): resume replays it."""
    if round_:
        rng = random.Random(stable_seed(seed, "refill", step, round_))
        return [prompts[rng.randrange(len(prompts))] for _ in range(count)]
    out = []
    for g in range((step - 1) * count, step * count):
        epoch, i = divmod(g, len(prompts))
        out.append(prompts[_epoch_order(len(prompts), seed, epoch)[i]])
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The trainers' epoch_order, cached: a step asks for it once per prompt."""
    return tuple(epoch_order(n, seed, epoch))


def rank_groups(num_groups: int, updates: int, world) -> list[int]:
    """The step's prompt groups this rank generates and trains, as global indices, mini-batch by mini-batch:
    mini-batch u is global groups [u G / U, (u + 1) G / U), split into contiguous equal parts over the ranks.
    So every mini-batch holds the same groups whatever the world size (config checks G % (U x ranks) == 0)."""
    per_update = num_groups // updates
    part = per_update // world.size
    return [u * per_update + world.rank * part + j for u in range(updates) for j in range(part)]


# ---------------------------------------------------------------------------- rollouts: generate + score


def generate(engine, train_prompts: list[Prompt], sampling: Sampling, tokenizer, fns, *, rl: RLConfig, seed: int,
             step: int, world, dynamic: bool, environment: str | None, env_kwargs: dict, max_tokens: int,
             stats: StepStats) -> list[Rollout]:
    """This rank's rollouts of `step`: its prompt groups (rank_groups), rl.group_size completions each, rewarded
    by the reward functions (multi-turn: played against `environment`, which gives the rewards); DAPO's dynamic
    sampling keeps the informative groups."""
    t = time.perf_counter()
    with phase("data"):
        mine = rank_groups(rl.prompts_per_step, rl.updates_per_batch, world)
        step_list = step_prompts(train_prompts, step, rl.prompts_per_step, seed)
        prompts = [step_list[g] for g in mine]
    if environment:
        rollouts = play_groups(engine, prompts, sampling, tokenizer, environment=environment, env_kwargs=env_kwargs,
                               seed=seed, step=step, round_=0, groups=mine, max_turns=rl.max_turns,
                               max_tokens=max_tokens, stats=stats)
        stats.add("time/generate_s", time.perf_counter() - t)  # the environment's steps included
    else:
        rollouts = generate_groups(engine, prompts, sampling, tokenizer, seed=seed, step=step, round_=0, groups=mine)
        stats.add("time/generate_s", time.perf_counter() - t)
        t = time.perf_counter()
        score(rollouts, fns, timeout_s=rl.reward_timeout_s, on_error=rl.on_reward_error,
              overlong_buffer=rl.overlong_buffer, max_new_tokens=rl.max_new_tokens, stats=stats)
        stats.add("time/reward_s", time.perf_counter() - t)
    rollout_stats(rollouts, rl.group_size, stats)
    if dynamic:
        rollouts = keep_informative(rollouts, engine, sampling, tokenizer, fns, rl=rl, seed=seed, step=step,
                                    train_prompts=train_prompts, groups=mine, world=world, stats=stats)
    return rollouts


def rollout_stats(rollouts: list[Rollout], group_size: int, stats: StepStats) -> None:
    """The step's reward, length and truncation metrics, before any filtering."""
    for r in rollouts:
        stats.add("reward/mean", r.reward)
        stats.add("train/response_length", r.n_trained)
        stats.add("train/truncated_fraction", r.truncated)
    if group_size > 1:  # the spread within groups: what group advantages divide by
        rewards = torch.tensor([r.reward for r in rollouts]).view(-1, group_size)
        stats.add("reward/std", float(rewards.std(dim=1).sum()), rewards.shape[0])


def generate_groups(engine, prompts: list[Prompt], sampling: Sampling, tokenizer, *, seed: int, step: int,
                    round_: int, groups: list[int]) -> list[Rollout]:
    """Sample each prompt's group; a prompt's seed depends on its global group index (world-size invariant)."""
    seeds = [stable_seed(seed, step, round_, g) for g in groups]
    with phase("generate"):
        outs = engine.generate([p.ids for p in prompts], sampling, seeds)
    rollouts = []
    for i, (p, group) in zip(groups, zip(prompts, outs)):
        for c in group:
            if not c.token_ids:  # an engine may return nothing for an immediate stop; train on the stop token
                raise DataError(f"the engine returned an empty completion for prompt {p.text!r}")
            text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
            rollouts.append(Rollout(p, i, list(c.token_ids), list(c.logprobs), c.finish_reason, text))
    return rollouts


def play_groups(engine, prompts: list[Prompt], sampling: Sampling, tokenizer, *, environment: str, env_kwargs: dict,
                seed: int, step: int, round_: int, groups: list[int], max_turns: int, max_tokens: int,
                stats: StepStats) -> list[Rollout]:
    """Multi-turn rollouts: sampling.n (rl.group_size) episodes of each prompt row against `environment`, played in
    lock step (optsys.rollout.environments.run_episodes). Rewards come from the environment; the environment's
    tokens are in each sequence but masked out of the loss."""
    k = sampling.n
    owners = [(g, p) for g, p in zip(groups, prompts) for _ in range(k)]
    envs = [make_environment(environment, **env_kwargs) for _ in owners]
    seeds = [stable_seed(seed, step, round_, g, i % k) for i, (g, _) in enumerate(owners)]
    with phase("generate"):  # the environment's steps included
        episodes = run_episodes(engine, envs, tokenizer, replace(sampling, n=1), seeds,
                                rows=[p.row for _, p in owners], max_turns=max_turns, max_tokens=max_tokens)
    for key, value in summarize_episodes(episodes).items():
        stats.add(key, value * len(episodes), len(episodes))
    return [Rollout(Prompt(ep.prompt_ids, p.text, p.answer, p.row), g, ep.token_ids, ep.logprobs,
                    ep.stop_reason, " | ".join(ep.texts), reward=ep.reward, loss_mask=ep.loss_mask, episode=ep)
            for ep, (g, p) in zip(episodes, owners)]


def score(rollouts: list[Rollout], fns, *, timeout_s: float, on_error: str, overlong_buffer: int,
          max_new_tokens: int, stats: StepStats) -> None:
    """Each rollout's reward: the weighted reward functions (its `score`), plus DAPO's overlong penalty over the
    last overlong_buffer tokens before max_new_tokens; and where the row has an answer, `correct`: the answer
    check among the reward functions (`correct`, else `numeric`), else the `correct` rule itself."""
    with phase("reward"):
        result = score_completions(fns, [(r.prompt.text, r.text, r.prompt.answer) for r in rollouts],
                                   timeout_s=timeout_s, on_error=on_error)
    lengths = torch.tensor([len(r.token_ids) for r in rollouts], dtype=torch.float32)
    penalty = (overlong_penalty(lengths, max_len=max_new_tokens, buffer=overlong_buffer)
               if overlong_buffer > 0 else torch.zeros_like(lengths))
    check = next((result.per_function[n] for n in ("correct", "numeric") if n in result.per_function), None)
    for i, r in enumerate(rollouts):
        r.score = float(result.total[i])
        r.reward = r.score + float(penalty[i])
        r.rewards = {name: float(values[i]) for name, values in result.per_function.items()}
        if overlong_buffer > 0:
            r.rewards["overlong_penalty"] = float(penalty[i])
        if r.prompt.answer is not None:
            r.correct = (check[i] if check is not None
                         else correct(r.text, prompt=r.prompt.text, answer=r.prompt.answer))
    for name, values in result.per_function.items():
        stats.add(f"reward/{name}", sum(values), len(values))
    for name, n in {**result.errors, **result.timeouts}.items():
        stats.add(f"reward/errors_{name}", n, 1)
    if overlong_buffer > 0:
        stats.add("reward/overlong_penalty", float(penalty.sum()), len(rollouts))


def keep_informative(rollouts: list[Rollout], engine, sampling: Sampling, tokenizer, fns, *, rl: RLConfig, seed: int,
                     step: int, train_prompts: list[Prompt], groups: list[int], world,
                     stats: StepStats) -> list[Rollout]:
    """DAPO dynamic sampling: keep the informative groups (informative_rollouts), refilling from extra rounds up
    to rl.max_refills. Every rank runs a refill round while any rank still needs one (the HF engine under FSDP
    must make the same generate calls on every rank)."""
    informative = functools.partial(informative_rollouts, group_size=rl.group_size)
    kept = informative(rollouts)
    stats.add("train/informative_fraction", len(kept) / max(1, len(rollouts)))
    for round_ in range(1, rl.max_refills + 1):
        (short,) = all_reduce_sum([float(len(kept) < len(groups) * rl.group_size)], world)
        if not short:
            break
        extra = step_prompts(train_prompts, step, len(groups), seed + groups[0], round_)
        t = time.perf_counter()
        more = generate_groups(engine, extra, sampling, tokenizer, seed=seed, step=step, round_=round_, groups=groups)
        stats.add("time/generate_s", time.perf_counter() - t)
        score(more, fns, timeout_s=rl.reward_timeout_s, on_error=rl.on_reward_error,
              overlong_buffer=rl.overlong_buffer, max_new_tokens=rl.max_new_tokens, stats=StepStats())
        kept += informative(more)
    kept = kept[: len(groups) * rl.group_size]
    stats.add("train/kept_groups", len(kept) // rl.group_size)
    return kept  # may be empty: the step then makes no update (FSDP ranks run zero-weight fillers)


def informative_rollouts(rollouts: list[Rollout], group_size: int) -> list[Rollout]:
    """The groups DAPO's filter keeps (eq. 11: 0 < #correct < G), on the answer check's verdicts; for rows without
    an answer, the groups whose unshaped rewards (`score`) differ. Never on the shaped reward: the overlong penalty
    alone would make an all-wrong group of different lengths look informative, and GRPO's std normalisation would
    blow its small length penalties up to full-size advantages."""
    values = torch.tensor([r.score if r.correct is None else r.correct for r in rollouts]).view(-1, group_size)
    keep = informative_groups(values)
    return [r for i, r in enumerate(rollouts) if keep[i // group_size]]


# ---------------------------------------------------------------------------- advantages


def group_advantages(rollouts: list[Rollout], group_size: int, method: str) -> None:
    """Outcome advantages per completion from its group's rewards (GRPO / Dr. GRPO / RLOO / REINFORCE++)."""
    algo = RL_ALGORITHMS[method]
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32).view(-1, group_size)
    if algo.advantage == "teacher_kl":  # rewards are metrics only; advantages come from the teacher per token
        return
    if algo.advantage == "grpo":
        adv = ADVANTAGE_ESTIMATORS["grpo"](rewards, scale_std=algo.scale_std)
    elif algo.advantage == "rloo":
        adv = ADVANTAGE_ESTIMATORS["rloo"](rewards)
    else:  # reinforce_pp_token: return-to-go whitened over all tokens of the batch (set in set_token_advantages)
        adv = rewards
    for r, a in zip(rollouts, adv.reshape(-1).tolist()):
        r.advantage = a


def set_token_advantages(rollouts: list[Rollout], method: str, *, kl_coef: float, gamma: float, lam: float,
                         world) -> None:
    """Per-token advantages: PPO's GAE, REINFORCE++ (KL-shaped return-to-go, whitened over the batch) or
    distillation (-(log pi - log teacher) per token, the negative per-token reverse KL estimate)."""
    kind = RL_ALGORITHMS[method].advantage
    if kind == "gae":
        gae_advantages(rollouts, kl_coef=kl_coef, gamma=gamma, lam=lam, world=world)
        return
    if kind == "teacher_kl":
        for r in rollouts:
            r.token_adv = -(r.old_logp - r.ref_logp)
        return
    if kind != "reinforce_pp_token":
        return
    ids = torch.cat([torch.full((r.n_trained,), i) for i, r in enumerate(rollouts)]
                    or [torch.zeros(0, dtype=torch.long)])  # a rank with no rollouts still joins the whitening
    kl = None
    if kl_coef > 0 and rollouts:
        kl = torch.cat([r.old_logp - r.ref_logp for r in rollouts])  # k1: the KL goes in the reward, k1 per token
    returns = reinforce_pp_token_returns(torch.tensor([r.reward for r in rollouts], dtype=torch.float32),
                                         torch.ones(len(ids), dtype=torch.bool), ids, kl=kl,
                                         kl_coef=kl_coef if rollouts else 0.0)
    adv = whiten(returns, world)  # over every rank's tokens (the paper's batch), as one process would
    start = 0
    for r in rollouts:
        r.token_adv = adv[start : start + r.n_trained]
        start += r.n_trained


def gae_advantages(rollouts: list[Rollout], *, kl_coef: float, gamma: float, lam: float, world) -> None:
    """PPO's advantages: token rewards (the outcome on the last model token, minus kl_coef x (log pi - log ref)
    per token when kl_coef > 0: the KL in the reward, as in RLHF PPO), GAE with the critic's values (Schulman
    et al. 2016), then whitened over the batch's tokens; returns = advantages + values are the value targets."""
    width = max((r.n_trained for r in rollouts), default=0)
    rewards, values, mask = (torch.zeros(len(rollouts), width) for _ in range(3))
    for i, r in enumerate(rollouts):
        n = r.n_trained
        mask[i, :n] = 1
        values[i, :n] = r.old_values
        if kl_coef > 0:
            rewards[i, :n] = -kl_coef * (r.old_logp - r.ref_logp)
        rewards[i, n - 1] += r.reward
    adv, returns = ADVANTAGE_ESTIMATORS["gae"](rewards, values, mask, gamma=gamma, lam=lam)
    m = mask.bool()
    adv[m] = whiten(adv[m], world)
    for i, r in enumerate(rollouts):
        r.token_adv, r.returns = adv[i, : r.n_trained].clone(), returns[i, : r.n_trained].clone()


def whiten(values: torch.Tensor, world, eps: float = 1e-6) -> torch.Tensor:
    """(values - mean) / (std + eps) with the mean and unbiased std of every rank's values (count, sum and sum of
    squares reduced over ranks in one collective), so 2 ranks give what 1 process gives. Every rank calls it, even
    with no values."""
    n, total, squares = all_reduce_sum([float(values.numel()), float(values.double().sum()),
                                        float((values.double() ** 2).sum())], world)
    mean = total / max(n, 1)
    std = max(squares / max(n, 1) - mean**2, 0.0) ** 0.5 * (n / max(n - 1, 1)) ** 0.5  # unbiased, as torch.std
    return (values - mean) / (std + eps)


# ---------------------------------------------------------------------------- micro-batches


def pack(rollouts: list[Rollout], max_tokens: int) -> list[list[int]]:
    """Bins of rollout indices, each one packed row of <= max_tokens tokens (best-fit decreasing)."""
    return pack_best_fit_decreasing([len(r.prompt.ids) + len(r.token_ids) - 1 for r in rollouts], max_tokens)


def micro_batches(rollouts: list[Rollout], max_tokens: int, agg: str, max_len: int, world,
                  filler: list[Rollout]) -> list[MicroBatch]:
    """This rank's packed micro-batches of a mini-batch, every token weighted so that the sum over all ranks'
    micro-batches is the method's aggregate over the whole mini-batch; padded with zero-weight fillers to the
    largest rank's count (FSDP ranks run the same number of forwards)."""
    lengths = [r.n_trained for r in rollouts]
    # global normalizers: total completion tokens and sequences over all ranks
    shares = all_gather_objects(lengths, world) if world.distributed else [lengths]
    all_lengths = [n for share in shares for n in share]
    weight_of = aggregation_weights(torch.tensor(all_lengths, dtype=torch.float32), agg, max_len=max_len)
    offset = sum(len(share) for share in shares[: world.rank])
    mbs = []
    for bin_ in pack(rollouts, max_tokens) if rollouts else []:
        rows = [rollouts[i] for i in bin_]
        w = torch.cat([torch.full((rollouts[i].n_trained,), float(weight_of[offset + i])) for i in bin_])
        mbs.append(MicroBatch(collate_packed([r.example() for r in rows]), rows, w))
    (most,) = (max(all_gather_objects(len(mbs), world)),) if world.distributed else (len(mbs),)
    while len(mbs) < most:
        rows = filler
        mbs.append(MicroBatch(collate_packed([r.example() for r in rows]), rows,
                              torch.zeros(sum(r.n_trained for r in rows)), real=False))
    return mbs


# ---------------------------------------------------------------------------- completions.jsonl


def completion_records(rollouts: list[Rollout], step: int, count: int) -> list[dict]:
    """`count` of the step's rollouts spread evenly over them (so over its prompt groups), each as {step, prompt,
    answer, completion, reward, rewards (per function), correct (the answer check, None without an answer),
    advantage (the mean over its tokens for per-token methods), finish_reason}: what completions.jsonl holds."""
    picked = [rollouts[i * len(rollouts) // count] for i in range(min(count, len(rollouts)))]
    out = []
    for r in picked:
        advantage = float(r.token_adv.mean()) if r.token_adv is not None and r.token_adv.numel() else r.advantage
        out.append({"step": step, "prompt": r.prompt.text, "answer": r.prompt.answer, "completion": r.text,
                    "reward": r.reward, "rewards": dict(r.rewards), "correct": r.correct, "advantage": advantage,
                    "finish_reason": r.finish_reason})
    return out


def write_completions(path, rollouts: list[Rollout], step: int, count: int) -> None:
    """Append completion_records to `path` (flushed per call, so a killed run keeps what it wrote)."""
    if count <= 0 or not rollouts:
        return
    with open(path, "a") as f:
        for record in completion_records(rollouts, step, count):
            f.write(json.dumps(record) + "\n")
