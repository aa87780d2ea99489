"""Fused kernels (Triton on CUDA, chunked torch on CPU). Imported as optsys.kernels."""
