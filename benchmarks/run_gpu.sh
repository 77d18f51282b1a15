#!/usr/bin/env bash
# Everything that needs a GPU, in one go: the kernels and attention backends checked on the card
# first, then the kernel, step, data and mask benchmarks. Figures go to $OUT (default
# benchmarks/results), each with the card, versions and commit.
#
#   bash benchmarks/run_gpu.sh            # about 10 minutes on one H100
#   MODELS=vit_base:16:256 bash benchmarks/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
MODELS=${MODELS:-vit_base:16:256,vit_huge:14:128}
mkdir -p "$OUT"
card=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo cpu)
export PYTHONUNBUFFERED=1
echo "== correctness on $card"
python -m pytest tests/test_kernels.py tests/test_varlen.py tests/test_reference_golden.py -q -x 2>&1 | tail -5 \
    | tee "$OUT/gpu_tests_$card.txt"
echo "== kernels"
python benchmarks/bench_kernels.py --out "$OUT/kernels_$card.jsonl" --md "$OUT/kernels_$card.md"
echo "== training step (with the released step when .bench_ref is present)"
python benchmarks/bench_step.py --models "$MODELS" --steps 8 --warmup 3 --reference \
    --out "$OUT/step_$card.jsonl" --md "$OUT/step_$card.md"
echo "== data and masks"
python benchmarks/bench_data.py --images 512 --batch 128 --workers 8 --out "$OUT/data_$card.jsonl" \
    --md "$OUT/data_$card.md"
python benchmarks/bench_masks.py --out "$OUT/masks_$card.jsonl" --md "$OUT/masks_$card.md"
