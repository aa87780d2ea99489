"""The Triton kernels of the linear-softmax ops, and their launchers.

- The all-Triton tiles (backend="triton"): `_stats_kernel` and `_grad_kernel` recompute the logits in
  [BLOCK_N, BLOCK_V] tiles from hidden and weight, so they only ever live in registers; the grads are
  added with fp32 atomics, and the backward can skip tiles below Cut Cross-Entropy's gradient filter.
  Launchers: `triton_stats`, `triton_grads`.
- The row kernels (backend="hybrid", driven by chunked.py): `_row_stats_kernel` and `_row_grad_kernel`
  stream each row of a materialized fp32 logits tile through registers, for the stats and for d_logits.
  Launchers: `triton_row_stats`, `triton_row_grads`.
Both sets implement the per-row math of row_math.py. They run on CUDA, or in the CPU interpreter in tests.
"""

from __future__ import annotations

import functools

import torch
from torch.profiler import record_function

from . import _utils
from ._utils import interpreting, patch_interpreter
from .row_math import GradCoefs, LogitTransform

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


def _stats_kernel(H, W, B, T, M_out, L_out, SS_out, A_out, ST_out, N, V, D, cols_per_split, n_splits,
                  inv_temp, softcap,
                  HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, SUM_S: tl.constexpr, ENTROPY: tl.constexpr,
                  UPCAST: tl.constexpr, IEEE: tl.constexpr, GROUP_N: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per token block and vocab split: online max m, l = sum exp(s - m), the target's s and, when asked,
    a = sum exp(s - m) (s - m) (ENTROPY) and the sum of s (SUM_S). Partials go to [split, N] buffers; the host
    merges the splits (the split adds parallelism when N / BLOCK_N alone would leave SMs idle).

    Grouped order (a 1-D grid): consecutive programs cover GROUP_N token blocks x every split, so the programs
    resident together share each token block's hidden tile n_splits ways and each weight tile GROUP_N ways in
    L2. In plain token-block-major order all resident programs share the weight tiles but each reloads its
    own [BLOCK_N, D] hidden tile for every vocab block: 132 SMs x 512 KB (BLOCK_N = 64, D = 4096, bf16) does not
    stay in a 50 MB L2, so hidden came from HBM V / BLOCK_V times over (~67 GB at the Llama-3-8B shape)."""
    pid = tl.program_id(0)
    per_group = GROUP_N * n_splits
    first = (pid // per_group) * GROUP_N
    size = tl.minimum(tl.cdiv(N, BLOCK_N) - first, GROUP_N)  # the last group may be ragged
    pid_n = first + (pid % per_group) % size
    pid_s = (pid % per_group) // size
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
            if ENTROPY:
                # a is relative to the running max: moving it from m to m_new adds (m - m_new) l (guarded:
                # the first block has m = -inf, l = 0).
                a = rescale * (a + tl.where(l > 0, m - m_new, 0.0) * l)
                a += tl.sum(e * tl.where(col_mask[None, :], s - m_new[:, None], 0.0), axis=1)
            l = l * rescale + tl.sum(e, axis=1)
            if SUM_S:
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
    the last bits of the grads. The adds are relaxed atomics: each is a plain sum into memory no other
    program reads before the kernel ends, so the default acq_rel ordering (a fence per add) buys nothing.
    The grid puts vocab blocks on axis 0, so programs running together
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
                tl.atomic_add(GB + cols, tl.sum(dz, axis=0), mask=col_mask, sem="relaxed")
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
                                  mask=row_mask[:, None] & d_mask[None, :], sem="relaxed")
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
                                  mask=col_mask[:, None] & d_mask[None, :], sem="relaxed")


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
                      HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, SUM_S: tl.constexpr, ENTROPY: tl.constexpr,
                      BLOCK_V: tl.constexpr):
    """One program per tile row: online max m and l = sum exp(s - m) over V in BLOCK_V steps (and, when
    asked, a = sum exp(s - m) (s - m) for the entropy and the sum of s for label smoothing); the target's s
    is loaded on its own. Writes lse, s_t, sum s, entropy to OUT [4, R] (fp32; 0 for a stat not asked)."""
    row = tl.program_id(0).to(tl.int64)
    S += row * stride
    tgt = tl.load(T + row)
    m = tl.full((), float("-inf"), tl.float32)
    l = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)
    ss = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        s = _row_logits(S, B, cols, col_mask, inv_temp, softcap, HAS_BIAS, SOFTCAP)
        if SUM_S:
            ss += tl.sum(tl.where(col_mask, s, 0.0), axis=0)
        s = tl.where(col_mask, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))  # finite: every block has >= 1 column
        rescale = tl.exp(m - m_new)
        e = tl.exp(s - m_new)
        if ENTROPY:
            # a is relative to the running max: moving it from m to m_new adds (m - m_new) l (0 at the first
            # block, where m = -inf and l = 0).
            a = rescale * (a + tl.where(l > 0, m - m_new, 0.0) * l)
            a += tl.sum(e * tl.where(col_mask, s - m_new, 0.0), axis=0)  # e = 0 at padding columns
        l = l * rescale + tl.sum(e, axis=0)
        m = m_new
    # The target's logit, read once (the chunk loop passes active rows only: 0 <= tgt < V).
    st = _row_logits(S, B, tgt, tgt >= 0, inv_temp, softcap, HAS_BIAS, SOFTCAP)
    tl.store(OUT + row, m + tl.log(l))
    tl.store(OUT + R + row, st)
    tl.store(OUT + 2 * R + row, ss)
    tl.store(OUT + 3 * R + row, tl.log(l) - a / l if ENTROPY else 0.0)


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


# The short list the first GPU session sweeps (profiling/first_call.py tiles) and compile_check.py --all-configs
# compiles for sm_90; GPU_TILE_CFG should become the sweep's fastest. Larger BLOCK_V means fewer re-reads of a
# token block's hidden tile in the forward (it is reloaded for every vocab block of its split: D / BLOCK_V reads
# of H per logit), larger BLOCK_N fewer re-reads of W and fewer grad_weight atomics (V D N / BLOCK_N).
# (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages). Not triton.autotune: its timing runs would add into the
# grad kernel's atomic accumulators (they need reset_to_zero) and its search would land in a training step.
# compile_check.py --all-configs (sm_90, triton 3.9): every entry compiles within shared memory, uses wgmma and
# pipelines its loads, without spills in the plain CE specialization; with every option on (bias, softcap,
# filter, delta) all but the first spill 12-408 bytes (the sweep times plain CE). Dropped for shared memory
# over the 227 KiB limit: (64, 256, 64, 8, 3) and (64, 128, 128, 8, 3); for spills even when plain:
# (128, 256, 32, 8, 3).
TILE_CANDIDATES = [(64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 3),
                   (64, 256, 32, 8, 4), (64, 256, 64, 8, 2), (64, 128, 64, 4, 4), (128, 128, 64, 8, 2)]


def tile_cfg(candidate: tuple[int, int, int, int, int]) -> dict:
    """A TILE_CANDIDATES entry as the launchers' block / warp settings."""
    bn, bv, bd, warps, stages = candidate
    return {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd, "num_warps": warps, "num_stages": stages}


# The forward's grouped order (`_stats_kernel`): GROUP_N token blocks x at least min_splits vocab splits run
# together. On a GPU 16 x 8 (~132 SMs): each hidden tile is read from HBM about V / (BLOCK_V x 8) times and each
# weight tile N / (BLOCK_N x 16) times, ~17 GB instead of ~68 GB at the Llama-3-8B shape (by that count; to be
# measured). The interpreter: small groups and 2 splits, so test shapes cover a ragged last group.
STATS_GROUP = {"gpu": {"GROUP_N": 16, "min_splits": 8}, "cpu": {"GROUP_N": 2, "min_splits": 2}}


def _kernel_cfg(hidden: torch.Tensor) -> dict:
    if hidden.is_cuda:
        return {**GPU_TILE_CFG, "programs": 4 * torch.cuda.get_device_properties(hidden.device).multi_processor_count}
    # Interpreter: small tiles so odd test shapes exercise partial blocks and several vocab splits.
    return {"fwd": {"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_D": 16}, "bwd": {"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_D": 16},
                "programs": 1}


def check_triton_dtype(hidden: torch.Tensor) -> None:
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"backends 'triton' and 'hybrid' support fp32/bf16/fp16 hidden, got {hidden.dtype}")


def triton_stats(hidden, weight, bias, tgt, xf: LogitTransform, *, sum_s: bool = False,
                 entropy: bool = False) -> torch.Tensor:
    """Per-row stats [4, N] (lse, s_target, sum s, entropy), 0 at inactive rows (and for a stat not asked),
    from the Triton kernel."""
    _triton()
    check_triton_dtype(hidden)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    n, d = hidden.shape
    v = weight.shape[0]
    cfg = _kernel_cfg(hidden)
    bn, bv = cfg["fwd"]["BLOCK_N"], cfg["fwd"]["BLOCK_V"]
    v_blocks = _cdiv(v, bv)
    group = STATS_GROUP["gpu" if hidden.is_cuda else "cpu"]
    n_blocks = _cdiv(n, bn)
    splits = min(v_blocks, max(group["min_splits"], _cdiv(cfg["programs"], n_blocks)))
    per_split = _cdiv(v_blocks, splits)
    splits = _cdiv(v_blocks, per_split)  # no empty split
    part = _utils.empty((5, splits, n), torch.float32, hidden.device)
    with record_function("optsys.triton_stats"):
        _stats_kernel[(n_blocks * splits,)](
            hidden, weight, hidden if bias is None else bias, tgt, part[0], part[1], part[2], part[3], part[4],
            n, v, d, per_split * bv, splits, xf.inv_temp, xf.softcap or 1.0,
            HAS_BIAS=bias is not None, SOFTCAP=xf.softcap is not None, SUM_S=sum_s, ENTROPY=entropy,
            UPCAST=_utils.interpreting(), IEEE=hidden.dtype == torch.float32, GROUP_N=group["GROUP_N"],
            **cfg["fwd"])
    m, l, ss, a, st = part
    # Merge the splits' online softmax states at the common max M: l_k, a_k are relative to m_k.
    m_max = m.amax(0)
    w = torch.exp(m - m_max)
    l_sum = (l * w).sum(0)
    ent = l_sum.log() - (w * (a + (m - m_max) * l)).sum(0) / l_sum if entropy else torch.zeros_like(l_sum)
    stats = torch.stack([m_max + l_sum.log(), st.sum(0), ss.sum(0), ent])
    # Skipped token blocks left -inf / 0 partials (NaN here): masked, never multiplied.
    return stats.masked_fill_(tgt < 0, 0)


def triton_grads(hidden, weight, bias, tgt, lse, c: GradCoefs, xf: LogitTransform, needs, filter_eps=None):
    """(grad_hidden, grad_weight, grad_bias) for d out / d s given by the per-row coefficients c."""
    _triton()
    check_triton_dtype(hidden)
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


def _coef_args(c: GradCoefs) -> list[torch.Tensor]:
    """The four per-row coefficient pointers a grad kernel takes: fp32, contiguous; an absent gamma or delta
    is alpha in its place (never read: HAS_GAMMA / HAS_DELTA are off)."""
    coef = [x.float().contiguous() if x is not None else None for x in c]
    return [coef[0] if x is None else x for x in coef]


def _row_block(v: int, on_gpu: bool) -> dict:
    # GPU: 4096 columns per step (a bf16 row is 256 KB at V = 128256: ~32 steps, each 8 KB per warp
    # group); the interpreter: small blocks, so test shapes cover several steps and a ragged last one.
    return {"BLOCK_V": 4096, "num_warps": 8} if on_gpu else {"BLOCK_V": 64}


def triton_row_stats(s: torch.Tensor, bias, tgt: torch.Tensor, xf: LogitTransform, *, sum_s: bool = False,
                     entropy: bool = False) -> torch.Tensor:
    """Per-row stats [4, R] (lse, s_target, sum s, entropy) of a materialized [R, V] logits tile; sum s and
    the entropy are 0 unless asked (each is one more block reduction per step)."""
    _triton()
    r, v = s.shape
    out = _utils.empty((4, r), torch.float32, s.device)
    _row_stats_kernel[(r,)](s, s if bias is None else bias, tgt, out, r, v, s.stride(0), xf.inv_temp,
                            xf.softcap or 1.0, HAS_BIAS=bias is not None, SOFTCAP=xf.softcap is not None,
                            SUM_S=sum_s, ENTROPY=entropy, **_row_block(v, s.is_cuda))
    return out


def triton_row_grads(s: torch.Tensor, dz: torch.Tensor, bias, tgt: torch.Tensor, lse: torch.Tensor, c: GradCoefs,
                     xf: LogitTransform) -> torch.Tensor:
    """Write d out / d z of the [R, V] logits tile s, for the per-row coefficients c, into dz (may be s)."""
    _triton()
    r, v = s.shape
    _row_grad_kernel[(r,)](s, dz, s if bias is None else bias, tgt, lse.float().contiguous(), *_coef_args(c),
                           v, s.stride(0), dz.stride(0), xf.inv_temp, xf.softcap or 1.0,
                           HAS_BIAS=bias is not None, SOFTCAP=xf.softcap is not None,
                           HAS_GAMMA=c.gamma is not None, HAS_DELTA=c.delta is not None, **_row_block(v, s.is_cuda))
    return dz
