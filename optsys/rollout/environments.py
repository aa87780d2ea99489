"""Multi-turn RL environments: the protocol, lock-step episodes on a rollout engine, the built-in registry.

An environment is any object with

    reset(row: dict) -> str                               the first user turn, from a prompt row
    step(completion_text: str) -> (observation, reward, done)

`observation` is a str (rendered as a new user turn), a chat message dict ({"role": "tool", "content": ...}
for a tool result), or None when `done`. An optional `system` attribute (str) becomes the system turn.

run_episodes plays one episode per environment in lock step: each turn, one engine.generate call (n=1) for
all unfinished episodes. The token sequence is built by appending token ids, never by re-rendering and
re-tokenizing the conversation: the model's generated ids verbatim (trained, with the sampler's log-probs)
and, for each environment reply, the ids of the chat-template text that one more turn adds (masked,
log-prob 0). That text is found once per reply by rendering a fixed two-turn conversation with and without
the extra turn (TurnRenderer); with a template that renders every turn the same wherever it appears (ChatML)
prompt_ids + token_ids equal the template's tokens of the whole conversation (tests/rollout/test_environments.py).
The sequence is what the sampler conditioned on, so the trainer scores exactly the tokens that were drawn.

Tool calls (optsys.rollout.tools: ToolUse wraps an environment and answers `<tool_call>` turns with a "tool"
message) and the built-in games (optsys.rollout.games) build on this protocol. Built-in environments
(ENVIRONMENTS, make_environment): "guess" (GuessingGame: find a secret number in 0..n-1 from "higher"/"lower"
replies) and "arithmetic_tool" (answer an integer expression, with the calculator tool).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from optsys.data.tokenize import IGNORE, TokenizedExample
from optsys.errors import DataError
from optsys.rollout.engine import Sampling
from optsys.rollout.tools import ToolUse

Observation = Any  # str | dict (a chat message) | None


class Environment(Protocol):
    def reset(self, row: dict) -> str: ...

    def step(self, completion_text: str) -> tuple[Observation, float, bool]: ...


class EpisodeError(RuntimeError):
    """An environment broke the protocol (no observation while not done, a bad message); names the episode."""


# ---------------------------------------------------------------------------- episodes


@dataclass
class Episode:
    """One played episode. token_ids, logprobs and loss_mask are aligned, over everything after prompt_ids."""

    prompt_ids: list[int]  # the first prompt, rendered with the generation prompt
    token_ids: list[int] = field(default_factory=list)  # model turns and environment turns, in order
    logprobs: list[float] = field(default_factory=list)  # the sampler's, 0.0 at environment tokens
    loss_mask: list[bool] = field(default_factory=list)  # True at model tokens
    reward: float = 0.0  # sum of step rewards
    turns: int = 0  # model turns played
    done: bool = False  # the environment ended it
    truncated: bool = False  # stopped by max_turns or the max_tokens budget
    stop_reason: str = ""  # "done" | "max_turns" | "max_tokens"
    texts: list[str] = field(default_factory=list)  # each model turn's text (special tokens dropped)
    step_rewards: list[float] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)  # the engine's, per model turn
    turn_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each model turn in token_ids
    messages: list[dict] = field(default_factory=list)  # the conversation as chat messages (for logs)
    row: dict | None = None

    @property
    def model_tokens(self) -> int:
        return sum(self.loss_mask)

    def example(self) -> TokenizedExample:
        """prompt + tokens[:-1] as inputs; targets are the model's tokens, -100 at the prompt and environment
        tokens (as Rollout.example, with the loss mask applied)."""
        n = len(self.prompt_ids)
        ids = self.prompt_ids + self.token_ids[:-1]
        return TokenizedExample(ids, [IGNORE] * (n - 1) + [t if m else IGNORE
                                                           for t, m in zip(self.token_ids, self.loss_mask)])


class TurnRenderer:
    """Token ids of what the chat template adds for one more (non-assistant) turn plus the generation prompt.

    The delta is rendered on a fixed conversation [user, assistant] vs [user, assistant, turn] with a
    generation prompt, so it depends only on the new turn's message. What the template writes after an
    assistant's content (ChatML: `<|im_end|>\\n`) is the glue: when the model stopped on the template's
    end-of-turn token, only the rest of the glue (`\\n`) is prepended; otherwise (a turn cut at
    max_new_tokens, or stopped by another token) the whole glue is, so the end-of-turn token is present
    exactly once after every model turn."""

    _MARK = "optsys-turn-probe"

    def __init__(self, tokenizer):
        if tokenizer.chat_template is None:
            raise DataError("multi-turn episodes need a tokenizer with a chat template; this one has none")
        self.tokenizer = tokenizer
        self._base = [{"role": "user", "content": "u"}, {"role": "assistant", "content": self._MARK}]
        self._base_text = text = self._render(self._base, False)
        self.glue = text[text.rfind(self._MARK) + len(self._MARK):]
        glue_ids = self._encode(self.glue.lstrip())
        special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        self.end_of_turn_id = glue_ids[0] if glue_ids and glue_ids[0] in special else None
        if self.end_of_turn_id is not None:
            eot = tokenizer.convert_ids_to_tokens(self.end_of_turn_id)
            self.glue_after_eot = self.glue[self.glue.find(eot) + len(eot):] if eot in self.glue else self.glue
        else:
            self.glue_after_eot = self.glue
        probe = self._MARK + "-tool"
        try:
            self.tool_role = probe in self._render(self._base + [{"role": "tool", "content": probe}], True)
        except Exception:  # templates that validate roles raise on one they do not know
            self.tool_role = False

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def message(self, observation: Observation) -> dict:
        """The chat message an observation becomes (a tool result as a user turn if the template has no tool role)."""
        if isinstance(observation, str):
            return {"role": "user", "content": observation}
        if not (isinstance(observation, dict) and isinstance(observation.get("content"), str)
                and isinstance(observation.get("role"), str)):
            raise EpisodeError(f"an observation must be a str or a {{role, content}} message, got {observation!r}")
        if observation["role"] == "tool" and not self.tool_role:
            return {"role": "user", "content": f"<tool_response>\n{observation['content']}\n</tool_response>"}
        return {"role": observation["role"], "content": observation["content"]}

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))

    def delta_text(self, message: dict) -> str:
        """The text one more turn adds after a finished assistant turn, up to the next assistant's content."""
        base = self._base_text
        full = self._render(self._base + [message], True)
        if not full.startswith(base):
            raise DataError("the chat template is not prefix-stable: rendering one more turn rewrites the earlier "
                            "ones, so an episode's tokens cannot be built turn by turn; use a template that renders "
                            "each turn the same wherever it appears")
        return full[len(base):]

    def env_ids(self, last_model_ids: Sequence[int], message: dict) -> list[int]:
        """Token ids to append after a model turn for the environment's `message` and the next generation prompt."""
        ended = bool(last_model_ids) and self.end_of_turn_id is not None and last_model_ids[-1] == self.end_of_turn_id
        return self._encode((self.glue_after_eot if ended else self.glue) + self.delta_text(message))


def _turn_seed(seed: int, turn: int) -> int:
    blob = f"{seed}/turn/{turn}".encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=4).digest(), "little")


def run_episodes(engine, envs: Sequence[Environment], tokenizer, sampling: Sampling, seeds: Sequence[int], *,
                 rows: Sequence[dict], max_turns: int, max_tokens: int) -> list[Episode]:
    """Play one episode per environment (reset with the matching row), all in lock step.

    Each turn is one engine.generate call over the unfinished episodes (sampling.n must be 1: a GRPO group is
    group_size environments of the same row). An episode stops when the environment says done, after
    `max_turns` model turns, or when its next turn (environment reply + sampling.max_new_tokens) would take
    prompt + tokens past `max_tokens`; the last two mark it truncated (counted by summarize_episodes, not an
    error). Turn t of episode i samples with seed hash(seeds[i], t)."""
    if sampling.n != 1:
        raise ValueError(f"run_episodes plays one completion per environment (sampling.n=1), got n={sampling.n}; "
                         "make group_size environments per prompt row instead")
    if not (len(envs) == len(seeds) == len(rows)):
        raise ValueError(f"run_episodes: {len(envs)} environments, {len(seeds)} seeds and {len(rows)} rows; "
                         "give one seed and one row per environment")
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    renderer = TurnRenderer(tokenizer)
    budget = sampling.max_new_tokens
    episodes = []
    for i, (env, row) in enumerate(zip(envs, rows)):
        first = env.reset(row)
        if not isinstance(first, str):
            raise EpisodeError(f"episode {i}: reset() must return the first user turn as a str, got {first!r}")
        system = getattr(env, "system", None)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": first}]
        ids = renderer.prompt_ids(messages)
        if len(ids) + budget > max_tokens:
            raise DataError(f"episode {i}: the first prompt has {len(ids)} tokens, and with max_new_tokens={budget} "
                            f"exceeds max_tokens={max_tokens}; raise max_tokens (data.max_tokens)")
        episodes.append(Episode(prompt_ids=ids, messages=messages, row=row))

    active = list(range(len(envs)))
    turn = 0
    while active:
        groups = engine.generate([episodes[i].prompt_ids + episodes[i].token_ids for i in active], sampling,
                                 [_turn_seed(seeds[i], turn) for i in active])
        if len(groups) != len(active) or any(len(g) != 1 for g in groups):
            raise RuntimeError(f"the engine returned {[len(g) for g in groups]} completions for {len(active)} "
                               "prompts at n=1")
        still = []
        for i, group in zip(active, groups):
            ep, env, c = episodes[i], envs[i], group[0]
            start = len(ep.token_ids)
            ep.token_ids += c.token_ids
            ep.logprobs += [float(x) for x in c.logprobs]
            ep.loss_mask += [True] * len(c.token_ids)
            ep.turn_spans.append((start, len(ep.token_ids)))
            ep.finish_reasons.append(c.finish_reason)
            text = tokenizer.decode(list(c.token_ids), skip_special_tokens=True)
            ep.texts.append(text)
            ep.messages.append({"role": "assistant", "content": text})
            ep.turns += 1
            observation, reward, done = env.step(text)
            ep.step_rewards.append(float(reward))
            ep.reward += float(reward)
            if done:
                ep.done, ep.stop_reason = True, "done"
                continue
            if ep.turns >= max_turns:
                ep.truncated, ep.stop_reason = True, "max_turns"
                continue
            if observation is None:
                raise EpisodeError(f"episode {i} turn {ep.turns}: {type(env).__name__}.step returned no "
                                        "observation while not done")
            message = renderer.message(observation)
            env_ids = renderer.env_ids(c.token_ids, message)
            if len(ep.prompt_ids) + len(ep.token_ids) + len(env_ids) + budget > max_tokens:
                ep.truncated, ep.stop_reason = True, "max_tokens"
                continue
            ep.token_ids += env_ids
            ep.logprobs += [0.0] * len(env_ids)
            ep.loss_mask += [False] * len(env_ids)
            ep.messages.append(message)
            still.append(i)
        active = still
        turn += 1
    return episodes


def summarize_episodes(episodes: Sequence[Episode], prefix: str = "env/") -> dict[str, float]:
    """Counts and means for metrics.jsonl: episodes, done / truncated (by reason), turns, reward, tool turns."""
    n = len(episodes)
    if not n:
        return {f"{prefix}episodes": 0}
    tool_turns = sum(m["role"] == "tool" or m["content"].startswith("<tool_response>")
                     for e in episodes for m in e.messages[1:] if m["role"] != "assistant")
    return {
        f"{prefix}episodes": n,
        f"{prefix}done_rate": sum(e.done for e in episodes) / n,
        f"{prefix}truncated_max_turns": sum(e.stop_reason == "max_turns" for e in episodes),
        f"{prefix}truncated_max_tokens": sum(e.stop_reason == "max_tokens" for e in episodes),
        f"{prefix}mean_turns": sum(e.turns for e in episodes) / n,
        f"{prefix}mean_reward": sum(e.reward for e in episodes) / n,
        f"{prefix}mean_tokens": sum(len(e.token_ids) for e in episodes) / n,
        f"{prefix}tool_turns": tool_turns,
    }


# ---------------------------------------------------------------------------- built-in environments


def _guess(**kwargs) -> Environment:
    from optsys.rollout.games import GuessingGame  # games.py builds on this module: imported when one is made

    return GuessingGame(**kwargs)


def _arithmetic_tool(**kwargs) -> Environment:
    from optsys.rollout.games import ArithmeticEnv

    return ToolUse(ArithmeticEnv(**kwargs), tools=("calculator",))


ENVIRONMENTS: dict[str, Callable[..., Environment]] = {"guess": _guess, "arithmetic_tool": _arithmetic_tool}


def make_environment(name: str, **kwargs) -> Environment:
    if name not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {name!r}; built-in environments: {sorted(ENVIRONMENTS)}")
    return ENVIRONMENTS[name](**kwargs)
