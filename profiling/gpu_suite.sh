#!/usr/bin/env bash
# The one-command GPU suite, for a session lent an H100/H200 (torch, triton and transformers preinstalled,
# no registry): the CUDA kernel tests, the kernel benchmark at the Llama-3-8B / Qwen2.5-7B shapes, and one DPO
# step fused + padding-free vs materialized logits + padded (bf16 autocast, 50.9M tiny model, vocab 32k).
# Results land in $OUT (the device tool's output folder) when set, else in bench/results/.
#   bash profiling/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
nvidia-smi | tee "$out/nvidia-smi.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee "$out/versions.txt"
# optsys.kernels is kernels/ mapped by setuptools: install in place (no registry there: no build isolation).
python -m pip install -q --no-deps --no-build-isolation -e . || { echo "pip install -e . failed (setuptools >= 68 needed)"; exit 1; }
python -m pytest -q -m gpu tests/kernels 2>&1 | tee "$out/gpu-tests.txt"
python bench/kernels.py --device cuda 2>&1 | tee "$out/bench-kernels-cuda.txt"
python bench/preference.py --device cuda --pairs 32 --steps 5 --json "$out/preference-cuda.json" 2>&1 \
  | tee "$out/bench-preference-cuda.txt"
cp bench/results/kernels-*.json "$out/" 2>/dev/null || true
