#!/usr/bin/env bash
# The one-command GPU suite, for a session lent an H100/H200 (torch, triton, transformers and pytest
# preinstalled, no registry): the CUDA kernel tests, the kernel benchmark at the Llama-3-8B / Qwen2.5-7B
# shapes (every fused backend vs naive, and Liger when its wheel was carried), and one DPO step fused +
# padding-free vs materialized logits + padded (bf16 autocast, 50.9M tiny model, vocab 32k).
# Results land in $OUT (the device tool's output folder) when set, else in bench/results/.
#   bash profiling/gpu_suite.sh                 # all stages
#   bash profiling/gpu_suite.sh bench           # one: tests | bench | preference | profile
# With the device tool, run one stage per call: each fits its 10-minute limit, and a call brings back at
# most 8 files from $OUT (a stage writes at most 6, besides nvidia-smi.txt and versions.txt).
# Liger-Kernel, optional: here, `pip download --no-deps liger-kernel -d .whl` (pure Python), carry `.whl`.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests bench preference profile)
export PYTHONUNBUFFERED=1
nvidia-smi | tee "$out/nvidia-smi.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee "$out/versions.txt"
if ls .whl/liger_kernel*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-index --no-deps --target /tmp/site .whl/liger_kernel*.whl && export PYTHONPATH=/tmp/site
fi
# optsys.kernels is kernels/ mapped by setuptools: install in place (no registry there: no build isolation).
# If that fails (setuptools < 77 cannot read the SPDX license field), a link makes kernels/ importable as
# optsys.kernels from the checkout.
if ! python -m pip install -q --no-deps --no-build-isolation -e .; then
  echo "pip install -e . failed: importing from the checkout through optsys/kernels -> ../kernels"
  ln -sfn ../kernels optsys/kernels
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python -c "import optsys.kernels as k; print('optsys.kernels from', k.__file__)" || exit 1
for stage in "${stages[@]}"; do
  case "$stage" in
    tests) python -m pytest -q -m gpu tests/kernels 2>&1 | tee "$out/gpu-tests.txt" ;;
    bench) python bench/kernels.py --device cuda 2>&1 | tee "$out/bench-kernels-cuda.txt"
           cp bench/results/kernels-cuda.json "$out/" 2>/dev/null ;;
    preference) python bench/preference.py --device cuda --pairs 32 --steps 5 --json "$out/preference-cuda.json" 2>&1 \
                  | tee "$out/bench-preference-cuda.txt" ;;
    profile) for impl in fused-hybrid fused-triton; do  # kernel-by-kernel time of one CE training step
               python profiling/profile_kernels.py --op linear_ce --impl $impl --shape llama3-8b --out "$out" 2>&1 \
                 | tail -40
             done
             python profiling/profile_kernels.py --op logprobs --impl fused-hybrid --shape llama3-8b --out "$out" 2>&1 \
               | tail -40 ;;
    *) echo "unknown stage $stage (tests | bench | preference | profile)"; exit 2 ;;
  esac
done
