#!/usr/bin/env bash
# The whole `vtprune bench` grid on one GPU, sized for a short lease (under 8 minutes on an H100/H200):
# the LLaVA-1.5-7B and LLaVA-NeXT-7B shapes (random weights, built directly on the GPU in seconds,
# bf16, LLaVA-NeXT at a fixed 672x672 image), every registered method at the field's budgets
# (192/128/64 and 640/320/160), each row against the unpruned model and its oracle, peak memory with
# the allocator's peak reset per row, CUDA-event timing. Then the small llava-0.5b shape if time is left.
#
#   scripts/gpu_bench.sh [OUT_DIR]          # default OUT_DIR: bench-gpu-<date>-<time>
#
# Writes OUT_DIR/bench.json, bench.csv, bench.png (with matplotlib), log.txt and gpu.txt; the small
# shape goes to OUT_DIR/small/. Files are rewritten after every shape, so a run cut short by the
# time limit keeps every shape it finished.
#
# Environment: PYTHON (python), BUDGET_S (450: seconds for the 7B grid, hard limit), SMALL_S (60:
# seconds the small shape needs, skipped if fewer are left of 470), REPEATS (5), WARMUP (1), DECODE (8),
# METHODS (all), SHAPES (llava-1.5-7b,llava-next-7b), SMALL (llava-0.5b), DEVICE (cuda), DTYPE (bf16),
# MEMORY (auto), THREADS (torch's default). A dry run of the plumbing on a CPU:
#   DEVICE=cpu DTYPE=fp32 SHAPES=tiny SMALL=tiny-next METHODS=vtc-cls,fastv REPEATS=1 MEMORY=inprocess THREADS=1 scripts/gpu_bench.sh /tmp/x
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-gpu-$(date +%Y%m%d-%H%M%S)}
PY=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-450}
SMALL_S=${SMALL_S:-60}
COMMON=(--device "${DEVICE:-cuda}" --dtype "${DTYPE:-bf16}" --methods "${METHODS:-all}" --repeats "${REPEATS:-5}" --warmup "${WARMUP:-1}" --decode-tokens "${DECODE:-8}" --memory "${MEMORY:-auto}" ${THREADS:+--threads "$THREADS"})
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this working tree's vtprune, installed or not
export TOKENIZERS_PARALLELISM=false

mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "nvidia-smi not available"
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE')"
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

start=$(date +%s)
timeout --signal=INT --kill-after=10 "$BUDGET_S" "$PY" -m vtprune.eval.bench "${COMMON[@]}" \
  --shapes "${SHAPES:-llava-1.5-7b,llava-next-7b}" --out "$OUT" 2>&1 | tee "$OUT/log.txt"
rc=${PIPESTATUS[0]}
used=$(( $(date +%s) - start ))
echo "7B grid: exit $rc after ${used}s (files in $OUT)"

left=$(( 470 - used ))
if [ "$rc" -eq 0 ] && [ "$left" -ge "$SMALL_S" ]; then
  timeout --signal=INT --kill-after=10 "$left" "$PY" -m vtprune.eval.bench "${COMMON[@]}" \
    --shapes "${SMALL:-llava-0.5b}" --out "$OUT/small" 2>&1 | tee "$OUT/small-log.txt"
  echo "small shape: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start ))s in all"
else
  echo "small shape skipped (${left}s left of 470)"
fi
exit "$rc"
