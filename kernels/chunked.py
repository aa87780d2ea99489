"""The chunked paths of the linear-softmax ops: backend="torch" (the CPU default) and "hybrid" (the CUDA one).

`torch_pass` walks the active rows `chunk_rows` at a time (`_utils.chunk_rows` sizes the chunks from a
memory budget); each chunk forms a [rows, V] fp32 logits tile with a library matmul, computes the per-row
statistics and, when asked, folds its d_logits into the grads of hidden, weight and bias at once, so the
[N, V] logits never exist. The per-row math runs in torch (two bodies, see `torch_pass`) or, for the
hybrid backend, in the Triton row kernels of triton_tiles.py beside cuBLAS matmuls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.profiler import record_function

from . import _utils
from ._utils import compute_dtype
from .row_math import LSE, GradCoefs, LogitTransform
from .triton_tiles import check_triton_dtype, triton_row_grads, triton_row_stats


def _tile_logits(h, weight, bias, xf: LogitTransform, cd: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    # fp32 logits whatever the input dtype (`_mm_into`: bf16 operands, fp32 sums and output). With `out`
    # it writes a reused buffer: no fresh [rows, V] allocation per chunk.
    if out is None:
        out = torch.empty((h.shape[0], weight.shape[0]), dtype=cd, device=h.device)
    s = _mm_into(h, weight.T, out)
    if bias is not None:
        s += bias.to(cd)
    if xf.inv_temp != 1.0:
        s *= xf.inv_temp
    if xf.softcap is not None:
        s.div_(xf.softcap).tanh_().mul_(xf.softcap)
    return s


def torch_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tgt: torch.Tensor,
    xf: LogitTransform,
    *,
    lse: torch.Tensor | None = None,
    sum_s: bool = False,
    entropy: bool = False,
    coef_fn: Callable[[torch.Tensor, torch.Tensor], GradCoefs] | None = None,
    needs: tuple[bool, bool, bool] = (False, False, False),
    has_delta: bool = False,
    row_math: str = "torch",
):
    """One pass over the active rows (tgt >= 0), `chunk_rows` rows at a time.

    Forward (lse is None): returns per-row stats [4, N] (SUM_S and ENTROPY only if asked, else 0).
    Backward (lse given): the softmax is recomputed from the logits.
    With coef_fn(rows, lse_rows) -> GradCoefs, each chunk's d_logits is folded right away into the grads
    of (hidden, weight, bias) selected by `needs`; has_delta says its coefficients carry a delta term.
    Peak extra memory is O(chunk x V) plus the grads. Returns (stats or None, (grad_h, grad_w, grad_b)).

    Two chunk bodies. The fast one (fp32/fp64 inputs, no softcap or delta, entropy only in a stats pass:
    plain cross-entropy, log-probs, and the entropy RL logs) keeps ONE fp32 [rows, V] tile per chunk, reused
    across chunks, and transforms it in place: logits -> softmax (or log-softmax) with one row-wise kernel
    whose rows stay in cache, instead of several whole-tile passes through memory. The gradient is never formed as a
    tile: d_logits = alpha p + beta [j == t] + gamma = alpha p' + gamma with p' = p + (beta / alpha)
    [j == t] (one element per row), so its products with W and h are alpha * (p' @ W) + gamma sum_j W_j
    and p'^T (alpha h) (+ a rank-1 gamma term added once at the end). One tile instead of two to three
    lets the chunk grow at the same peak (fewer, larger, faster matmuls; fewer passes over grad_weight).
    The general body keeps the logits beside the softmax, as the softcap, entropy and delta terms need
    both; bf16 inputs also take it, so the d_logits tile is rounded once, before its bf16 matmuls.

    row_math="triton" (the hybrid backend) is a third body for GPUs: one fp32 logits tile, written by the
    matmul itself (bf16 operands, fp32 accumulate and output: no bf16 rounding of the logits), and all its
    per-row math in two Triton kernels that stream each row through registers: one for the stats, one
    that writes d_logits (into a second, input-dtype tile for bf16 inputs, the grad matmuls' operand; in
    place for fp32). Only the matmuls touch the tiles besides them.
    """
    n, h_dim = hidden.shape
    v = weight.shape[0]
    cd = compute_dtype(hidden.dtype)
    dev = hidden.device
    active = tgt >= 0
    idx = active.nonzero().squeeze(1)  # ignored rows cost nothing (a host sync on CUDA)
    grads = coef_fn is not None
    stats = _utils.empty((4, n), cd, dev) if lse is None else None
    gh = _utils.empty((n, h_dim), hidden.dtype, dev) if grads and needs[0] else None
    gw = torch.zeros((v, h_dim), dtype=cd, device=dev) if grads and needs[1] else None
    gb = torch.zeros(v, dtype=cd, device=dev) if grads and needs[2] else None
    rowk = row_math == "triton"
    if rowk:
        check_triton_dtype(hidden)
    fast = hidden.dtype == cd and xf.softcap is None and not (entropy and grads) and not has_delta and not rowk
    fixed = sum(0 if g is None else g.numel() * g.element_size() for g in (gh, gw, gb))
    # The general body holds the logits, the softmax and a temporary (s - m, the softcap factor) at once.
    # The hybrid body's fp32 logits tile, plus its input-dtype d_logits tile when the grads need one.
    dz_bytes = hidden.element_size() if rowk and grads and hidden.dtype != cd else 0
    step = _utils.chunk_rows(idx.numel(), v, tiles=1 if fast or rowk else 3, grads=grads, fixed_bytes=fixed,
                             elem_bytes=4 + dz_bytes, cuda=hidden.is_cuda)
    rows_max = min(step, idx.numel())
    buf = torch.empty((rows_max, v), dtype=cd, device=dev) if fast or rowk else None
    dz_buf = torch.empty((rows_max, v), dtype=hidden.dtype, device=dev) if dz_bytes else None
    acc = {}  # fast body: the gamma terms' sums, applied once after the loop
    # Named ranges for torch.profiler traces (and Nsight, under torch.autograd.profiler.emit_nvtx).
    label = f"optsys.{'hybrid' if rowk else 'torch'}_{'grads' if lse is not None else 'stats'}"
    label += "+grads" if lse is None and grads else ""
    for i in range(0, idx.numel(), step):
        rows = idx[i : i + step]
        h = hidden.index_select(0, rows)
        t = tgt.index_select(0, rows)[:, None]
        with record_function(f"{label} chunk {i // step}"):
            if rowk:
                s = _mm_into(h, weight.T, buf[: rows.numel()])  # bias and transform: in the row kernels
                dz = s if dz_buf is None else dz_buf[: rows.numel()]
                stat_c, gh_c = _rows_chunk(s, dz, h, weight, bias, t, rows, xf, lse, sum_s, entropy, coef_fn,
                                           gw, gb, gh is not None)
            elif fast:
                s = _tile_logits(h, weight, bias, xf, cd, out=buf[: rows.numel()])
                stat_c, gh_c = _fast_chunk(s, h, weight, t, rows, xf, lse, sum_s, entropy, coef_fn, gw, gb,
                                           gh is not None, acc)
            else:
                s = _tile_logits(h, weight, bias, xf, cd)
                stat_c, gh_c = _general_chunk(s, h, weight, t, rows, xf, cd, lse, sum_s, entropy, coef_fn, gw,
                                              gb, gh is not None)
        del s
        if stat_c is not None:
            stats[:, rows] = stat_c
        if gh_c is not None:
            gh.index_copy_(0, rows, gh_c.to(gh.dtype))
    if "gamma_h" in acc:
        gw += acc["gamma_h"]
    if "gamma" in acc:
        gb += acc["gamma"]
    inactive = ~active
    if stats is not None:
        stats.masked_fill_(inactive, 0)
    if gh is not None:
        gh.masked_fill_(inactive[:, None], 0)
    return stats, (gh, gw, gb)


def _fast_chunk(s, h, weight, t, rows, xf: LogitTransform, lse, sum_s, entropy, coef_fn, gw, gb, need_gh, acc):
    """One chunk of the fast body: s is the [rows, V] logits tile, overwritten in place. entropy: only in a
    stats-only pass (coef_fn None)."""
    stat_c = gh_c = None
    if lse is None:
        s_t = s.gather(1, t).squeeze(1)
        ss = s.sum(1) if sum_s else torch.zeros_like(s_t)
        ent = torch.zeros_like(s_t)
        if coef_fn is None:  # stats only: log-softmax in place, lse = s_t - log p_t
            torch._log_softmax(s, 1, False, out=s)
            lse_c = s_t - s.gather(1, t).squeeze(1)
            if entropy:
                _entropy_into(ent, s)
        else:  # p in place; lse = m - log p_m at the row max m (p_m >= 1 / V never underflows)
            m, arg = s.max(1, keepdim=True)
            torch._softmax(s, 1, False, out=s)
            lse_c = (m - s.gather(1, arg).log()).squeeze(1)
        stat_c = torch.stack([lse_c, s_t, ss, ent])
    else:  # p = exp(s - lse), with the row's normalization recomputed in one cache-friendly kernel
        lse_c = lse.index_select(0, rows)
        torch._softmax(s, 1, False, out=s)
    if coef_fn is None:
        return stat_c, None
    c = coef_fn(rows, lse_c)
    k = xf.inv_temp  # d/dz = inv_temp d/ds: folded into the per-row coefficients
    alpha, beta = k * c.alpha[:, None].to(s.dtype), k * c.beta[:, None].to(s.dtype)
    # The target term goes into the tile as beta / alpha (one element per row; -1 for log-probs, about -1
    # for CE), so d_logits = alpha * p'. Rows with alpha = 0 (masked tokens) take 0; their beta, if any,
    # is added through index_put_ below (scattering [rows, H] into [V, H] costs far more than the tile's
    # one element per row, so it is only the fallback).
    nz = alpha != 0
    p = s.scatter_add_(1, t, torch.where(nz, beta / torch.where(nz, alpha, 1), 0))
    rest = torch.where(nz, 0, beta)
    rest = rest if bool(rest.any()) else None
    t = t.squeeze(1)
    if need_gh:  # (alpha p' + rest [j == t] + gamma) @ W
        gh_c = torch.mm(p, weight).mul_(alpha)
        if rest is not None:
            gh_c += weight.index_select(0, t) * rest
    if gw is not None:  # (alpha p' + rest [j == t] + gamma)^T @ h
        gw.addmm_(p.T, h * alpha)
        if rest is not None:
            gw.index_put_((t,), h * rest, accumulate=True)
    if gb is not None:
        gb.addmv_(p.T, alpha.squeeze(1))
        if rest is not None:
            gb.index_put_((t,), rest.squeeze(1), accumulate=True)
    if c.gamma is not None:  # label smoothing's uniform term, gamma_i at every j
        g = k * c.gamma[:, None].to(s.dtype)
        if gh_c is not None:
            if "w_sum" not in acc:
                acc["w_sum"] = weight.sum(0)
            gh_c.add_(g * acc["w_sum"])
        if gw is not None:  # every row of grad_weight gets sum_i gamma_i h_i: added once, after the loop
            acc["gamma_h"] = acc.get("gamma_h", 0) + (h * g).sum(0)
        if gb is not None:
            acc["gamma"] = acc.get("gamma", 0) + g.sum()
    return stat_c, gh_c


def _entropy_into(ent: torch.Tensor, logp: torch.Tensor) -> None:
    """ent[i] = -sum_j exp(logp_ij) logp_ij, a few rows at a time: a cache-sized temporary, not a second tile.
    Every term is >= 0, so a peaked row sums small numbers without the cancellation of lse - sum_j p_j s_j."""
    step = max(1, (1 << 20) // max(logp.shape[1], 1))
    for r in range(0, logp.shape[0], step):
        blk = logp[r : r + step]
        torch.linalg.vecdot(blk.exp(), blk, out=ent[r : r + step]).neg_()


def _general_chunk(s, h, weight, t, rows, xf: LogitTransform, cd, lse, sum_s, entropy, coef_fn, gw, gb, need_gh):
    """One chunk of the general body: any transform and coefficients, bf16 inputs; up to three tiles."""
    stat_c = gh_c = None
    if lse is None:
        m = s.amax(1, keepdim=True)
        p = (s - m).exp_()  # unnormalized until a gradient needs it
        norm = p.sum(1, keepdim=True)
        lse_c = (m + norm.log()).squeeze(1)
        zero = torch.zeros_like(lse_c)
        ent_c = (norm.log() - torch.linalg.vecdot(p, s - m)[:, None] / norm).squeeze(1) if entropy else zero
        stat_c = torch.stack([lse_c, s.gather(1, t).squeeze(1), s.sum(1) if sum_s else zero, ent_c])
        if coef_fn is not None:
            p.div_(norm)
    else:
        lse_c = lse.index_select(0, rows)
        p = (s - lse_c[:, None]).exp_()
    if coef_fn is None:
        return stat_c, None
    c = coef_fn(rows, lse_c)
    # d out / d s, built in place in the softmax buffer.
    ds = p.mul_(c.alpha[:, None] if c.delta is None else s * c.delta[:, None] + c.alpha[:, None])
    ds.scatter_add_(1, t, c.beta[:, None].to(cd))
    if c.gamma is not None:
        ds += c.gamma[:, None]
    if xf.softcap is not None:  # d(cap tanh(z/cap))/dz = 1 - (s/cap)^2
        ds.mul_(1 - (s / xf.softcap).square_())
    if xf.inv_temp != 1.0:
        ds *= xf.inv_temp
    del s
    dz = ds.to(weight.dtype)  # low precision: bf16 operands, fp32 accumulation across chunks
    if need_gh:
        gh_c = dz @ weight
    if gw is not None:
        if dz.dtype == cd:
            gw.addmm_(dz.T, h)
        else:
            gw += dz.T @ h
    if gb is not None:
        gb += ds.sum(0)
    return stat_c, gh_c


def _rows_chunk(s, dz, h, weight, bias, t, rows, xf: LogitTransform, lse, sum_s, entropy, coef_fn, gw, gb, need_gh):
    """One chunk of the hybrid body: s is the fp32 [rows, V] tile of z = h @ W.T (no bias yet), dz the
    [rows, V] buffer for d_logits in the input dtype (s itself for fp32 inputs).

    The Triton row kernels compute the stats and then d_logits (bias, temperature and softcap applied
    on the fly, in fp32 registers); the three products with the tiles are library matmuls (cuBLAS on a
    GPU)."""
    stat_c = gh_c = None
    if lse is None:
        stat_c = triton_row_stats(s, bias, t.squeeze(1), xf, sum_s=sum_s, entropy=entropy)
        lse_c = stat_c[LSE]
    else:
        lse_c = lse.index_select(0, rows)
    if coef_fn is None:
        return stat_c, None
    dz = triton_row_grads(s, dz, bias, t.squeeze(1), lse_c, coef_fn(rows, lse_c), xf)
    if need_gh:
        gh_c = torch.mm(dz, weight)
    if gw is not None:
        _addmm_into(gw, dz.T, h)
    if gb is not None:
        gb += dz.sum(0, dtype=gb.dtype)
    return stat_c, gh_c


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, out_dtype_overload: bool | None = None
             ) -> torch.Tensor:
    """out = a @ b in out's dtype (fp32, or fp64 for gradcheck) for a, b in it or in bf16/fp16. On CUDA
    cuBLAS writes its fp32 accumulator out directly (torch >= 2.8); on CPU the operands are upcast, which
    is the same math: products of bf16 values are exact in fp32, and the sums are fp32 in both.
    out_dtype_overload: try `torch.mm(..., out_dtype=)` (default: on CUDA; the tests force it on CPU, where
    torch lacks it, to check the fallback's warning)."""
    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    if a.is_cuda if out_dtype_overload is None else out_dtype_overload:
        try:
            return torch.mm(a, b, out_dtype=out.dtype, out=out)
        except (TypeError, RuntimeError, NotImplementedError) as e:  # an older torch: bf16 logits, then fp32
            _warn_once(f"torch.mm(..., out_dtype={out.dtype}) failed ({_first_line(e)}); the logits of "
                       f"{a.dtype} inputs are rounded to {a.dtype} before the fp32 softmax math")
            return out.copy_(torch.mm(a, b))
    return torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


@functools.cache
def _warn_once(message: str) -> None:
    import warnings

    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _addmm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out_dtype_overload: bool | None = None) -> None:
    """acc += a @ b with acc fp32 and a, b possibly bf16: cuBLAS writes the fp32 sum directly (torch >= 2.8,
    CUDA), so no [V, H] low-precision product is materialized. On CPU (the interpreter tests) through a
    temporary in a's dtype. On a CUDA torch without the out_dtype overload the same, with a warning (once):
    each chunk's product is then rounded to bf16 before it reaches the fp32 sum. out_dtype_overload as in
    `_mm_into`."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda if out_dtype_overload is None else out_dtype_overload:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError) as e:  # an older torch: no out_dtype overload
            _warn_once(f"torch.addmm(..., out_dtype={acc.dtype}) failed ({_first_line(e)}); each chunk's "
                       f"{a.dtype} grad_weight product goes through a {a.dtype} temporary, rounded to "
                       f"{a.dtype} before it is added to the {acc.dtype} sum")
    acc += (a @ b).to(acc.dtype)


def row_math_for(backend: str) -> str:
    """The chunked backends: "torch" does its row math in torch, "hybrid" in the Triton row kernels."""
    return "triton" if backend == "hybrid" else "torch"
