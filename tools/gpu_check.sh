#!/usr/bin/env bash
# GPU check of the fused linear-attention kernels (issue 18, part 5), sized for one 15-minute device lease.
#
#   tools/gpu_check.sh prepare   # here, once (needs the package index): the wheels the device image lacks -> .whl/
#   tools/gpu_check.sh run       # on the device: run(command="tools/gpu_check.sh run", carry=[".whl"], timeout_s=540)
#
# `run` steps, each under its own `timeout` so a hang cannot eat the lease; summary.txt, logs, JSON and tables (at
# most 8 files, the device tool's limit) land in $OUT (the device tool's folder) or runs/gpu_check:
#   1. CUDA/GPU tests (<= 150 s): tests/test_fused_sums.py (Triton and Pallas kernels compiled, every mode, gradients,
#      bf16, the dispatch inside attention_core) and tests/test_kernels.py's CUDA test (every kind vs the float64
#      oracle: feature-map kinds now go through the Triton kernels);
#   2. timing (<= 220 s, rows written as they come): tools/bench_fused.py, fused vs plain forward+backward at
#      L = 1k, 4k, 16k, F = 64 and 256,
#      torch and JAX -> fused.json, fused.md (the aim: plain / fused >= 2 at L >= 4k);
#   3. the MLM step against Hugging Face (<= 100 s): `minibert-lab bench models --device cuda --quick` -> its JSON.
# Step 3 needs what the CLI imports; if the image lacks a package it fails alone (its log says which).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
PY=${PY:-python3}
WHEELS=(array-api-compat==1.16.0)  # imported by minibert_lab.kernels; absent from the device image (KINDS.md)

if [ "${1:-}" = prepare ]; then
    mkdir -p .whl
    for w in "${WHEELS[@]}"; do
        $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$w" || exit 1
    done
    ls -l .whl; exit 0
fi
[ "${1:-}" = run ] || { echo "usage: tools/gpu_check.sh prepare|run"; exit 2; }

mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the GPU in one process (tests, bench)
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/summary.txt"
$PY -c "import torch, jax, triton; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| jax', jax.__version__, jax.default_backend(), '| triton', triton.__version__)" | tee -a "$OUT/summary.txt"

step() { local name=$1 limit=$2; shift 2; echo "== $name (limit ${limit}s)"; local t=$SECONDS
         timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
         tail -n 25 "$OUT/$name.log"; echo "== $name: rc=$rc in $((SECONDS - t))s" | tee -a "$OUT/summary.txt"; }

step tests 150 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_fused_sums.py tests/test_kernels.py -k "cuda or gpu"
step bench 220 $PY tools/bench_fused.py --out "$OUT" --reps 10
step models 100 $PY -W ignore -c "import sys; from minibert_lab.cli import main; sys.exit(main())" \
    bench models --device cuda --quick --out /tmp/gpu_check_models
cp /tmp/gpu_check_models/*.json "$OUT/" 2>/dev/null  # the device tool returns at most 8 files
cat "$OUT/summary.txt"; cat "$OUT/fused.md" 2>/dev/null
