#!/usr/bin/env bash
# The GPU window in one command, under 8 minutes on an H200 (benchmarks/gpu_window.py says what it runs):
# the GPU tests (kernels, the fused tail against torch's AdamW + EMA, FP8, the golden step and trajectory on
# CUDA), ViT-H/14 b128 and ViT-B/16 b256 beside the released step at reference masks (as shipped, best
# variant, memory variant, FP8), and a profile of the 0-sync step. Prepare first, on the CPU machine:
# benchmarks/prepare_device.sh (the released code, the torchao wheel, the golden files; it prints the carry
# list). Rows go to $OUT/rows.jsonl as measured, the log to $OUT/log.txt, the tests' output to
# $OUT/gpu_tests.txt, the profile to $OUT/profile.{jsonl,md}: at most 8 files.
#
#   bash benchmarks/run_gpu.sh                 # the main window
#   bash benchmarks/run_gpu.sh --extras        # the optional second command: ViT-L/16, ViT-g/16, FP8 quality gate
#   bash benchmarks/run_gpu.sh --rehearse      # every stage on the CPU with tiny models (no GPU needed)
#
# The page is made afterwards from the rows of one or both commands:
#   python benchmarks/bench_step.py --report A/rows.jsonl [B/rows.jsonl] --md benchmarks/results/step.md
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/window}
mkdir -p "$OUT"
PY=$(command -v python3 || command -v python)
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (torchao): into a folder of their own, first
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "the carried wheels did not install"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -z "${IJEPA_REFERENCE_DIR:-}" ]; then
    for d in tests/golden .golden; do
        if ls "$d"/ref_step_*.pt >/dev/null 2>&1; then export IJEPA_REFERENCE_DIR=$PWD/$d; break; fi
    done
fi
export IJEPA_FAST_NO_EXT=1 PYTHONUNBUFFERED=1  # the Python mask sampler: no extension compiled in a stage
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null \
    | tee "$OUT/log.txt"
"$PY" -c "
import torch
def v(name):
    try:
        return __import__(name).__version__
    except ImportError:
        return 'not installed'
print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| Triton', v('triton'), '| torchao', v('torchao'),
      '| golden', '${IJEPA_REFERENCE_DIR:-none}')" 2>&1 | grep -v Warning | tee -a "$OUT/log.txt"
timeout "${WINDOW_S:-480}" "$PY" benchmarks/gpu_window.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/log.txt"
