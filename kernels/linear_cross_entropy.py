"""Fused linear + cross-entropy: loss(hidden @ weight.T + bias, target) without the [N, V] logits.

One op family, all behind `fused_linear_cross_entropy`: the readable reference, and three fused paths.
- backend="torch" (CPU default): chunks of rows, each a [rows, V] fp32 logits tile, all math in torch.
  (Every path keeps the logits in fp32, for bf16 inputs too; only the reference rounds them to bf16.)
- backend="hybrid" (CUDA default): the same chunks, fp32 tiles written by the matmul; the three matmuls
  are the library's (cuBLAS), the memory-bound softmax math two Triton row kernels.
- backend="triton": all-Triton tiles (logits only ever in registers; fp32 atomics for the grads), and
  the only path with Cut Cross-Entropy's gradient filter.
Triton kernels run on CUDA, or in the CPU interpreter in tests. The shared machinery (chunk loop,
kernels) also serves `linear_logprobs.py`, which only adds its own per-row math.

The math, per row i with scaled logits s = cap * tanh(z / cap) (or just z), z = h_i W^T + b:
    lse   = logsumexp_j s_j,   p_j = exp(s_j - lse)
    loss  = lse - (1 - eps) s_t - (eps / V) sum_j s_j + zl * lse^2      (label smoothing eps, z-loss zl)
    dloss/ds_j = (1 + 2 zl lse) p_j - (1 - eps) [j == t] - eps / V
Every op here writes its d/ds as   alpha_i p_j + beta_i [j == t_i] + gamma_i + delta_i p_j s_j
(`_Coefs`), so one chunk loop and one backward kernel serve cross-entropy, log-probs and entropy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from . import _utils
from ._utils import autocast_inputs, check_inputs, compute_dtype, interpreting, patch_interpreter, resolve_backend

_REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------------
# Reference: materializes the logits. Readable, and the baseline of tests and bench/kernels.py.
# ----------------------------------------------------------------------------------------------------


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Naive linear cross-entropy with the same semantics as `fused_linear_cross_entropy`."""
    # The lm_head matmul runs in the input dtype (as a model's lm_head does), then fp32.
    logits = F.linear(hidden, weight, bias).to(compute_dtype(hidden.dtype))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    valid = target != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(logits, dim=-1).square() * valid
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)  # all-ignored batch: 0, not NaN


# ----------------------------------------------------------------------------------------------------
# Shared per-row math
# ----------------------------------------------------------------------------------------------------


class _Xf(NamedTuple):
    """How the scaled logits s are formed from z = h @ W.T + b: s = cap * tanh(z * inv_temp / cap)."""

    inv_temp: float = 1.0
    softcap: float | None = None


class _Coefs(NamedTuple):
    """Per-row coefficients of d out / d s_ij = alpha_i p_ij + beta_i [j == t_i] + gamma_i + delta_i p_ij s_ij."""

    alpha: torch.Tensor
    beta: torch.Tensor
    gamma: torch.Tensor | None = None
    delta: torch.Tensor | None = None

    def take(self, rows: torch.Tensor) -> _Coefs:
        return _Coefs(*(None if c is None else c.index_select(0, rows) for c in self))


# Per-row statistics every pass returns, stacked as one [4, N] tensor (0 at inactive rows).
# ENTROPY = lse - sum_j p_j s_j, computed as log(sum_j e_j) - sum_j p_j (s_j - m) with m = max_j s_j and
# e_j = exp(s_j - m): both terms are small for a peaked row, where the plain form cancels two ~|s| numbers.
LSE, S_TARGET, SUM_S, ENTROPY = range(4)


# ----------------------------------------------------------------------------------------------------
# Chunked torch path
# ----------------------------------------------------------------------------------------------------


def _tile_logits(h, weight, bias, xf: _Xf, cd: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
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
    xf: _Xf,
    *,
    lse: torch.Tensor | None = None,
    sum_s: bool = False,
    entropy: bool = False,
    coef_fn: Callable[[torch.Tensor, torch.Tensor], _Coefs] | None = None,
    needs: tuple[bool, bool, bool] = (False, False, False),
    has_delta: bool = False,
    row_math: str = "torch",
):
    """One pass over the active rows (tgt >= 0), `chunk_rows` rows at a time.

    Forward (lse is None): returns per-row stats [4, N] (SUM_S and ENTROPY only if asked, else 0).
    Backward (lse given): the softmax is recomputed from the logits.
    With coef_fn(rows, lse_rows) -> _Coefs, each chunk's d_logits is folded right away into the grads
    of (hidden, weight, bias) selected by `needs`; has_delta says its coefficients carry a delta term.
    Peak extra memory is O(chunk x V) plus the grads. Returns (stats or None, (grad_h, grad_w, grad_b)).

    Two chunk bodies. The fast one (fp32/fp64 inputs, no softcap, entropy or delta: plain
    cross-entropy and log-probs) keeps ONE fp32 [rows, V] tile per chunk, reused across chunks, and
    transforms it in place: logits -> softmax (or log-softmax) with one row-wise kernel whose rows stay
    in cache, instead of several whole-tile passes through memory. The gradient is never formed as a
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
        _check_triton_dtype(hidden)
    fast = hidden.dtype == cd and xf.softcap is None and not entropy and not has_delta and not rowk
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
                stat_c, gh_c = _rows_chunk(s, dz, h, weight, bias, t, rows, xf, lse, coef_fn, gw, gb,
                                           gh is not None)
            elif fast:
                s = _tile_logits(h, weight, bias, xf, cd, out=buf[: rows.numel()])
                stat_c, gh_c = _fast_chunk(s, h, weight, t, rows, xf, lse, sum_s, coef_fn, gw, gb,
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


def _fast_chunk(s, h, weight, t, rows, xf: _Xf, lse, sum_s, coef_fn, gw, gb, need_gh, acc):
    """One chunk of the fast body: s is the [rows, V] logits tile, overwritten in place."""
    stat_c = gh_c = None
    if lse is None:
        s_t = s.gather(1, t).squeeze(1)
        ss = s.sum(1) if sum_s else torch.zeros_like(s_t)
        if coef_fn is None:  # stats only: log-softmax in place, lse = s_t - log p_t
            torch._log_softmax(s, 1, False, out=s)
            lse_c = s_t - s.gather(1, t).squeeze(1)
        else:  # p in place; lse = m - log p_m at the row max m (p_m >= 1 / V never underflows)
            m, arg = s.max(1, keepdim=True)
            torch._softmax(s, 1, False, out=s)
            lse_c = (m - s.gather(1, arg).log()).squeeze(1)
        stat_c = torch.stack([lse_c, s_t, ss, torch.zeros_like(s_t)])
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


def _general_chunk(s, h, weight, t, rows, xf: _Xf, cd, lse, sum_s, entropy, coef_fn, gw, gb, need_gh):
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


def _rows_chunk(s, dz, h, weight, bias, t, rows, xf: _Xf, lse, coef_fn, gw, gb, need_gh):
    """One chunk of the hybrid body: s is the fp32 [rows, V] tile of z = h @ W.T (no bias yet), dz the
    [rows, V] buffer for d_logits in the input dtype (s itself for fp32 inputs).

    The Triton row kernels compute the stats and then d_logits (bias, temperature and softcap applied
    on the fly, in fp32 registers); the three products with the tiles are library matmuls (cuBLAS on a
    GPU)."""
    stat_c = gh_c = None
    if lse is None:
        stat_c = triton_row_stats(s, bias, t.squeeze(1), xf)
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


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = a @ b in out's dtype (fp32, or fp64 for gradcheck) for a, b in it or in bf16/fp16. On CUDA
    cuBLAS writes its fp32 accumulator out directly (torch >= 2.8); on CPU the operands are upcast, which
    is the same math: products of bf16 values are exact in fp32, and the sums are fp32 in both."""
    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=out.dtype, out=out)
        except (TypeError, RuntimeError, NotImplementedError) as e:  # an older torch: bf16 logits, then fp32
            _warn_once(f"torch.mm(..., out_dtype={out.dtype}) failed ({type(e).__name__}: {e}); the logits of "
                       f"{a.dtype} inputs are rounded to {a.dtype} before the fp32 softmax math")
            return out.copy_(torch.mm(a, b))
    return torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)


@functools.cache
def _warn_once(message: str) -> None:
    import warnings

    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _addmm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32 and a, b possibly bf16: cuBLAS writes the fp32 sum directly (torch >= 2.8,
    CUDA), so no [V, H] low-precision product is materialized. Elsewhere, through a temporary."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):  # an older torch: no out_dtype overload
            pass
    acc += (a @ b).to(acc.dtype)


# ----------------------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------------------
# The kernels below are plain functions until `_triton()` runs: triton is imported and they are
# jitted on first use, not when optsys.kernels is imported, because TRITON_INTERPRET must be set
# before triton's import and a test conftest may set it after optsys was imported. Annotations are
# strings (`from __future__ import annotations`), which triton reads as "constexpr".

tl = None  # triton.language, bound by _triton()
_JIT = ("_logits_tile", "_stats_kernel", "_grad_kernel", "_row_logits", "_row_stats_kernel", "_row_grad_kernel")


@functools.cache
def _triton():
    global tl
    import triton
    import triton.language

    tl = triton.language
    if interpreting():
        patch_interpreter()
    g = globals()
    for name in _JIT:
        g[name] = triton.jit(g[name])
    return triton


def _logits_tile(H, W, B, rows, cols, row_mask, col_mask, D, inv_temp, softcap,
                 HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Scaled logits s for a [BLOCK_N, BLOCK_V] tile, fp32. H [N, D] and W [V, D] are row-major."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        h = tl.load(H + rows[:, None] * D + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(W + cols[:, None] * D + d[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter's tl.dot is wrong on bf16 tiles (triton 3.9); fp32 is exact
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:  # fp32 inputs: no silent tf32
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    s = acc * inv_temp
    if SOFTCAP:  # cap * tanh(s / cap), with tanh(x) = 2 sigmoid(2x) - 1
        s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
    return s


def _stats_kernel(H, W, B, T, M_out, L_out, SS_out, A_out, ST_out, N, V, D, cols_per_split,
                  inv_temp, softcap,
                  HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per token block and vocab split: online max m, l = sum exp(s - m), a = sum exp(s - m) (s - m),
    the sum of s, and the target's s. Partials go to [split, N] buffers; the host merges the splits (the split adds
    parallelism when N / BLOCK_N alone would leave SMs idle)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    tgt = tl.load(T + rows, mask=row_mask, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_N,), dtype=tl.float32)
    ss = tl.zeros((BLOCK_N,), dtype=tl.float32)
    a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    st = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if tl.max(tgt, axis=0) >= 0:  # skip token blocks with no active row
        v_lo = pid_s * cols_per_split
        v_hi = tl.minimum(v_lo + cols_per_split, V)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            col_mask = cols < v_hi
            s = _logits_tile(H, W, B, rows, cols, row_mask, col_mask, D, inv_temp, softcap,
                             HAS_BIAS, SOFTCAP, UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_D)
            s0 = tl.where(col_mask[None, :], s, 0.0)
            s = tl.where(col_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every split has >= 1 column
            rescale = tl.exp(m - m_new)
            e = tl.exp(s - m_new[:, None])
            # a is relative to the running max: moving it from m to m_new adds (m - m_new) l (guarded: the
            # first block has m = -inf, l = 0).
            a = rescale * (a + tl.where(l > 0, m - m_new, 0.0) * l)
            a += tl.sum(e * tl.where(col_mask[None, :], s - m_new[:, None], 0.0), axis=1)
            l = l * rescale + tl.sum(e, axis=1)
            ss += tl.sum(s0, axis=1)
            st += tl.sum(tl.where(cols[None, :] == tgt[:, None], s0, 0.0), axis=1)
            m = m_new
    out = pid_s * N + rows
    tl.store(M_out + out, m, mask=row_mask)
    tl.store(L_out + out, l, mask=row_mask)
    tl.store(SS_out + out, ss, mask=row_mask)
    tl.store(A_out + out, a, mask=row_mask)
    tl.store(ST_out + out, st, mask=row_mask)


def _grad_kernel(H, W, B, T, LSE, A, BETA, G, DELTA, GH, GW, GB, N, V, D, inv_temp, softcap, filter_eps,
                 HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_GAMMA: tl.constexpr,
                 HAS_DELTA: tl.constexpr, NEED_GH: tl.constexpr, NEED_GW: tl.constexpr,
                 NEED_GB: tl.constexpr, FILTER: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """One [BLOCK_N, BLOCK_V] tile: recompute s, form d_logits in registers, and atomically add
    d_logits @ W into GH [N, D] and d_logits^T @ H into GW [V, D] (fp32), BLOCK_D columns at a time.

    Why atomics: an owner-computes split (one kernel over token blocks for GH, one over vocab blocks
    for GW) must either hold a [BLOCK, D] accumulator (too big for registers at D = 4096) or recompute
    the logits once per kernel (8 N H V flops instead of 6). With atomics the logits are computed once;
    the price is N D V / BLOCK_V + V D N / BLOCK_N fp32 atomic adds, and run-to-run nondeterminism in
    the last bits of the grads. The grid puts vocab blocks on axis 0, so programs running together
    share a token block (its H tile and GH rows stay in L2)."""
    pid_v = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    row_mask = rows < N
    col_mask = cols < V
    tgt = tl.load(T + rows, mask=row_mask, other=-1)
    active = tgt >= 0
    if tl.max(tgt, axis=0) >= 0:
        s = _logits_tile(H, W, B, rows, cols, row_mask, col_mask, D, inv_temp, softcap,
                         HAS_BIAS, SOFTCAP, UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_D)
        lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
        # s - lse <= 0 for active rows; the clamp keeps inactive rows (lse = 0) from overflowing.
        p = tl.exp(tl.minimum(s - lse[:, None], 0.0))
        is_t = cols[None, :] == tgt[:, None]
        keep = True
        if FILTER:  # every p below filter_eps and no target in the tile: its d_logits is dropped
            keep = (tl.max(tl.max(tl.where(active[:, None] & col_mask[None, :], p, 0.0), axis=1), axis=0)
                    >= filter_eps) | (tl.max(tl.max((is_t & active[:, None]).to(tl.int32), axis=1), axis=0) > 0)
        if keep:
            alpha = tl.load(A + rows, mask=row_mask, other=0.0)
            beta = tl.load(BETA + rows, mask=row_mask, other=0.0)
            ds = alpha[:, None] * p + tl.where(is_t, beta[:, None], 0.0)
            if HAS_GAMMA:
                ds += tl.load(G + rows, mask=row_mask, other=0.0)[:, None]
            if HAS_DELTA:
                ds += tl.load(DELTA + rows, mask=row_mask, other=0.0)[:, None] * p * s
            if SOFTCAP:
                ds = ds * (1.0 - (s / softcap) * (s / softcap))
            # Inactive rows and padding columns carry exp(s - 0) garbage in p: zero them here.
            dz = tl.where(active[:, None] & col_mask[None, :], ds * inv_temp, 0.0)
            if NEED_GB:
                tl.atomic_add(GB + cols, tl.sum(dz, axis=0), mask=col_mask)
            if not UPCAST:
                dz = dz.to(H.dtype.element_ty)  # bf16 operands for the tensor cores, fp32 accumulate
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_mask = d < D
                if NEED_GH:
                    w = tl.load(W + cols[:, None] * D + d[None, :], mask=col_mask[:, None] & d_mask[None, :],
                                other=0.0)
                    if UPCAST:
                        w = w.to(tl.float32)
                    if IEEE:
                        gh = tl.dot(dz, w, input_precision="ieee")
                    else:
                        gh = tl.dot(dz, w)
                    tl.atomic_add(GH + rows[:, None] * D + d[None, :], gh,
                                  mask=row_mask[:, None] & d_mask[None, :])
                if NEED_GW:
                    h = tl.load(H + rows[:, None] * D + d[None, :], mask=row_mask[:, None] & d_mask[None, :],
                                other=0.0)
                    if UPCAST:
                        h = h.to(tl.float32)
                    if IEEE:
                        gw = tl.dot(tl.trans(dz), h, input_precision="ieee")
                    else:
                        gw = tl.dot(tl.trans(dz), h)
                    tl.atomic_add(GW + cols[:, None] * D + d[None, :], gw,
                                  mask=col_mask[:, None] & d_mask[None, :])


def _row_logits(S, B, cols, col_mask, inv_temp, softcap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """Scaled logits s (fp32) of one row at `cols`, from the row's tile entries z at S (any float dtype)."""
    z = tl.load(S + cols, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    s = z * inv_temp
    if SOFTCAP:
        s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
    return s


def _row_stats_kernel(S, B, T, OUT, R, V, stride, inv_temp, softcap,
                      HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per tile row: online max m, l = sum exp(s - m), a = sum exp(s - m) (s - m), sum s and
    the target's s over V in BLOCK_V steps; writes lse, s_t, sum s, entropy to OUT [4, R] (fp32)."""
    row = tl.program_id(0).to(tl.int64)
    S += row * stride
    tgt = tl.load(T + row)
    m = tl.full((), float("-inf"), tl.float32)
    l = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)
    ss = tl.zeros((), tl.float32)
    st = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        s = _row_logits(S, B, cols, col_mask, inv_temp, softcap, HAS_BIAS, SOFTCAP)
        ss += tl.sum(tl.where(col_mask, s, 0.0), axis=0)
        st += tl.sum(tl.where(cols == tgt, s, 0.0), axis=0)
        s = tl.where(col_mask, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))  # finite: every block has >= 1 column
        rescale = tl.exp(m - m_new)
        e = tl.exp(s - m_new)
        # a is relative to the running max: moving it from m to m_new adds (m - m_new) l (0 at the first
        # block, where m = -inf and l = 0).
        a = rescale * (a + tl.where(l > 0, m - m_new, 0.0) * l)
        a += tl.sum(e * tl.where(col_mask, s - m_new, 0.0), axis=0)  # e = 0 at padding columns
        l = l * rescale + tl.sum(e, axis=0)
        m = m_new
    tl.store(OUT + row, m + tl.log(l))
    tl.store(OUT + R + row, st)
    tl.store(OUT + 2 * R + row, ss)
    tl.store(OUT + 3 * R + row, tl.log(l) - a / l)


def _row_grad_kernel(S, DZ, B, T, LSE, A, BETA, G, DELTA, V, stride, dz_stride, inv_temp, softcap,
                     HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_GAMMA: tl.constexpr,
                     HAS_DELTA: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per tile row: d out / d z = inv_temp (alpha p + beta [j == t] + gamma + delta p s)
    (times the softcap's 1 - (s / cap)^2), written to the row of DZ in DZ's dtype. DZ may be S itself:
    each block is read before it is written, by the same program, so the in-place update is safe."""
    row = tl.program_id(0).to(tl.int64)
    S += row * stride
    DZ += row * dz_stride
    tgt = tl.load(T + row)
    lse = tl.load(LSE + row)
    alpha = tl.load(A + row)
    beta = tl.load(BETA + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        s = _row_logits(S, B, cols, col_mask, inv_temp, softcap, HAS_BIAS, SOFTCAP)
        p = tl.exp(tl.minimum(s - lse, 0.0))  # s <= lse up to rounding
        ds = alpha * p + tl.where(cols == tgt, beta, 0.0)
        if HAS_GAMMA:
            ds += tl.load(G + row)
        if HAS_DELTA:
            ds += tl.load(DELTA + row) * p * s
        if SOFTCAP:
            ds = ds * (1.0 - (s / softcap) * (s / softcap))
        tl.store(DZ + cols, (ds * inv_temp).to(DZ.dtype.element_ty), mask=col_mask)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# The Triton tiles on CUDA: untuned first guesses for H100-class GPUs (bench/README.md);
# profiling/compile_check.py compiles exactly these for sm_90 on any machine.
GPU_TILE_CFG = {"fwd": {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3},
                "bwd": {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3}}


def _kernel_cfg(hidden: torch.Tensor) -> dict:
    if hidden.is_cuda:
        return {**GPU_TILE_CFG, "programs": 4 * torch.cuda.get_device_properties(hidden.device).multi_processor_count}
    # Interpreter: small tiles so odd test shapes exercise partial blocks and several vocab splits.
    return {"fwd": {"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_D": 16}, "bwd": {"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_D": 16},
                "programs": 1}


def _check_triton_dtype(hidden: torch.Tensor) -> None:
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"backends 'triton' and 'hybrid' support fp32/bf16/fp16 hidden, got {hidden.dtype}")


def triton_stats(hidden, weight, bias, tgt, xf: _Xf) -> torch.Tensor:
    """Per-row stats [4, N] (lse, s_target, sum s, entropy), 0 at inactive rows, from the Triton kernel."""
    _triton()
    _check_triton_dtype(hidden)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    n, d = hidden.shape
    v = weight.shape[0]
    cfg = _kernel_cfg(hidden)
    bn, bv = cfg["fwd"]["BLOCK_N"], cfg["fwd"]["BLOCK_V"]
    v_blocks = _cdiv(v, bv)
    splits = min(v_blocks, max(2 if not hidden.is_cuda else 1, _cdiv(cfg["programs"], _cdiv(n, bn))))
    per_split = _cdiv(v_blocks, splits)
    splits = _cdiv(v_blocks, per_split)  # no empty split
    part = _utils.empty((5, splits, n), torch.float32, hidden.device)
    with record_function("optsys.triton_stats"):
        _stats_kernel[(_cdiv(n, bn), splits)](
            hidden, weight, hidden if bias is None else bias, tgt, part[0], part[1], part[2], part[3], part[4],
            n, v, d, per_split * bv, xf.inv_temp, xf.softcap or 1.0,
            HAS_BIAS=bias is not None, SOFTCAP=xf.softcap is not None, UPCAST=_utils.interpreting(),
            IEEE=hidden.dtype == torch.float32, **cfg["fwd"])
    m, l, ss, a, st = part
    # Merge the splits' online softmax states at the common max M: l_k, a_k are relative to m_k.
    m_max = m.amax(0)
    w = torch.exp(m - m_max)
    l_sum = (l * w).sum(0)
    ent = l_sum.log() - (w * (a + (m - m_max) * l)).sum(0) / l_sum
    stats = torch.stack([m_max + l_sum.log(), st.sum(0), ss.sum(0), ent])
    # Skipped token blocks left -inf / 0 partials (NaN here): masked, never multiplied.
    return stats.masked_fill_(tgt < 0, 0)


def triton_grads(hidden, weight, bias, tgt, lse, c: _Coefs, xf: _Xf, needs, filter_eps=None):
    """(grad_hidden, grad_weight, grad_bias) for d out / d s given by the per-row coefficients c."""
    _triton()
    _check_triton_dtype(hidden)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    cfg = _kernel_cfg(hidden)["bwd"]
    f32 = {"dtype": torch.float32, "device": dev}
    # Atomic accumulators: zero-initialized by necessity (not poisonable).
    gh = torch.zeros((n, d), **f32) if needs[0] else None
    gw = torch.zeros((v, d), **f32) if needs[1] else None
    gb = torch.zeros(v, **f32) if needs[2] else None
    coef = _coef_args(c)
    dummy = coef[0]
    grid = (_cdiv(v, cfg["BLOCK_V"]), _cdiv(n, cfg["BLOCK_N"]))
    with record_function("optsys.triton_grads"):
        _grad_kernel[grid](
            hidden, weight, hidden if bias is None else bias, tgt, lse.float().contiguous(), *coef,
            gh if gh is not None else dummy, gw if gw is not None else dummy, gb if gb is not None else dummy,
            n, v, d, xf.inv_temp, xf.softcap or 1.0, filter_eps or 0.0,
            HAS_BIAS=bias is not None, SOFTCAP=xf.softcap is not None, HAS_GAMMA=c.gamma is not None,
            HAS_DELTA=c.delta is not None, NEED_GH=needs[0], NEED_GW=needs[1], NEED_GB=needs[2],
            FILTER=filter_eps is not None, UPCAST=_utils.interpreting(), IEEE=hidden.dtype == torch.float32,
            **cfg)
    return gh, gw, gb


def _coef_args(c: _Coefs) -> list[torch.Tensor]:
    """The four per-row coefficient pointers a grad kernel takes: fp32, contiguous; an absent gamma or delta
    is alpha in its place (never read: HAS_GAMMA / HAS_DELTA are off)."""
    coef = [x.float().contiguous() if x is not None else None for x in c]
    return [coef[0] if x is None else x for x in coef]


def _row_block(v: int, on_gpu: bool) -> dict:
    # GPU: 4096 columns per step (a bf16 row is 256 KB at V = 128256: ~32 steps, each 8 KB per warp
    # group); the interpreter: small blocks, so test shapes cover several steps and a ragged last one.
    return {"BLOCK_V": 4096, "num_warps": 8} if on_gpu else {"BLOCK_V": 64}


def triton_row_stats(s: torch.Tensor, bias, tgt: torch.Tensor, xf: _Xf) -> torch.Tensor:
    """Per-row stats [4, R] (lse, s_target, sum s, entropy) of a materialized [R, V] logits tile."""
    _triton()
    r, v = s.shape
    out = _utils.empty((4, r), torch.float32, s.device)
    _row_stats_kernel[(r,)](s, s if bias is None else bias, tgt, out, r, v, s.stride(0), xf.inv_temp,
                            xf.softcap or 1.0, HAS_BIAS=bias is not None, SOFTCAP=xf.softcap is not None,
                            **_row_block(v, s.is_cuda))
    return out


def triton_row_grads(s: torch.Tensor, dz: torch.Tensor, bias, tgt: torch.Tensor, lse: torch.Tensor, c: _Coefs,
                     xf: _Xf) -> torch.Tensor:
    """Write d out / d z of the [R, V] logits tile s, for the per-row coefficients c, into dz (may be s)."""
    _triton()
    r, v = s.shape
    _row_grad_kernel[(r,)](s, dz, s if bias is None else bias, tgt, lse.float().contiguous(), *_coef_args(c),
                           v, s.stride(0), dz.stride(0), xf.inv_temp, xf.softcap or 1.0,
                           HAS_BIAS=bias is not None, SOFTCAP=xf.softcap is not None,
                           HAS_GAMMA=c.gamma is not None, HAS_DELTA=c.delta is not None, **_row_block(v, s.is_cuda))
    return dz


def compute_stats(backend: str, hidden, weight, bias, tgt, xf: _Xf, *, sum_s=False, entropy=False):
    """Per-row stats [4, N]; the torch path computes SUM_S and ENTROPY only when asked."""
    if backend == "triton":
        return triton_stats(hidden, weight, bias, tgt, xf)
    return torch_pass(hidden, weight, bias, tgt, xf, sum_s=sum_s, entropy=entropy, row_math=_row_math(backend))[0]


def compute_grads(backend: str, hidden, weight, bias, tgt, lse, c: _Coefs, xf: _Xf, needs, filter_eps=None):
    if backend == "triton":
        return triton_grads(hidden, weight, bias, tgt, lse, c, xf, needs, filter_eps)
    return torch_pass(hidden, weight, bias, tgt, xf, lse=lse, coef_fn=lambda rows, _: c.take(rows),
                      needs=needs, has_delta=c.delta is not None, row_math=_row_math(backend))[1]


def _row_math(backend: str) -> str:
    """The chunked backends: "torch" does its row math in torch, "hybrid" in the Triton row kernels."""
    return "triton" if backend == "hybrid" else "torch"


def cast_grads(grads, hidden, weight, bias):
    gh, gw, gb = grads
    return (None if gh is None else gh.to(hidden.dtype), None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(bias.dtype))


# ----------------------------------------------------------------------------------------------------
# Cross-entropy: options, autograd.Function, public function
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CEOptions:
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    grad_filter_eps: float | None = None
    backend: str = "torch"
    needs: tuple[bool, bool, bool] = (False, False, False)  # grads for hidden, weight, bias


def _ce_coefs(r: torch.Tensor, lse: torch.Tensor, o: CEOptions, v: int) -> _Coefs:
    """dloss/ds = r (1 + 2 zl lse) p - r (1 - eps) [j == t] - r eps / V, r the row's grad scale."""
    alpha = r * (1 + 2 * o.z_loss * lse) if o.z_loss else r
    gamma = -(o.label_smoothing / v) * r if o.label_smoothing else None
    return _Coefs(alpha, -(1 - o.label_smoothing) * r, gamma)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, o: CEOptions):
        v = weight.shape[0]
        tgt = target.masked_fill(target == o.ignore_index, -1)  # -1 marks an ignored row for the passes
        active = tgt >= 0
        n_valid = active.sum()
        xf = _Xf(softcap=o.softcap)
        # The chunked paths (torch, hybrid) fold each chunk's gradient in right away when the loss is a
        # scalar: backward then only scales by grad_output, so logits are computed once. reduction="none"
        # (per-row grad scales unknown until backward) and the Triton tiles recompute them in backward.
        ctx.eager = o.backend in ("torch", "hybrid") and o.reduction != "none" and any(o.needs)
        if ctx.eager:
            r = 1.0 / max(int(n_valid), 1) if o.reduction == "mean" else 1.0
            stats, grads = torch_pass(
                hidden, weight, bias, tgt, xf, sum_s=bool(o.label_smoothing), needs=o.needs,
                coef_fn=lambda rows, lse_c: _ce_coefs(torch.full_like(lse_c, r), lse_c, o, v),
                row_math=_row_math(o.backend))
            ctx.grads = cast_grads(grads, hidden, weight, bias)
        else:
            stats = compute_stats(o.backend, hidden, weight, bias, tgt, xf, sum_s=bool(o.label_smoothing))
        ctx.save_for_backward(hidden, weight, bias, tgt, stats[LSE])
        lse = stats[LSE]
        loss = lse - (1 - o.label_smoothing) * stats[S_TARGET]
        if o.label_smoothing:
            loss -= (o.label_smoothing / v) * stats[SUM_S]
        if o.z_loss:
            loss += o.z_loss * lse.square()
        loss = loss.masked_fill(~active, 0)
        ctx.o = o
        ctx.n_valid = n_valid
        if o.reduction == "none":
            return loss
        if o.reduction == "sum":
            return loss.sum()
        return loss.sum() / n_valid.clamp(min=1)

    @staticmethod
    def backward(ctx, grad_out):
        o = ctx.o
        if ctx.eager and ctx.grads is not None:
            # Hand the forward's grads over, scaled in place (no second [V, H] buffer). A later
            # backward through a retained graph finds them gone and recomputes below.
            grads, ctx.grads = ctx.grads, None
            gh, gw, gb = (None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads)
            return gh, gw, gb, None, None
        hidden, weight, bias, tgt, lse = ctx.saved_tensors
        active = tgt >= 0
        r = grad_out.to(lse.dtype)
        if o.reduction == "mean":
            r = r / ctx.n_valid.clamp(min=1)
        r = torch.where(active, r, 0.0)  # [N]: a scalar grad_out broadcasts
        c = _ce_coefs(r, lse, o, weight.shape[0])
        grads = compute_grads(o.backend, hidden, weight, bias, tgt, lse, c, _Xf(softcap=o.softcap),
                              o.needs, o.grad_filter_eps)
        gh, gw, gb = cast_grads(grads, hidden, weight, bias)
        return gh, gw, gb, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    backend: str = "auto",
    grad_filter_eps: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T + bias` against `target`, without materializing the logits.

    hidden [N, H], weight [V, H] (the lm_head), target [N] integer; bias [V] optional. Rows whose target
    is `ignore_index` contribute 0 and are skipped. reduction "mean" divides by the number of
    non-ignored rows (an all-ignored batch gives 0 and zero grads), "sum" adds, "none" returns [N].
    z_loss adds z_loss * logsumexp^2 per row (PaLM); softcap applies cap * tanh(logits / cap) first
    (Gemma 2); label_smoothing as in F.cross_entropy. Accumulates in fp32; the loss is fp32 (fp64 for
    fp64 inputs). Gradients flow to hidden, weight and bias.

    backend: "auto" (hybrid on CUDA, torch on CPU), "torch", "hybrid" or "triton" (module docstring).
    Every fused path keeps the logits in fp32 (the reference, like a bf16 lm_head, rounds them to bf16
    first) and hands the grad matmuls d_logits in the input dtype.

    grad_filter_eps (None = exact): Cut Cross-Entropy's trick, Triton backend only (the chunked paths
    ignore it and stay exact). The backward skips every [BLOCK_N, BLOCK_V] tile in which all softmax
    values are below eps and no row's target falls. A dropped entry has |dloss_i/dz_ij| <= eps * |a_i|,
    a_i the row's grad scale (grad_output / n_valid for "mean", times 1 + 2 z_loss lse), so the error is
    bounded by |d grad_hidden[i, :]| <= eps |a_i| sum_j |weight[j, :]| and
    |d grad_weight[j, :]| <= eps sum_i |a_i| |hidden[i, :]| (elementwise), and is 0 for the loss itself.
    In bf16 training, eps around 2**-12 drops only terms far below the grads' own rounding when the
    softmax is peaked. Refused with label_smoothing (its eps/V term makes every gradient entry dense).
    Under autocast, hidden / weight / bias are cast to the autocast dtype first (as F.linear is).
    """
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    check_inputs(hidden, weight, target, bias, ignore_index)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    backend = resolve_backend(backend, hidden)
    if grad_filter_eps is not None:
        if not 0 < grad_filter_eps < 1:
            raise ValueError(f"grad_filter_eps must be in (0, 1) or None, got {grad_filter_eps}")
        if label_smoothing:
            raise ValueError("grad_filter_eps cannot be combined with label_smoothing (dense gradient)")
    grad = torch.is_grad_enabled()
    needs = (grad and hidden.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad)
    o = CEOptions(ignore_index, reduction, float(label_smoothing), float(z_loss),
                  None if softcap is None else float(softcap), grad_filter_eps, backend, needs)
    return _LinearCrossEntropy.apply(hidden, weight, bias, target.long(), o)
