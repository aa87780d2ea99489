#!/usr/bin/env bash
# The first GPU call: one script of about 7 minutes for a session lent an H100/H200 (torch 2.11, triton 3.6,
# transformers 5.17, pytest preinstalled; no registry, no datasets / nvtx / liger / vllm). Parts, each under its
# own `timeout`, each writing $OUT/first-<part>.json as it goes (profiling/first_call.py), so a run that is killed
# still brings back what it measured:
#   tests  (75 s)   the `gpu`-marked kernel tests, one JSON row per test
#   big    (60 s)   N x V past 2^31 (17000 x 128256, bf16): hybrid and the Triton tiles vs a reference in row pieces
#                   and vs naive, the rows past the 2^31-th logit on their own; the out_dtype=float32 matmuls must
#                   not fall back
#   head   (120 s)  the Llama-3-8B head (8192 x 4096 x 128256, bf16): naive / hybrid / triton (/ liger), CE and
#                   token log-probs, fwd and fwd+bwd, 5 repeats; TFLOP/s beside the cuBLAS lm_head matmul's;
#                   bench/README.md's targets checked
#   tiles  (60 s)   the all-Triton CE fwd+bwd at each of the 8 TILE_CANDIDATES (kernels/triton_tiles.py)
#   sft    (90 s)   three bf16 SFT steps of tiny:gpu-0.5b (494M, random init, built on the machine)
#   bash profiling/gpu_first_call.sh               # every part
#   bash profiling/gpu_first_call.sh head tiles    # some
# Files in $OUT (else bench/results/first-call/): env.txt, parts.jsonl (one line per part: exit code, seconds),
# first-<part>.json. Exits 1 if a part failed or timed out (124). Without a CUDA device it runs nothing: it prints
# what it would run and exits 3 (a dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
source profiling/_common.sh
out="${OUT:-bench/results/first-call}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"  # python3 is the torch one on the GPU machine
export PYTHONUNBUFFERED=1
all=(tests big head tiles sft)
declare -A limit=([tests]=75 [big]=60 [head]=120 [tiles]=60 [sft]=90)
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=("${all[@]}")
for part in "${parts[@]}"; do
  [ -n "${limit[$part]:-}" ] || { echo "gpu_first_call.sh: unknown part '$part' (one of: ${all[*]})" >&2; exit 2; }
done

part_cmd() { echo "timeout -k 10 ${limit[$1]} $PY profiling/first_call.py $1 --out $out"; }

if reason=$(no_cuda_reason); then
  echo "gpu_first_call.sh: no CUDA device here ($reason): a dry run, nothing was run. On a GPU machine it would run:"
  echo "  [setup] nvidia-smi > $out/env.txt; $PY -m pip install -q --no-deps --no-build-isolation -e ."
  for part in "${parts[@]}"; do
    echo "  [$part] $(part_cmd "$part")"
  done
  exit 3
fi

mkdir -p "$out"
{ nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$out/env.txt" 2>&1
# optsys.kernels is kernels/ mapped by setuptools: install in place (no registry there: no build isolation); if
# that fails, a link makes kernels/ importable as optsys.kernels from the checkout (as gpu_suite.sh does).
if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >> "$out/env.txt" 2>&1; then
  echo "pip install -e . failed: importing from the checkout through optsys/kernels -> ../kernels" | tee -a "$out/env.txt"
  ln -sfn ../kernels optsys/kernels
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

failed=()
for part in "${parts[@]}"; do
  echo "=== part $part (limit ${limit[$part]} s)"
  t0=$SECONDS
  timeout -k 10 "${limit[$part]}" "$PY" profiling/first_call.py "$part" --out "$out" 2>&1 | tail -n 60
  rc=${PIPESTATUS[0]}
  echo "{\"part\": \"$part\", \"exit_code\": $rc, \"seconds\": $((SECONDS - t0)), \"limit_s\": ${limit[$part]}}" \
    >> "$out/parts.jsonl"
  echo "=== part $part: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || failed+=("$part")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_first_call.sh: failed or timed out: ${failed[*]}"
  exit 1
fi
echo "gpu_first_call.sh: all parts passed: ${parts[*]}"
