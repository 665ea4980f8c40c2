#!/usr/bin/env bash
# GPU checks and benchmarks, in under 5 minutes on one GPU:
#   1. tests/test_cuda.py: every fast path against its reference on the device;
#   2. benchmarks/bench_moe.py --device cuda: training (forward + backward) vs transformers' experts
#      implementations (grouped_mm, eager, batched_mm);
#   3. benchmarks/bench_gpu.py: inference (decode, prefill) and training vs transformers' grouped_mm, and
#      ScatterMoE / MegaBlocks when importable.
# Results go to benchmarks/results/gpu/ (or --out DIR).
#
#   benchmarks/gpu.sh              # on a CUDA machine
#   benchmarks/gpu.sh --dry-run    # the same steps on CPU with tiny shapes (checks the script; results to a temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

dry=0
out=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    --out=*) out="${arg#--out=}" ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$arg' (allowed: --dry-run, --out=DIR)" >&2; exit 2 ;;
  esac
done

if [ "$dry" = 1 ]; then
  device=cpu; quick=(--quick); reps=(--reps 1); out="${out:-$(mktemp -d -t moekit-gpu-dry-XXXXXX)}"
  export OMP_NUM_THREADS=1
else
  if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: no CUDA device here; use --dry-run to check the script on CPU" >&2
    exit 2
  fi
  device=cuda; quick=(); reps=(); out="${out:-benchmarks/results/gpu}"
fi
mkdir -p "$out"
echo "gpu.sh: device=$device, results in $out"

echo "== 1/3 fast paths vs references (tests/test_cuda.py)"
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_cuda.py -m cuda

echo "== 2/3 training: bench_moe.py"
timeout 120 python benchmarks/bench_moe.py --device "$device" "${quick[@]}" "${reps[@]}" --out "$out"

echo "== 3/3 inference and training vs grouped_mm / ScatterMoE / MegaBlocks: bench_gpu.py"
timeout 150 python benchmarks/bench_gpu.py --device "$device" "${quick[@]}" "${reps[@]}" --out "$out"

echo "gpu.sh: done; results in $out"
