"""fused_linear_cross_entropy vs its reference: every CPU path (chunked torch, Triton interpreter)."""

import pytest
import torch
from optsys.kernels import (
    _utils,
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
    set_debug_checks,
)

# Odd sizes: not multiples of the chunk (8 rows under `small_chunks`) or of any Triton block.
N, H, V = 37, 29, 1001


def make_inputs(n=N, h=H, v=V, dtype=torch.float32, *, bias=True, ignore_frac=0.3, scale=1.0, seed=0,
                device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g) * scale
    weight = torch.randn(v, h, generator=g) / h**0.5
    b = torch.randn(v, generator=g) if bias else None
    target = torch.randint(0, v, (n,), generator=g)
    target[torch.rand(n, generator=g) < ignore_frac] = -100
    params = [t.to(device=device, dtype=dtype).requires_grad_() for t in (hidden, weight, b) if t is not None]
    return params, target.to(device)


def check_against_reference(assert_close, backend, dtype=torch.float32, *, bias=True, ignore_frac=0.3,
                            scale=1.0, n=N, h=H, v=V, device="cpu", **kw):
    """Loss and every gradient of the fused op vs the reference, with a non-unit grad_output."""
    params, target = make_inputs(n, h, v, dtype, bias=bias, ignore_frac=ignore_frac, scale=scale, device=device)
    ref_params = [p.detach().clone().requires_grad_() for p in params]

    def run(fn, ps, **extra):
        return fn(ps[0], ps[1], target, bias=ps[2] if bias else None, **kw, **extra)

    loss = run(fused_linear_cross_entropy, params, backend=backend)
    ref = run(linear_cross_entropy_reference, ref_params)
    assert loss.dtype == torch.float32
    assert_close(loss, ref, dtype, "loss")
    g = torch.rand(loss.shape, device=device) + 0.5 if loss.dim() else torch.tensor(1.7, device=device)
    grads = torch.autograd.grad(loss, params, g)
    ref_grads = torch.autograd.grad(ref, ref_params, g)
    for name, a, e in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert a.dtype == dtype, name
        assert_close(a, e, dtype, f"grad {name}")
    return loss, grads


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_matches_reference(assert_close, small_chunks, dtype, reduction):
    check_against_reference(assert_close, "torch", dtype, reduction=reduction)


@pytest.mark.parametrize("opts", [{"label_smoothing": 0.1}, {"z_loss": 1e-2}, {"softcap": 3.0},
                                  {"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 5.0, "reduction": "none"}])
def test_torch_options(assert_close, small_chunks, opts):
    check_against_reference(assert_close, "torch", **opts)


# The interpreter runs each program instance in Python (~1 s per case here): a few cases, chosen to
# cover both dtypes, all reductions and every option between them.
@pytest.mark.parametrize("dtype, opts", [
    (torch.float32, {"reduction": "mean"}),
    (torch.float32, {"reduction": "none", "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0}),
    (torch.bfloat16, {"reduction": "sum", "z_loss": 1e-3}),
])
def test_triton_matches_reference(assert_close, triton_cpu, dtype, opts):
    check_against_reference(assert_close, triton_cpu, dtype, v=301, **opts)


@pytest.mark.parametrize("dtype, opts", [
    (torch.float32, {"reduction": "mean"}),
    (torch.float32, {"reduction": "none", "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0}),
    (torch.bfloat16, {"reduction": "sum", "z_loss": 1e-3, "label_smoothing": 0.05}),
    (torch.bfloat16, {"reduction": "none", "softcap": 5.0}),
])
def test_hybrid_matches_reference(assert_close, hybrid_cpu, dtype, opts):
    check_against_reference(assert_close, hybrid_cpu, dtype, v=301, **opts)


def pass_inputs(v, with_delta):
    """Inputs of one torch_pass with arbitrary per-row coefficients: some alpha = 0, gamma (and delta);
    ignored rows 3 and 20."""
    from optsys.kernels.row_math import GradCoefs

    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(N, 16), torch.randn(v, 16) / 4, torch.randn(v)
    tgt = torch.randint(0, v, (N,))
    tgt[[3, 20]] = -1
    c = GradCoefs(*torch.randn(4 if with_delta else 3, N))
    c.alpha[[0, 9, 10]] = 0
    return hidden, weight, bias, tgt, c


def test_hybrid_row_kernels_match_torch_body(hybrid_cpu):
    # Bias, temperature, softcap and every coefficient: the hybrid body's stats and grads against the torch
    # path's general body, which forms the same math.
    from optsys.kernels.chunked import torch_pass
    from optsys.kernels.row_math import LogitTransform

    hidden, weight, bias, tgt, c = pass_inputs(301, with_delta=True)
    xf = LogitTransform(inv_temp=1 / 0.7, softcap=4.0)
    stats = [torch_pass(hidden, weight, bias, tgt, xf, sum_s=True, entropy=True, row_math=m)[0]
             for m in ("triton", "torch")]
    torch.testing.assert_close(*stats, rtol=1e-5, atol=1e-5)
    grads = [torch_pass(hidden, weight, bias, tgt, xf, lse=stats[1][0], coef_fn=lambda rows, _: c.take(rows),
                        needs=(True, True, True), has_delta=True, row_math=m)[1] for m in ("triton", "torch")]
    for hyb, ref in zip(*grads, strict=True):
        torch.testing.assert_close(hyb, ref, rtol=1e-4, atol=1e-5)


def test_chunk_rows_gpu_rule():
    # The GPU rule: CUDA_TILE_BYTES (768 MiB) over all tiles, rows a multiple of 128. The hybrid body's
    # fp32 logits + bf16 d_logits tiles are 6 bytes an element.
    assert _utils.chunk_rows(8192, 128256, elem_bytes=6, cuda=True) == 1024
    assert _utils.chunk_rows(8192, 152064, elem_bytes=6, cuda=True) == 768
    assert _utils.chunk_rows(300, 32000, elem_bytes=6, cuda=True) == 300  # never more than N
    assert _utils.chunk_rows(8192, 128256, tiles=3, cuda=True) == 512  # the torch body's three fp32 tiles


def test_bf16_inputs_keep_fp32_logits(backend):
    # Every fused path forms the logits of bf16 inputs in fp32 (exact products, fp32 sums): per-token
    # losses match the fp32 computation on the upcast inputs, where the bf16-rounded logits of a bf16
    # lm_head (the reference) are off by ~1e-2 at logits of this size.
    (hidden, weight, _), target = make_inputs(v=301, dtype=torch.bfloat16, scale=3.0, ignore_frac=0.0)
    exact = linear_cross_entropy_reference(hidden.float(), weight.float(), target, reduction="none")
    rounded = linear_cross_entropy_reference(hidden, weight, target, reduction="none")
    assert (rounded - exact).abs().max() > 1e-3  # the test can tell the two apart
    out = fused_linear_cross_entropy(hidden, weight, target, reduction="none", backend=backend)
    torch.testing.assert_close(out, exact.detach(), rtol=1e-5, atol=1e-5)


def test_all_ignored(backend):
    params, target = make_inputs(ignore_frac=1.0)
    loss = fused_linear_cross_entropy(params[0], params[1], target, bias=params[2], backend=backend)
    assert loss.item() == 0.0
    for p, g in zip(params, torch.autograd.grad(loss, params)):
        assert torch.equal(g, torch.zeros_like(p))


def test_large_logits_no_overflow(assert_close, backend):
    # hidden x100: logits in the hundreds; a naive exp overflows fp32.
    loss, grads = check_against_reference(assert_close, backend, scale=100.0, v=301, reduction="none", z_loss=1e-4)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)


def test_noncontiguous_inputs(assert_close, backend):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(H, N, generator=g).T.requires_grad_()  # column-major view
    weight_full = torch.randn(301, 2 * H, generator=g) / H**0.5
    weight = weight_full[:, ::2].detach().requires_grad_()  # strided columns
    target = torch.randint(0, 301, (2 * N,), generator=g)[::2]
    loss = fused_linear_cross_entropy(hidden, weight, target, backend=backend)
    ref = linear_cross_entropy_reference(hidden, weight, target)
    assert_close(loss, ref, torch.float32, "loss")
    for a, e in zip(torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(ref, (hidden, weight))):
        assert_close(a, e, torch.float32, "grad")


def test_frozen_weight_and_no_grad(assert_close, small_chunks):
    (hidden, weight, bias), target = make_inputs()
    weight.requires_grad_(False)
    loss = fused_linear_cross_entropy(hidden, weight, target, bias=bias)
    (gh,) = torch.autograd.grad(loss, hidden)
    ref = linear_cross_entropy_reference(hidden, weight, target, bias=bias)
    assert_close(gh, torch.autograd.grad(ref, hidden)[0], torch.float32, "grad hidden")
    with torch.no_grad():
        assert_close(fused_linear_cross_entropy(hidden, weight, target, bias=bias), ref, torch.float32, "loss")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("softcap", [2.0, None])  # None: the torch path's one-tile fast body
def test_gradcheck_fp64(monkeypatch, reduction, softcap):
    torch.manual_seed(0)
    n, h, v = 11, 5, 13
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, v, (n,))
    target[[2, 7]] = -100
    monkeypatch.setattr(_utils, "CHUNK_BYTES", 4 * 4 * v)  # 4-row chunks

    def fn(hd, w, b):
        return fused_linear_cross_entropy(hd, w, target, bias=b, reduction=reduction, label_smoothing=0.1,
                                          z_loss=0.01, softcap=softcap, backend="torch")

    # nondet_tol: a second backward through the retained graph recomputes (the first hands over the
    # grads folded in during forward), so the two agree to rounding, not bit for bit.
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), nondet_tol=1e-12)


def test_bad_inputs():
    (hidden, weight, bias), target = make_inputs(v=50)
    with pytest.raises(ValueError, match=r"weight must be \[V, H\].*\(50, 28\)"):
        fused_linear_cross_entropy(hidden, weight[:, :-1], target)
    with pytest.raises(ValueError, match=r"target must be \[N\].*\(36,\)"):
        fused_linear_cross_entropy(hidden, weight, target[:-1])
    with pytest.raises(ValueError, match=r"bias must be \[V\]"):
        fused_linear_cross_entropy(hidden, weight, target, bias=bias[:-1])
    with pytest.raises(ValueError, match="weight dtype"):
        fused_linear_cross_entropy(hidden, weight.double(), target)
    with pytest.raises(ValueError, match="integer"):
        fused_linear_cross_entropy(hidden, weight, target.float())
    with pytest.raises(ValueError, match=r"target\[3\] = 50 is outside \[0, 50\)"):
        fused_linear_cross_entropy(hidden, weight, target.clamp(min=0).index_fill(0, torch.tensor([3]), 50))
    with pytest.raises(ValueError, match="non-finite"):
        fused_linear_cross_entropy(hidden.detach().index_fill(0, torch.tensor([5]), float("nan")), weight,
                                   target)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, target, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        fused_linear_cross_entropy(hidden, weight, target, backend="cuda")
    set_debug_checks(True)  # a no-op on CPU, where values are always checked
    set_debug_checks(False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCUDA:
    """The CPU comparisons at realistic shapes on a GPU (the interpreter tests are their CPU twin)."""

    @pytest.mark.parametrize("backend", ["hybrid", "triton", "torch"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_matches_reference(self, assert_close, backend, dtype):
        check_against_reference(assert_close, backend, dtype, n=4093, h=1024, v=32003, device="cuda", reduction="mean")

    @pytest.mark.parametrize("backend", ["hybrid", "triton"])
    def test_options(self, assert_close, backend):
        check_against_reference(assert_close, backend, torch.bfloat16, n=2047, h=1024, v=32003, device="cuda",
                                reduction="none", label_smoothing=0.1, z_loss=1e-4, softcap=30.0)

    @pytest.mark.parametrize("backend", ["hybrid", "triton", "torch"])
    def test_bf16_inputs_keep_fp32_logits(self, backend):
        # On CUDA the chunked paths rely on cuBLAS writing fp32 logits from bf16 operands (out_dtype).
        (hidden, weight, _), target = make_inputs(n=2047, h=1024, v=32003, dtype=torch.bfloat16, scale=3.0,
                                                  ignore_frac=0.0, device="cuda")
        exact = linear_cross_entropy_reference(hidden.float(), weight.float(), target, reduction="none")
        out = fused_linear_cross_entropy(hidden, weight, target, reduction="none", backend=backend)
        torch.testing.assert_close(out, exact.detach(), rtol=1e-4, atol=1e-4)

    def test_hybrid_several_chunks(self, assert_close, monkeypatch):
        monkeypatch.setattr(_utils, "CUDA_TILE_BYTES", 300 * 6 * 32003)  # 300-row chunks, a ragged last one
        check_against_reference(assert_close, "hybrid", torch.bfloat16, n=1000, h=512, v=32003, device="cuda")

    def test_all_ignored(self):
        params, target = make_inputs(n=1024, h=512, v=32000, ignore_frac=1.0, device="cuda")
        loss = fused_linear_cross_entropy(params[0], params[1], target, bias=params[2])
        assert loss.item() == 0.0
        assert all(torch.count_nonzero(g) == 0 for g in torch.autograd.grad(loss, params))


def test_grad_filter_within_stated_bound(triton_cpu):
    """grad_filter_eps skips tiles (grads change) but stays within the docstring's bound."""
    (_, weight), target = make_inputs(v=301, bias=False)
    # Targets only in the first vocab tile, and each hidden row points at its target's weight row: the
    # softmax is peaked there, and the other tiles hold only p < eps.
    target = torch.where(target == -100, target, target % 32)
    hidden = (30.0 * weight.detach()[target.clamp(min=0)]).requires_grad_()
    eps = 2.0**-12
    exact = torch.autograd.grad(fused_linear_cross_entropy(hidden, weight, target, backend=triton_cpu),
                                (hidden, weight))
    loss = fused_linear_cross_entropy(hidden, weight, target, backend=triton_cpu, grad_filter_eps=eps)
    filtered = torch.autograd.grad(loss, (hidden, weight))
    a = 1.0 / (target != -100).sum()  # the row grad scale for reduction="mean", grad_output = 1
    bound_h = eps * a * weight.detach().abs().sum(0)[None, :]
    bound_w = eps * a * hidden.detach()[target != -100].abs().sum(0)[None, :]
    for got, want, bound in zip(filtered, exact, (bound_h, bound_w)):
        assert not torch.equal(got, want), "no tile was filtered: the test does not exercise the option"
        assert ((got - want).abs() <= bound + 1e-7).all()
    with pytest.raises(ValueError, match="label_smoothing"):
        fused_linear_cross_entropy(hidden, weight, target, grad_filter_eps=eps, label_smoothing=0.1)


def test_torch_fast_body_matches_general(small_chunks):
    # The one-tile body folds beta into the tile as beta / alpha; rows with alpha = 0 take the index_put_
    # fallback. Arbitrary coefficients (some alpha = 0, gamma, bias, temperature) against the general body.
    from optsys.kernels.chunked import torch_pass
    from optsys.kernels.row_math import LogitTransform

    hidden, weight, bias, tgt, c = pass_inputs(1001, with_delta=False)
    xf = LogitTransform(inv_temp=1 / 0.7)
    lse = torch.logsumexp((hidden @ weight.T + bias) / 0.7, 1)
    out = [torch_pass(hidden, weight, bias, tgt, xf, lse=lse, coef_fn=lambda rows, _: c.take(rows),
                      needs=(True, True, True), has_delta=general)[1] for general in (False, True)]
    for fast, ref in zip(*out, strict=True):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("which", ["mm", "addmm"])
def test_out_dtype_fallback_warns_once(which):
    """Without torch's out_dtype matmul overload (CPU torch lacks it; an old CUDA torch too) the bf16 products
    are rounded to bf16 before the fp32 math: that must be said, once, not done silently."""
    from optsys.kernels import chunked

    chunked._warn_once.cache_clear()
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(*s, generator=g).bfloat16() for s in ((5, 7), (7, 3)))
    expected = (a @ b).float()  # the fallback's math: a bf16 product, then fp32
    with pytest.warns(RuntimeWarning, match=rf"torch\.{which}\(\.\.\., out_dtype=torch\.float32\) failed") as rec:
        for _ in range(3):
            acc = torch.zeros(5, 3)
            if which == "mm":
                chunked._mm_into(a, b, acc, out_dtype_overload=True)
            else:
                chunked._addmm_into(acc, a, b, out_dtype_overload=True)
            assert torch.equal(acc, expected)
    assert len([w for w in rec if "out_dtype" in str(w.message)]) == 1
