# Sourced by the profiling scripts: is there a CUDA device, and how to show a command.

# Prints why this machine has no CUDA device and returns 0; returns 1 (printing nothing) when it has one.
# No nvidia-smi means no NVIDIA driver: that answer costs nothing; otherwise torch is asked.
no_cuda_reason() {
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "no nvidia-smi on PATH: no NVIDIA driver"
    return 0
  fi
  if ! "${PYTHON:-python}" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "torch sees no CUDA device"
    return 0
  fi
  return 1
}

# The command as one copy-pasteable shell line (arguments with shell characters in single quotes).
show_cmd() {
  local arg line=""
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      line+="$arg "
    else
      line+="'${arg//\'/\'\\\'\'}' "
    fi
  done
  echo "${line% }"
}
