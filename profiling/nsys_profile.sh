#!/usr/bin/env bash
# Nsight Systems timeline of a few training steps: CUDA API calls and kernels, the optsys NVTX ranges (domain
# "optsys": optsys.step, optsys.forward, optsys.loss.*, optsys.generate, optsys.weight_sync, ...) and OS runtime
# calls. profiling/torch_profile.py --under nsys runs the steps and brackets the active ones with
# cudaProfilerStart/Stop, so model load, Triton compiles and the warm-up steps stay out of the report.
#   bash profiling/nsys_profile.sh [sft|dpo|grpo] [torch_profile.py options and key=value overrides ...]
#   bash profiling/nsys_profile.sh grpo --model tiny:gpu-0.5b trainer.precision=bf16
# Writes $OUT (default bench/results/profile)/nsys-<method>.nsys-rep: open it in nsys-ui, or `nsys stats` it.
# Without nsys on PATH or without a CUDA device it prints the command it would run and exits 2.
set -uo pipefail
cd "$(dirname "$0")/.."
source profiling/_common.sh
method="${1:-sft}"
[ $# -gt 0 ] && shift
case "$method" in
  sft|dpo|grpo) ;;
  *) echo "nsys_profile.sh: method: one of sft | dpo | grpo, got '$method'" >&2; exit 2 ;;
esac
out="${OUT:-bench/results/profile}"
cmd=(nsys profile --trace cuda,nvtx,osrt --capture-range=cudaProfilerApi --capture-range-end=stop
     --cuda-memory-usage=true --force-overwrite=true --output "$out/nsys-$method"
     "${PYTHON:-python}" profiling/torch_profile.py --method "$method" --under nsys --device cuda "$@")
missing=()
command -v nsys >/dev/null 2>&1 || missing+=("nsys is not on PATH (Nsight Systems)")
reason=$(no_cuda_reason) && missing+=("$reason")
if [ ${#missing[@]} -gt 0 ]; then
  echo "nsys_profile.sh: not run: $(printf '%s; ' "${missing[@]}" | sed 's/; $//'). It would run:"
  show_cmd "${cmd[@]}"
  exit 2
fi
mkdir -p "$out"
show_cmd "${cmd[@]}"
"${cmd[@]}"
