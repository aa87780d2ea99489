"""Under autocast the fused ops compute in the autocast dtype, as F.linear would (a custom autograd.Function
is not autocast by itself): fp32 hidden states and an fp32 lm_head under bf16 autocast run in bf16."""

import pytest
import torch
from optsys.kernels import (
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
    linear_token_logprobs,
    linear_token_logprobs_reference,
)

N, H, V = 37, 64, 1001


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * 2).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_()
    return hidden, weight, torch.randint(0, V, (N,), generator=g)


def _ops(hidden, weight, target, fused: bool):
    """Per-row cross-entropy and token log-prob, fused (torch backend) or the readable reference."""
    if fused:
        return (fused_linear_cross_entropy(hidden, weight, target, backend="torch", reduction="none"),
                linear_token_logprobs(hidden, weight, target, backend="torch"))
    return (linear_cross_entropy_reference(hidden, weight, target, reduction="none"),
            linear_token_logprobs_reference(hidden, weight, target))


@pytest.mark.parametrize("op", [0, 1], ids=["cross_entropy", "token_logprobs"])
def test_bf16_autocast_computes_in_bf16_and_grads_reach_fp32_params(op):
    hidden, weight, target = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _ops(hidden, weight, target, fused=True)[op]
    assert out.dtype == torch.float32  # fp32 accumulation and output whatever the compute dtype
    row_w = torch.randn(N, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((out * row_w).sum(), (hidden, weight))
    assert all(g.dtype == torch.float32 for g in grads)  # back through the cast to the fp32 leaves

    # Expected: the same op called on inputs cast to bf16 outside autocast. The gap to the fp32 result
    # is what tells the two apart (were the inputs not cast, `out` would be the fp32 result).
    as_bf16 = [t.detach().to(torch.bfloat16).requires_grad_() for t in (hidden, weight)]
    expected = _ops(*as_bf16, target, fused=True)[op]
    expected_grads = torch.autograd.grad((expected * row_w).sum(), as_bf16)
    in_fp32 = _ops(hidden.detach(), weight.detach(), target, fused=True)[op]
    gap = float((in_fp32 - expected).abs().max())
    err = float((out.detach() - expected.detach()).abs().max())
    assert gap > 1e-2 and err < 0.01 * gap, (err, gap)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e.float(), rtol=1e-2, atol=1e-2 * float(e.float().abs().max()))


def test_no_autocast_keeps_fp32():
    hidden, weight, target = _inputs(1)
    out = _ops(hidden, weight, target, fused=True)
    ref = _ops(hidden, weight, target, fused=False)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-4)
