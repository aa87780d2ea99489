"""Hugging Face `generate` on the trainer's own model: the rollout fallback when vLLM is absent.

It shares the trainer's parameters, so a weight sync moves nothing (load_weights consumes the stream without
copying, so the sync path and its canary still run). Sampler log-probs come from `generate`'s processed
scores (after temperature, top-k and top-p), the same meaning as vLLM's `processed_logprobs`.
Sampling draws from the global torch RNG, forked and seeded per prompt: reproducible, and independent of batching.
"""

from __future__ import annotations

import torch

from optsys.rollout.engine import Completion, Sampling
from optsys.telemetry.progress import progress_items


class HFEngine:
    name = "hf"
    sleep_supported = False

    def __init__(self, model, *, pad_token_id: int, synced_gpus: bool = False, greedy_batch: int = 1):
        self.model = model
        self.pad_token_id = pad_token_id
        self.synced_gpus = synced_gpus  # FSDP ranks must run the same number of forwards
        self.greedy_batch = greedy_batch  # temperature 0 draws nothing, so greedy prompts may share a batch
        self.show_progress = False  # a bar over each generate call's batches (python -m optsys.eval sets it)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int]) -> list[list[Completion]]:
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        result: list[list[Completion]] = []
        try:
            # One call per prompt under its own seed: a prompt's samples depend on its seed alone, not on which
            # prompts share its batch (so 2 ranks draw what 1 process draws). Slower than batching prompts;
            # this engine is the fallback, vLLM the fast path.
            if sampling.temperature == 0 and self.greedy_batch > 1:
                starts = range(0, len(prompts), self.greedy_batch)
                for start in progress_items(starts, f"generate ({len(prompts)} prompts, greedy)",
                                            enabled=self.show_progress):
                    result += self._generate_chunk(prompts[start: start + self.greedy_batch], sampling, device)
                return result
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                pairs = progress_items(list(zip(prompts, seeds)), f"generate ({len(prompts)} prompts x "
                                       f"{sampling.n})", enabled=self.show_progress)
                for prompt, seed in pairs:
                    torch.manual_seed(seed)
                    result += self._generate_chunk([prompt], sampling, device)
        finally:
            model.train(was_training)
        return result

    def _generate_chunk(self, prompts, sampling: Sampling, device) -> list[list[Completion]]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left-padded: generation continues from the last column
            ids[i, width - len(p):] = torch.tensor(p)
            attn[i, width - len(p):] = 1
        greedy = sampling.temperature == 0  # as vLLM: temperature 0 means greedy
        sample_kw = {} if greedy else dict(temperature=sampling.temperature, top_p=sampling.top_p,
                                          top_k=sampling.top_k or None)
        out = self.model.generate(
            input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=not greedy, **sample_kw,
            max_new_tokens=sampling.max_new_tokens, num_return_sequences=sampling.n,
            eos_token_id=list(sampling.stop_token_ids) or None, pad_token_id=self.pad_token_id,
            output_scores=True, return_dict_in_generate=True, synced_gpus=self.synced_gpus)
        new = out.sequences[:, width:].cpu()
        # scores[t] [B*n, V]: processed logits at step t; -inf outside the top-p / top-k set
        logp = torch.stack([s.float().log_softmax(-1) for s in out.scores], 1).cpu()  # [B*n, L, V]
        stops = set(sampling.stop_token_ids)
        groups: list[list[Completion]] = []
        for row in range(new.shape[0]):
            tokens, lps, finish = [], [], "length"
            for t, tok in enumerate(new[row].tolist()):
                tokens.append(tok)
                lps.append(float(logp[row, t, tok]))
                if tok in stops:
                    finish = "stop"
                    break
            if row % sampling.n == 0:
                groups.append([])
            groups[-1].append(Completion(tuple(tokens), tuple(lps), finish))
        return groups

    @torch.no_grad()
    def token_logprobs(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
        device = next(self.model.parameters()).device
        result = []
        for seq, start in zip(sequences, starts):
            ids = torch.tensor([seq], device=device)
            logits = self.model(input_ids=ids).logits[0].float().log_softmax(-1)
            result.append([float(logits[i - 1, seq[i]]) for i in range(start, len(seq))])
        return result

    def load_weights(self, named_tensors) -> int:
        """The engine is the trainer's model: drain the stream (FSDP ranks must all take part) and count."""
        return sum(1 for _ in named_tensors)

    def load_adapter(self, named_tensors, config: dict, *, transport: str = "memory") -> int:
        """The engine is the trainer's (peft) model, adapter included: nothing to load; count what was sent."""
        return sum(1 for _ in named_tensors)

    def close(self) -> None:
        pass

    def sleep(self, *, discard_weights: bool) -> dict[str, float]:
        return {}  # the engine is the trained model: nothing to free

    def wake(self, tags: tuple[str, ...] = ("weights", "kv_cache")) -> dict[str, float]:
        return {}
