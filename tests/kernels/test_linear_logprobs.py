"""linear_token_logprobs (+ entropy) vs its reference: the chunked torch path and the Triton interpreter."""

import pytest
import torch
from optsys.kernels import _utils, linear_token_logprobs, linear_token_logprobs_reference

N, H, V = 37, 29, 1001


def make_inputs(n=N, h=H, v=V, dtype=torch.float32, *, scale=1.0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device=device, dtype=dtype).requires_grad_()
    return hidden, weight, torch.randint(0, v, (n,), generator=g).to(device)


def check_against_reference(assert_close, backend, dtype=torch.float32, *, entropy=True, temperature=1.0,
                            scale=1.0, n=N, h=H, v=V, device="cpu", grad_outputs=("lp", "ent"), rtol=None):
    """Outputs and grads (through the chosen outputs, random weights per row) vs the reference."""
    hidden, weight, target = make_inputs(n, h, v, dtype, scale=scale, device=device)
    ref_params = [hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()]
    out = linear_token_logprobs(hidden, weight, target, temperature=temperature, return_entropy=entropy,
                                backend=backend)
    ref = linear_token_logprobs_reference(*ref_params, target, temperature=temperature,
                                          return_entropy=entropy)
    out, ref = (out, ref) if entropy else ((out,), (ref,))
    gen = torch.Generator().manual_seed(1)
    objective, ref_objective = 0.0, 0.0
    for name, o, r in zip(("lp", "ent"), out, ref):
        assert o.dtype == torch.float32
        assert_close(o, r, dtype, name, rtol)
        if name in grad_outputs:
            g = torch.randn(n, generator=gen).to(device)
            objective, ref_objective = objective + (o * g).sum(), ref_objective + (r * g).sum()
    grads = torch.autograd.grad(objective, (hidden, weight))
    for name, a, e in zip(("hidden", "weight"), grads, torch.autograd.grad(ref_objective, ref_params)):
        assert a.dtype == dtype
        assert_close(a, e, dtype, f"grad {name}", rtol)
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_torch_matches_reference(assert_close, small_chunks, dtype, temperature):
    check_against_reference(assert_close, "torch", dtype, temperature=temperature)


@pytest.mark.parametrize("grad_outputs", [("lp",), ("ent",)])
def test_torch_single_output_grads(assert_close, small_chunks, grad_outputs):
    check_against_reference(assert_close, "torch", grad_outputs=grad_outputs)


def test_torch_without_entropy(assert_close, small_chunks):
    check_against_reference(assert_close, "torch", entropy=False, temperature=1.3)


@pytest.mark.parametrize("dtype, temperature", [(torch.float32, 0.7), (torch.bfloat16, 1.0)])
def test_triton_matches_reference(assert_close, triton_cpu, dtype, temperature):
    check_against_reference(assert_close, triton_cpu, dtype, temperature=temperature, v=301)


@pytest.mark.parametrize("dtype, temperature, grad_outputs", [
    (torch.float32, 0.7, ("lp", "ent")), (torch.bfloat16, 1.0, ("lp", "ent")), (torch.float32, 1.3, ("ent",))])
def test_hybrid_matches_reference(assert_close, hybrid_cpu, dtype, temperature, grad_outputs):
    check_against_reference(assert_close, hybrid_cpu, dtype, temperature=temperature, v=301,
                            grad_outputs=grad_outputs)


@pytest.mark.parametrize("backend_name", ["torch", "hybrid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_weight_grad_folded_into_forward(assert_close, small_chunks, monkeypatch, request, backend_name,
                                                dtype):
    """A frozen lm_head and no entropy: one pass over the logits in forward, none in backward."""
    if backend_name == "hybrid":
        request.getfixturevalue("hybrid_cpu")
    from optsys.kernels import backends, chunked
    from optsys.kernels import linear_logprobs as llp

    passes = []
    real = chunked.torch_pass
    for mod in (backends, llp):  # every caller of torch_pass: the ops' eager fold and the backend switch
        monkeypatch.setattr(mod, "torch_pass", lambda *a, **k: passes.append(1) or real(*a, **k))
    hidden, weight, target = make_inputs(v=301, dtype=dtype)
    weight.requires_grad_(False)
    ref_hidden = hidden.detach().clone().requires_grad_()
    out = linear_token_logprobs(hidden, weight, target, temperature=0.8, backend=backend_name)
    ref = linear_token_logprobs_reference(ref_hidden, weight, target, temperature=0.8)
    assert_close(out, ref, dtype, "logprobs")
    g = torch.randn(N, generator=torch.Generator().manual_seed(2))
    (gh,) = torch.autograd.grad(out, hidden, g, retain_graph=True)
    assert_close(gh, torch.autograd.grad(ref, ref_hidden, g)[0], dtype, "grad hidden")
    assert len(passes) == 1, "the backward recomputed the logits"
    (again,) = torch.autograd.grad(out, hidden, 2 * g)  # a retained graph's second backward
    assert_close(again, 2 * gh, dtype, "second backward")


def _spy_backward(monkeypatch):
    """Record, for every backward pass over the logits, whether its coefficients carry the entropy's delta term
    and which chunk bodies of the torch path ran."""
    from optsys.kernels import chunked
    from optsys.kernels import linear_logprobs as llp

    seen = {"delta": [], "fast": 0, "general": 0}
    real_grads = llp.compute_grads

    def compute_grads(*a, **k):
        seen["delta"].append(a[6].delta is not None)  # (backend, hidden, weight, bias, tgt, lse, c, ...)
        return real_grads(*a, **k)

    monkeypatch.setattr(llp, "compute_grads", compute_grads)
    for body in ("fast", "general"):
        real = getattr(chunked, f"_{body}_chunk")
        monkeypatch.setattr(chunked, f"_{body}_chunk",
                            lambda *a, _r=real, _b=body, **k: seen.__setitem__(_b, seen[_b] + 1) or _r(*a, **k))
    return seen


def test_logged_entropy_takes_the_fast_backward(assert_close, backend, monkeypatch):
    """RL returns the entropy to log it and differentiates only the log-probs: the backward must not carry a
    (zero) entropy gradient, so the torch path runs its one-tile fast body; grads still match the reference."""
    seen = _spy_backward(monkeypatch)
    hidden, weight, target = make_inputs(v=301)
    lp, ent = linear_token_logprobs(hidden, weight, target, temperature=0.9, return_entropy=True, backend=backend)
    seen["fast"] = seen["general"] = 0  # the forward's entropy needs the general body; count backward only
    g = torch.randn(N, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((lp * g).sum(), (hidden, weight))
    assert seen["delta"] == [False], "a zero entropy gradient reached the backward"
    if backend == "torch":
        assert seen["fast"] > 0 and seen["general"] == 0, seen
    ref_params = [hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()]
    ref_lp = linear_token_logprobs_reference(*ref_params, target, temperature=0.9)
    for name, a, e in zip(("hidden", "weight"), grads, torch.autograd.grad((ref_lp * g).sum(), ref_params)):
        assert_close(a, e, torch.float32, f"grad {name}")


def test_entropy_bonus_takes_the_general_backward(assert_close, small_chunks, monkeypatch):
    """Backprop through the entropy (an entropy bonus) is supported, on the general path with its delta term."""
    seen = _spy_backward(monkeypatch)
    check_against_reference(assert_close, "torch", temperature=0.9, v=301, grad_outputs=("lp", "ent"))
    assert seen["delta"] == [True] and seen["general"] > 0


def test_large_logits_no_overflow(assert_close, backend):
    # Logits ~ 1e2: their own fp32 rounding (~1e-5 absolute) bounds the agreement of any two paths.
    out, grads = check_against_reference(assert_close, backend, scale=100.0, v=301, rtol=1e-4)
    assert all(torch.isfinite(t).all() for t in (*out, *grads))


@pytest.mark.parametrize("entropy", [True, False])  # False: the torch path's one-tile fast body
def test_gradcheck_fp64(monkeypatch, entropy):
    monkeypatch.setattr(_utils, "CHUNK_BYTES", 4 * 4 * 13)  # 4-row chunks
    torch.manual_seed(0)
    hidden = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 13, (11,))

    def fn(h, w):
        return linear_token_logprobs(h, w, target, temperature=0.8, return_entropy=entropy, backend="torch")

    assert torch.autograd.gradcheck(fn, (hidden, weight))


def test_bad_inputs():
    hidden, weight, target = make_inputs(v=50)
    with pytest.raises(ValueError, match=r"target\[0\] = -100 is outside \[0, 50\)"):
        linear_token_logprobs(hidden, weight, target.index_fill(0, torch.tensor([0]), -100))
    with pytest.raises(ValueError, match=r"weight must be \[V, H\]"):
        linear_token_logprobs(hidden, weight.T, target)
    with pytest.raises(ValueError, match="temperature"):
        linear_token_logprobs(hidden, weight, target, temperature=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCUDA:
    """The CPU comparisons at realistic shapes on a GPU (the interpreter tests are their CPU twin)."""

    @pytest.mark.parametrize("backend", ["hybrid", "triton", "torch"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_matches_reference(self, assert_close, backend, dtype):
        check_against_reference(assert_close, backend, dtype, temperature=0.7, n=4093, h=1024, v=32003, device="cuda")

    @pytest.mark.parametrize("backend", ["hybrid", "triton"])
    def test_logged_entropy_takes_the_fast_backward(self, monkeypatch, backend):
        seen = _spy_backward(monkeypatch)
        hidden, weight, target = make_inputs(n=1031, h=256, v=32003, dtype=torch.bfloat16, device="cuda")
        lp, ent = linear_token_logprobs(hidden, weight, target, return_entropy=True, backend=backend)
        torch.autograd.grad(lp.sum(), (hidden, weight))
        assert seen["delta"] == [False]
