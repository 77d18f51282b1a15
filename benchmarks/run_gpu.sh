#!/usr/bin/env bash
# Everything that needs a GPU, in one go: the kernels, attention backends and golden step checked on
# the card first, then the kernel and step benchmarks (and, on request, the data and mask benchmarks
# and the digits recipe search). Figures go to $OUT (default benchmarks/results), each with the card,
# versions and commit; the whole log to $OUT/gpu_log_<card>.txt.
#
#   bash benchmarks/run_gpu.sh                                 # checks, kernels, ViT-B/16 and ViT-H/14 steps
#   MODELS=vit_base:16:256 EXTRA=1 bash benchmarks/run_gpu.sh  # also bench_data and bench_masks
#   SEARCH=1 bash benchmarks/run_gpu.sh                        # also the digits recipe search, beside the checks
#
# Each stage has a time cap (seconds, *_S variables below) so that one slow stage cannot eat the
# others' time; a stage cut short keeps the rows it already wrote.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
MODELS=${MODELS:-vit_base:16:256,vit_huge:14:128}
TESTS_S=${TESTS_S:-240} KERNELS_S=${KERNELS_S:-60} STEP_S=${STEP_S:-150} SEARCH_MIN=${SEARCH_MIN:-3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
card=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo cpu)
exec > >(tee -a "$OUT/gpu_log_$card.txt") 2>&1
echo "== $(date -u +%FT%TZ) on $card, commit ${IJEPA_FAST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

search_pid=""
if [ "${SEARCH:-0}" = 1 ]; then
    echo "== digits recipe search (in the background, ${SEARCH_MIN} min of launches)"
    python benchmarks/search_quality.py --device cuda --parallel "${SEARCH_PARALLEL:-12}" \
        --launch-minutes "$SEARCH_MIN" --stop-minutes "$(python -c "print($SEARCH_MIN + 1.2)")" \
        --set model.layout=padded --set model.kernels=reference --set run.precision=fp32 \
        --workdir "${SEARCH_DIR:-/tmp/search}" --out "$OUT/search_$card.jsonl" --md "$OUT/search_$card.md" \
        > "$OUT/search_log_$card.txt" 2>&1 &
    search_pid=$!
fi

echo "== correctness on $card (kernels compiled for the card, attention backends, golden step)"
timeout "$TESTS_S" python -m pytest tests/test_kernel*.py tests/test_varlen.py tests/test_reference_golden.py \
    -q -x -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/gpu_tests_$card.txt"
if [ -n "$search_pid" ]; then
    wait "$search_pid"
    tail -25 "$OUT/search_log_$card.txt"
fi

echo "== kernels"
timeout "$KERNELS_S" python benchmarks/bench_kernels.py --out "$OUT/kernels_$card.jsonl" --md "$OUT/kernels_$card.md"
echo "== training step (with the released step when .bench_ref is present)"
for item in ${MODELS//,/ }; do
    refs=released,compiled
    case $item in vit_huge*|vit_giant*) refs=released ;; esac  # compiling the released ViT-H step costs minutes
    timeout "$STEP_S" python benchmarks/bench_step.py --models "$item" --steps 10 --warmup 4 --reference \
        --reference-variants "$refs" --out "$OUT/step_$card.jsonl" --md "$OUT/step_${item%%:*}_$card.md"
done
if [ "${EXTRA:-0}" = 1 ]; then
    echo "== data and masks"
    python benchmarks/bench_data.py --images 512 --batch 128 --workers 8 --out "$OUT/data_$card.jsonl" \
        --md "$OUT/data_$card.md"
    python benchmarks/bench_masks.py --out "$OUT/masks_$card.jsonl" --md "$OUT/masks_$card.md"
fi
echo "== done $(date -u +%FT%TZ)"
