"""The backend switch both linear-softmax ops share: one pass over the logits on the named backend.

"triton" runs the all-Triton tiles (triton_tiles.py); "torch" and "hybrid" run the chunk loop
(chunked.py), with the per-row math in torch or in the Triton row kernels. Grads come back in fp32
(fp64 for fp64 inputs) and `cast_grads` returns them in the inputs' dtypes.
"""

from __future__ import annotations

from .chunked import row_math_for, torch_pass
from .row_math import GradCoefs, LogitTransform
from .triton_tiles import triton_grads, triton_stats


def compute_stats(backend: str, hidden, weight, bias, tgt, xf: LogitTransform, *, sum_s=False, entropy=False):
    """Per-row stats [4, N]; SUM_S and ENTROPY are computed only when asked (0 otherwise)."""
    if backend == "triton":
        return triton_stats(hidden, weight, bias, tgt, xf, sum_s=sum_s, entropy=entropy)
    return torch_pass(hidden, weight, bias, tgt, xf, sum_s=sum_s, entropy=entropy, row_math=row_math_for(backend))[0]


def compute_grads(backend: str, hidden, weight, bias, tgt, lse, c: GradCoefs, xf: LogitTransform, needs,
                  filter_eps=None):
    """(grad_hidden, grad_weight, grad_bias) for d out / d s given by the per-row coefficients c (None where
    `needs` says no); filter_eps is the Triton tiles' gradient filter, which the chunked paths ignore."""
    if backend == "triton":
        return triton_grads(hidden, weight, bias, tgt, lse, c, xf, needs, filter_eps)
    return torch_pass(hidden, weight, bias, tgt, xf, lse=lse, coef_fn=lambda rows, _: c.take(rows),
                      needs=needs, has_delta=c.delta is not None, row_math=row_math_for(backend))[1]


def cast_grads(grads, hidden, weight, bias):
    gh, gw, gb = grads
    return (None if gh is None else gh.to(hidden.dtype), None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(bias.dtype))
