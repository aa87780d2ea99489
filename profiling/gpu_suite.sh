#!/usr/bin/env bash
# The one-command GPU suite, for a session lent an H100/H200 (torch, triton, transformers and pytest
# preinstalled, no registry). Stages:
#   tests       the CUDA kernel tests
#   bench       the kernel benchmark at the Llama-3-8B / Qwen2.5-7B shapes (every fused backend vs naive, and
#               Liger when its wheel was carried)
#   preference  one DPO step fused + padding-free vs materialized logits + padded (bf16, 50.9M model, vocab 32k)
#   profile     kernel-by-kernel torch.profiler tables of one CE and one log-prob step (profile_kernels.py)
#   sft | dpo | grpo
#               training steps of the method on tiny:gpu-0.5b (494M random-init Qwen2, Qwen2.5-0.5B's shape),
#               bf16, under torch.profiler (profiling/torch_profile.py: trace, summary, SFT/DPO memory
#               timeline); GRPO with HF generate (vLLM cannot travel to the GPU machine)
#   deepspeed   SFT on tiny:gpu-0.5b through DeepSpeed ZeRO-3 in bf16 on one GPU (NCCL), 6 steps with a checkpoint
#               at step 3, then a resume from it whose steps 4-6 must equal the first run's to the bit
#   bash profiling/gpu_suite.sh                 # all stages
#   bash profiling/gpu_suite.sh sft             # one
# Results land in $OUT (the device tool's output folder) when set, else in bench/results/. With the device
# tool, run one stage per call: each fits its 10-minute limit, and a call brings back at most 8 files from $OUT
# (a stage writes at most 6, besides nvidia-smi.txt and versions.txt).
# Each stage runs in its own `bash -euo pipefail`: its first failing command fails it; the others still run, and
# the suite exits 1 naming the failed stages. Without a CUDA device nothing runs: it prints the commands it
# would run and exits 3 (a dry run).
# Liger-Kernel, optional: here, `pip download --no-deps liger-kernel -d .whl` (pure Python), carry `.whl`.
# DeepSpeed, for the deepspeed stage: here, `pip wheel --no-deps deepspeed==0.19.0 hjson msgpack py-cpuinfo einops
# -w .whl` (deepspeed is an sdist; no C++ op is built); pydantic and psutil must be on the GPU machine already or
# carried as wheels for its Python. Every wheel in .whl is installed into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
source profiling/_common.sh
out="${OUT:-bench/results}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"  # python3 is the torch one on the GPU machine
export out PY PYTHONUNBUFFERED=1
all=(tests bench preference profile sft dpo grpo deepspeed)
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=("${all[@]}")

# What the training stages share: the 0.5B preset in bf16, three steps (wait 1, warm-up 1, record 1).
train='$PY profiling/torch_profile.py --model tiny:gpu-0.5b --device cuda --out "$out"'
tee_to() { echo "2>&1 | tee \"\$out/$1\""; }  # the stage's log, kept in $out

stage_cmd() {  # the stage's commands, as text run by `bash -euo pipefail -c` (and printed by the dry run)
  case "$1" in
    tests) echo "\$PY -m pytest -q -m gpu tests/kernels $(tee_to gpu-tests.txt)" ;;
    bench) echo "\$PY bench/kernels.py --device cuda $(tee_to bench-kernels-cuda.txt)"
           echo '[ bench/results -ef "$out" ] || cp bench/results/kernels-cuda.json "$out/"' ;;
    preference) echo "\$PY bench/preference.py --device cuda --pairs 32 --steps 5" \
                     "--json \"\$out/preference-cuda.json\" $(tee_to bench-preference-cuda.txt)" ;;
    profile) for impl in fused-hybrid fused-triton; do  # kernel-by-kernel time of one CE training step
               echo "\$PY profiling/profile_kernels.py --op linear_ce --impl $impl --shape llama3-8b --out \"\$out\"" \
                    "2>&1 | tail -40"
             done
             echo "\$PY profiling/profile_kernels.py --op logprobs --impl fused-hybrid --shape llama3-8b" \
                  "--out \"\$out\" 2>&1 | tail -40" ;;
    sft) echo "$train --method sft trainer.precision=bf16 data.num_train=4000 data.max_tokens=2048" \
              "trainer.batch_tokens=8192 $(tee_to train-sft.txt)" ;;
    dpo) echo "$train --method dpo trainer.precision=bf16 data.num_train=1000 data.max_tokens=1024" \
              "trainer.batch_tokens=4096 $(tee_to train-dpo.txt)" ;;
    # no memory timeline: with_stack over 16 generate steps would make a trace too big to bring back
    grpo) echo "$train --method grpo --engine hf --no-memory trainer.precision=bf16 rl.prompts_per_step=16" \
               "rl.group_size=8 rl.max_new_tokens=16 rl.canary_tolerance=5e-2 $(tee_to train-grpo.txt)" ;;
    # resumed in place (a copy of the run would copy ~7 GB of fp32 master weights + AdamW state per checkpoint)
    deepspeed) local ds='$PY -m optsys.train model.name_or_path=tiny:gpu-0.5b parallel.backend=deepspeed'
               ds+=' parallel.zero_stage=3 trainer.precision=bf16 data.num_train=2000 data.num_eval=50'
               ds+=' data.max_tokens=2048 trainer.batch_tokens=8192 trainer.max_steps=6 trainer.save_every=3'
               ds+=' trainer.log_every=1 trainer.progress=false trainer.plots=false eval.before=false eval.after=false'
               ds+=' output_dir=/tmp/ds-run'
               echo "\$PY -c 'import deepspeed' || { echo 'deepspeed is not importable: carry its wheels (see the" \
                    "header)'; exit 1; }"
               echo "rm -rf /tmp/ds-run && $ds $(tee_to train-deepspeed.txt)"
               echo 'cp /tmp/ds-run/metrics.jsonl /tmp/ds-full-metrics.jsonl && rm -rf /tmp/ds-run/summary.json' \
                    '/tmp/ds-run/checkpoints/step-00000006'
               echo "$ds resume=true $(tee_to train-deepspeed-resume.txt)"
               echo "\$PY profiling/same_metrics.py /tmp/ds-full-metrics.jsonl /tmp/ds-run/metrics.jsonl --steps 4 5 6" \
                    "$(tee_to deepspeed-resume-check.txt)"
               echo 'cp /tmp/ds-run/deepspeed_config.json "$out/"' ;;
    *) return 1 ;;
  esac
}

for stage in "${stages[@]}"; do
  stage_cmd "$stage" >/dev/null || { echo "gpu_suite.sh: unknown stage '$stage' (one of: ${all[*]})" >&2; exit 2; }
done

if reason=$(no_cuda_reason); then
  echo "gpu_suite.sh: no CUDA device here ($reason): a dry run, nothing was run. On a GPU machine it would run:"
  echo "  out=$out PY=$PY"
  echo '  [setup] nvidia-smi | tee "$out/nvidia-smi.txt"; $PY -m pip install -q --no-deps --no-build-isolation -e .'
  for stage in "${stages[@]}"; do
    stage_cmd "$stage" | sed "s/^/  [$stage] /"
  done
  exit 3
fi

mkdir -p "$out"
nvidia-smi | tee "$out/nvidia-smi.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee "$out/versions.txt"
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels: Liger-Kernel, DeepSpeed and its deps (see the header)
  for wheel in .whl/*.whl; do
    $PY -m pip install -q --no-index --no-deps --target /tmp/site "$wheel" || echo "could not install $wheel"
  done
  export PYTHONPATH=/tmp/site
fi
# optsys.kernels is kernels/ mapped by setuptools: install in place (no registry there: no build isolation).
# If that fails (setuptools < 77 cannot read the SPDX license field), a link makes kernels/ importable as
# optsys.kernels from the checkout.
if ! $PY -m pip install -q --no-deps --no-build-isolation -e .; then
  echo "pip install -e . failed: importing from the checkout through optsys/kernels -> ../kernels"
  ln -sfn ../kernels optsys/kernels
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -c "import optsys.kernels as k; print('optsys.kernels from', k.__file__)" || exit 1

failed=()
for stage in "${stages[@]}"; do
  echo "=== stage $stage"
  t0=$SECONDS
  if bash -euo pipefail -c "$(stage_cmd "$stage")"; then
    echo "=== stage $stage passed in $((SECONDS - t0)) s"
  else
    echo "=== stage $stage FAILED after $((SECONDS - t0)) s"
    failed+=("$stage")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_suite.sh: failed stages: ${failed[*]}"
  exit 1
fi
echo "gpu_suite.sh: all stages passed: ${stages[*]}"
