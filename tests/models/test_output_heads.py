"""The fused losses must see the model's own logits: lm_head bias, logit scale and final softcap included.

Each tiny model (built in memory) gets a large random lm_head (and bias), so that its softcap or scale
changes the loss by far more than the tolerance; the reference is the model's own `forward` logits,
one sequence at a time, against the fused path on one packed row.
"""

import pytest
import torch
import torch.nn.functional as F
import transformers

from optsys.config import ConfigError
from optsys.models.heads import output_head
from optsys.models.packed import attach_forward_methods, packed_sequence_logps, token_loss_sum

TINY = dict(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, tie_word_embeddings=False)
CONFIGS = {
    "qwen2": lambda: transformers.Qwen2Config(**TINY),
    "gemma2": lambda: transformers.Gemma2Config(**TINY, head_dim=32, final_logit_softcapping=3.0),
    "cohere": lambda: transformers.CohereConfig(**TINY, logit_scale=0.3),
    "granite": lambda: transformers.GraniteConfig(**TINY, logits_scaling=3.0),
    "phi": lambda: transformers.PhiConfig(**TINY),  # lm_head with a bias
}
LENS = [5, 9, 3]


def tiny_model(name):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="sdpa").float()
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.normal_(0, 1.0)  # logits of std ~8: a softcap of 3 or a scale of 0.3 matters
        if head.bias is not None:
            head.bias.normal_(0, 2.0)
    return model.eval()


def packed_row():
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 301, (n,), generator=gen) for n in LENS]
    input_ids = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(n) for n in LENS])[None]
    # next token within each sequence; a sequence's last position has none
    targets = torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in seqs])[None]
    return seqs, input_ids, position_ids, targets


def reference_token_ce(model, seqs):
    """[T] cross-entropy from the model's own forward logits, each sequence alone (0 at a last position)."""
    out = []
    for s in seqs:
        logits = model(s[None]).logits[0].float()
        out += [F.cross_entropy(logits[:-1], s[1:], reduction="none"), logits.new_zeros(1)]
    return torch.cat(out)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_token_losses_equal_model_forward(name):
    model = tiny_model(name)
    seqs, input_ids, position_ids, targets = packed_row()
    with torch.no_grad():
        ref = reference_token_ce(model, seqs)
        ce = token_loss_sum(model, targets, input_ids=input_ids, position_ids=position_ids, seq_lens=LENS,
                            reduction="none")
        # one "sequence" per position: per-token log-probs (0 where the target is -100)
        cu = torch.arange(targets.numel() + 1)
        logps, counts = packed_sequence_logps(model, input_ids, position_ids, LENS, targets, cu, average=False)
    torch.testing.assert_close(ce, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logps, -ref, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == (targets[0] != -100).long().tolist()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_loss_gradients_equal_model_forward(name):
    """CE with every weight trained; log-probs with the lm_head frozen (LoRA's case, the log-prob op's fold)."""
    seqs, input_ids, position_ids, targets = packed_row()
    grads = {}
    for path in ("ref", "ce", "logps"):
        model = tiny_model(name)
        if path == "ref":
            loss = reference_token_ce(model, seqs).sum()
        elif path == "ce":
            loss = token_loss_sum(model, targets, input_ids=input_ids, position_ids=position_ids, seq_lens=LENS)
        else:
            model.get_output_embeddings().requires_grad_(False)
            cu = torch.tensor([0, *torch.tensor(LENS).cumsum(0).tolist()])
            loss = -packed_sequence_logps(model, input_ids, position_ids, LENS, targets, cu, average=False)[0].sum()
        loss.backward()
        grads[path] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    head = {n for n, p in model.named_parameters() if n.startswith("lm_head")}
    assert set(grads["ce"]) == set(grads["ref"]) and set(grads["logps"]) == set(grads["ref"]) - head
    for n, g in grads["ref"].items():
        tol = dict(rtol=1e-4, atol=1e-4 * float(g.abs().max()))  # fp32 noise of packed vs one-at-a-time attention
        torch.testing.assert_close(grads["ce"][n], g, **tol, msg=lambda m, n=n: f"ce {n}: {m}")
        if n not in head:
            torch.testing.assert_close(grads["logps"][n], g, **tol, msg=lambda m, n=n: f"logps {n}: {m}")


def test_output_head_reads_each_kind():
    heads = {name: output_head(tiny_model(name)) for name in CONFIGS}
    assert heads["qwen2"].bias is None and heads["qwen2"].scale == 1.0 and heads["qwen2"].softcap is None
    assert heads["gemma2"].softcap == 3.0
    assert heads["cohere"].scale == pytest.approx(0.3)
    assert heads["granite"].scale == pytest.approx(1 / 3.0)
    assert heads["phi"].bias is not None


def test_unknown_head_attribute_is_refused():
    cfg = transformers.Qwen2Config(**TINY)
    cfg.logits_scaling = 4.0  # Granite divides by it, HyperCLOVA X multiplies: unknown for qwen2
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ConfigError, match="logits_scaling=4.0.*'qwen2'"):
        output_head(model)
    with pytest.raises(ConfigError, match="logits_scaling"):  # the trainers' setup, before any step
        attach_forward_methods(model)
    cfg.logits_scaling = 1.0  # neutral: accepted
    assert output_head(model).scale == 1.0


def test_lora_on_lm_head_is_refused():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("qwen2"), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ConfigError, match="lm_head"):
        output_head(model)


@pytest.mark.parametrize("bias, scale, softcap, temperature", [
    (False, 0.37, None, 0.8), (True, 1.0, None, 1.0), (True, 0.37, None, 0.8), (False, 2.0, 1.5, 1.0),
    (True, 0.37, 1.5, 1.0),
])
def test_sequence_logprobs_with_head_options_equal_reference(bias, scale, softcap, temperature):
    from optsys.losses.sequence import sequence_logprobs

    gen = torch.Generator().manual_seed(2)
    h, w = torch.randn(23, 17, generator=gen), torch.randn(37, 17, generator=gen)
    b = torch.randn(37, generator=gen) if bias else None
    t = torch.randint(0, 37, (23,), generator=gen)
    t[[0, 9]] = -100
    cu = torch.tensor([0, 6, 7, 23])
    z = scale * (h @ w.T + (0 if b is None else b))
    z = z if softcap is None else softcap * torch.tanh(z / softcap)
    lp = torch.log_softmax(z / temperature, -1).gather(-1, t.clamp(min=0)[:, None])[:, 0] * (t != -100)
    ref = torch.stack([lp[:6].sum(), lp[6:7].sum(), lp[7:].sum()])
    got, _ = sequence_logprobs(h, w, t, cu_seqlens=cu, bias=b, scale=scale, softcap=softcap,
                               temperature=temperature)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_sequence_logprobs_refuses_temperature_after_softcap():
    from optsys.losses.sequence import sequence_logprobs

    h, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="temperature=0.7 with a softcapped"):
        sequence_logprobs(h, w, t, cu_seqlens=torch.tensor([0, 3]), softcap=2.0, temperature=0.7)
