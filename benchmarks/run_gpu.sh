#!/usr/bin/env bash
# Every GPU check, in one go, each stage time-capped: versions; the kernels, attention backends and
# golden step on the card; the kernel benchmark; the training step of ViT-H/14 b128, ViT-B/16 b256,
# ViT-L/16 b128 and ViT-g/16 b16 beside the released step at equal work (reference-mode masks fed to
# both) and at default masks; FP8 step rows; on request the FP8-vs-bf16 digits quality gate; the
# profile of the ViT-H/14 step when benchmarks/profile_step.py exists. Figures go to $OUT (default
# benchmarks/results) as *_<card>.jsonl / *_<card>.md, with the card, versions and commit; the whole
# log to $OUT/gpu_log_<card>.txt. Stages: checks, kernels, step, variants (ViT-H/14 with the fused
# optimiser tail, token buckets and activation checkpointing: speed and peak memory), fp8, report,
# profile.
#
#   bash benchmarks/run_gpu.sh                 # the default set (about 13 minutes in all)
#   export BENCH_RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)                 # the same set in two calls of under
#   STAGES=checks,kernels,step bash benchmarks/run_gpu.sh          # 10 minutes each, on the same machine:
#   STAGES=variants,fp8,report,profile bash benchmarks/run_gpu.sh  # one run id, so one report page
#   FULL=1 bash benchmarks/run_gpu.sh          # also the compiled released step, FP8 tensorwise, FP8 at default
#                                              # masks and for ViT-B/16 (about 6 more minutes)
#   QUALITY=1 bash benchmarks/run_gpu.sh       # also the FP8 quality gate on the digits (a few minutes)
#   MODELS=vit_huge:14:128 bash benchmarks/run_gpu.sh   # fewer models; EXTRA=1: also bench_data, bench_masks
#
# Each stage has a time cap (seconds, *_S variables below) so that one slow stage cannot eat the
# others' time; a stage cut short keeps the rows it already wrote.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
MODELS=${MODELS:-vit_huge:14:128,vit_base:16:256,vit_large:16:128,vit_giant:16:16}
FULL=${FULL:-0} QUALITY=${QUALITY:-0} STEPS=${STEPS:-8} WARMUP=${WARMUP:-3}
STAGES=${STAGES:-checks,kernels,step,variants,fp8,report,profile} VARIANTS_S=${VARIANTS_S:-240}
stage() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
TESTS_S=${TESTS_S:-150} KERNELS_S=${KERNELS_S:-35} FP8_S=${FP8_S:-75} QUALITY_S=${QUALITY_S:-420}
PROFILE_S=${PROFILE_S:-60}
step_cap() {  # per-model cap of the step stage (seconds): STEP_S overrides all
    case $1 in vit_huge*) echo "${STEP_S:-100}" ;; vit_large*) echo "${STEP_S:-65}" ;; *) echo "${STEP_S:-55}" ;; esac
}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export BENCH_RUN_ID=${BENCH_RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)}
card=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo cpu)
exec > >(tee -a "$OUT/gpu_log_$card.txt") 2>&1
echo "== $(date -u +%FT%TZ) on $card, commit ${IJEPA_FAST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}, run $BENCH_RUN_ID"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
timeout 60 python -c "
import torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = 'not installed'
try:
    import torchao; ao = torchao.__version__
except ImportError:
    ao = 'not installed'
cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| Triton', tv, '| torchao', ao, '| capability', cap)"

search_pid=""
if [ "${SEARCH:-0}" = 1 ]; then
    SEARCH_MIN=${SEARCH_MIN:-3}
    echo "== digits recipe search (in the background, ${SEARCH_MIN} min of launches)"
    python benchmarks/search_quality.py --device cuda --parallel "${SEARCH_PARALLEL:-12}" \
        --launch-minutes "$SEARCH_MIN" --stop-minutes "$(python -c "print($SEARCH_MIN + 1.2)")" \
        --set model.layout=padded --set model.kernels=reference --set run.precision=fp32 \
        --workdir "${SEARCH_DIR:-/tmp/search}" --out "$OUT/search_$card.jsonl" --md "$OUT/search_$card.md" \
        > "$OUT/search_log_$card.txt" 2>&1 &
    search_pid=$!
fi

if stage checks; then
echo "== correctness on $card (kernels compiled for the card, the fused optimiser tail, attention backends, host syncs, token buckets, golden step; cap ${TESTS_S}s)"
timeout "$TESTS_S" python -m pytest tests/test_kernel*.py tests/test_fused_tail.py tests/test_varlen.py \
    tests/test_syncs.py tests/test_buckets.py tests/test_reference_golden.py \
    -q -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/gpu_tests_$card.txt"
fi
if [ -n "$search_pid" ]; then
    wait "$search_pid"
    tail -25 "$OUT/search_log_$card.txt"
fi

if stage kernels; then
echo "== kernels (cap ${KERNELS_S}s)"
timeout "$KERNELS_S" python benchmarks/bench_kernels.py --out "$OUT/kernels_$card.jsonl" --md "$OUT/kernels_$card.md"
fi

if stage step; then
echo "== training step at equal work: the released step fed our reference-mode masks, ours at reference and default masks"
refs=released
[ "$FULL" = 1 ] && refs=released,compiled
for item in ${MODELS//,/ }; do
    variants=$refs
    case $item in vit_huge*|vit_giant*) variants=released ;; esac  # compiling the released ViT-H/g step costs minutes
    cap=$(step_cap "$item")
    echo "-- $item (cap ${cap}s)"
    timeout "$cap" python benchmarks/bench_step.py --models "$item" --masks reference,default --paths fast \
        --steps "$STEPS" --warmup "$WARMUP" --reference --reference-variants "$variants" --out "$OUT/step_$card.jsonl"
done
fi

if stage variants; then
echo "== ViT-H/14 b128 at reference masks (equal work): the fused optimiser tail, token buckets, activation checkpointing (cap ${VARIANTS_S}s)"
timeout "$VARIANTS_S" python benchmarks/bench_step.py --models vit_huge:14:128 --masks reference --paths fast \
    --perf optimizer=fused_tail --perf optimizer=fused_tail,token_buckets=4 \
    --perf optimizer=fused_tail,activation_checkpointing=selective,selective_blocks=predictor \
    --perf optimizer=fused_tail,activation_checkpointing=full \
    --steps "$STEPS" --warmup "$WARMUP" --out "$OUT/step_$card.jsonl"
fi

if stage fp8; then
echo "== FP8 step rows (torchao float8 on the encoders' linear layers; cap ${FP8_S}s each)"
fp8_runs="vit_huge:14:128@reference@fp8"
[ "$FULL" = 1 ] && fp8_runs="vit_huge:14:128@reference,default@fp8,fp8-tensorwise vit_base:16:256@reference@fp8,fp8-tensorwise"
for run in $fp8_runs; do
    IFS=@ read -r item masks paths <<< "$run"
    case ",$MODELS," in *",$item,"*) ;; *) continue ;; esac
    timeout "$FP8_S" python benchmarks/bench_step.py --models "$item" --masks "$masks" --paths "$paths" \
        --steps "$STEPS" --warmup "$WARMUP" --out "$OUT/step_$card.jsonl"
done
fi
if stage report; then
python benchmarks/bench_step.py --report "$OUT/step_$card.jsonl" --md "$OUT/step_$card.md" \
    && sed -n '/^## Goals/,$p' "$OUT/step_$card.md"
fi

if [ "$QUALITY" = 1 ]; then
    echo "== FP8 quality gate: digits, stable recipe, bf16 then FP8 rowwise (cap ${QUALITY_S}s)"
    timeout "$QUALITY_S" python benchmarks/fp8_quality.py --device cuda --fp8 rowwise \
        --out "$OUT/fp8_quality_$card.jsonl" --md "$OUT/fp8_quality_$card.md"
fi

if stage profile; then
    echo "== profile of the ViT-H/14 step (cap ${PROFILE_S}s)"
    timeout "$PROFILE_S" python benchmarks/profile_step.py --model vit_huge --patch 14 --batch 128 --masks reference \
        --out "$OUT/profile_$card.jsonl" --md "$OUT/profile_$card.md"
fi

if [ "${EXTRA:-0}" = 1 ]; then
    echo "== data and masks"
    python benchmarks/bench_data.py --images 512 --batch 128 --workers 8 --out "$OUT/data_$card.jsonl" \
        --md "$OUT/data_$card.md"
    python benchmarks/bench_masks.py --out "$OUT/masks_$card.jsonl" --md "$OUT/masks_$card.md"
fi
echo "== done $(date -u +%FT%TZ)"
