"""Fused kernels (cuBLAS matmuls + Triton row kernels on CUDA, chunked torch on CPU). Imported as optsys.kernels."""

from ._utils import set_debug_checks
from .linear_cross_entropy import fused_linear_cross_entropy
from .linear_logprobs import linear_token_logprobs
from .reference import linear_cross_entropy_reference, linear_token_logprobs_reference

__all__ = [
    "fused_linear_cross_entropy",
    "linear_cross_entropy_reference",
    "linear_token_logprobs",
    "linear_token_logprobs_reference",
    "set_debug_checks",
]
