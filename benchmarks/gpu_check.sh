#!/usr/bin/env bash
# The GPU check on a CUDA machine, in one command (benchmarks/gpu_check.py says what each step checks):
# installs the GPU extras (megablocks; sonic-moe where it installs), then runs every step with one
# Triton cache, writing gpu_check.json and the logs to OUT_DIR (default: $OUT, else
# benchmarks/results/gpu_check).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [--only step,...]   # on the GPU machine, ~8 min on one H100
#   bash benchmarks/gpu_check.sh --dry-run                     # the plan, anywhere (installs nothing)
#
# PYTHON picks the interpreter (default: .venv/bin/python if it exists, else python).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-benchmarks/results/gpu_check}"
if [[ $# -gt 0 && "$1" != --* ]]; then
    out="$1"
    shift
fi
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
    if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python; fi
fi
dry_run=0
for arg in "$@"; do
    [[ "$arg" == "--dry-run" ]] && dry_run=1
done

export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$out/triton_cache}"  # every step and subprocess shares it
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ $dry_run == 0 ]]; then
    mkdir -p "$out"
    : > "$out/install.txt"
    # Bounded: a source build of an optional peer must not eat the GPU's time; what failed is recorded.
    if timeout 240 "$py" -m pip install -q -e '.[gpu]' > "$out/install.log" 2>&1; then
        echo "gpu extras (megablocks): installed" >> "$out/install.txt"
    else
        echo "gpu extras (megablocks): FAILED (rc $?), see install.log" >> "$out/install.txt"
    fi
    if timeout 120 "$py" -m pip install -q sonic-moe >> "$out/install.log" 2>&1; then
        echo "sonic-moe: installed" >> "$out/install.txt"
    else
        echo "sonic-moe: not installed (rc $?; it needs Python >= 3.12 and CUDA >= 12.9), see install.log" \
            >> "$out/install.txt"
    fi
fi
exec "$py" -m pure_reasoner.benchmarks.gpu_check --out "$out" "$@"
