#!/usr/bin/env bash
# Nsight Compute: hardware counters of the fused-loss kernels in one training step of the op
# (profiling/profile_kernels.py --nvtx; its warm-up step runs before cudaProfilerStart, so it is not profiled).
#   bash profiling/ncu_profile.sh [profile_kernels.py options ...]    e.g. --op logprobs --impl fused-triton
# NCU_SET (default detailed: speed of light, compute and memory workload, launch stats, occupancy, scheduler and
# warp-state stats, source counters; the roofline chart is added), NCU_KERNELS (default the optsys Triton
# kernels: regex:_(row_)?(stats|grad)_kernel; regex:. for every kernel, cuBLAS's too), NCU_COUNT (kernels
# profiled, default 16). --clock-control none: the GPU keeps its own clocks, as in training.
# Writes $OUT (default bench/results/profile)/ncu-kernels.ncu-rep: open it in ncu-ui, or
# `ncu --import FILE --page details`. Without ncu on PATH or without a CUDA device it prints the command it
# would run and exits 2.
set -uo pipefail
cd "$(dirname "$0")/.."
source profiling/_common.sh
out="${OUT:-bench/results/profile}"
cmd=(ncu --set "${NCU_SET:-detailed}" --section SpeedOfLight_RooflineChart
     --kernel-name "${NCU_KERNELS:-regex:_(row_)?(stats|grad)_kernel}" --launch-count "${NCU_COUNT:-16}"
     --profile-from-start off --clock-control none --force-overwrite --export "$out/ncu-kernels"
     "${PYTHON:-python}" profiling/profile_kernels.py --nvtx --device cuda --out "$out" "$@")
missing=()
command -v ncu >/dev/null 2>&1 || missing+=("ncu is not on PATH (Nsight Compute)")
reason=$(no_cuda_reason) && missing+=("$reason")
if [ ${#missing[@]} -gt 0 ]; then
  echo "ncu_profile.sh: not run: $(printf '%s; ' "${missing[@]}" | sed 's/; $//'). It would run:"
  show_cmd "${cmd[@]}"
  exit 2
fi
mkdir -p "$out"
show_cmd "${cmd[@]}"
"${cmd[@]}"
