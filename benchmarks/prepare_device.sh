#!/usr/bin/env bash
# Before a GPU window, on the CPU machine: everything the GPU machine lacks, in git-ignored folders that
# the device run carries, then the exact carry list and command.
#   1. the released code in .bench_ref/ (reference_step.py + .ref/src, .ref/configs; see
#      shared/anchors/README.md): checked, never downloaded here, never committed;
#   2. the torchao wheel for the GPU image's Python 3.12 in .whl/ (the GPU machine has no network);
#   3. the golden files in .golden/ ($GOLDEN_SRC, else the first of tests/golden/, $IJEPA_REFERENCE_DIR,
#      ../shared/golden and ../../shared/golden that holds them).
# Exits 1, saying what is missing, when something could not be prepared.
#
#   bash benchmarks/prepare_device.sh
set -uo pipefail
cd "$(dirname "$0")/.."
missing=0
say() { echo "prepare_device: $*"; }

if [ -f .bench_ref/reference_step.py ] && [ -d .bench_ref/.ref/src/models ] && [ -d .bench_ref/.ref/configs ]; then
    say "released code: .bench_ref/ ok ($(find .bench_ref -name '*.py' | wc -l) Python files)"
else
    say "released code missing: put the anchors' reference_step.py in .bench_ref/ and the released repository's" \
        "src/ and configs/ in .bench_ref/.ref/ (shared/anchors/README.md); the released step is skipped without it"
    missing=1
fi

mkdir -p .whl
if ls .whl/torchao-0.18.*.whl >/dev/null 2>&1; then
    say "torchao wheel: $(ls .whl/torchao-0.18.*.whl)"
else
    python3 -m pip download -q "torchao==0.18.*" --python-version 3.12 --only-binary=:all: --no-deps -d .whl \
        && say "torchao wheel: $(ls .whl/torchao-0.18.*.whl)" || { say "could not download the torchao wheel"; missing=1; }
fi
wheels=$(ls .whl/*.whl 2>/dev/null | wc -l)
[ "$wheels" -le 1 ] || say "note: $wheels wheels in .whl/; keep one version of each package"

src=${GOLDEN_SRC:-}
if [ -z "$src" ]; then  # the first folder holding them: tests/golden, $IJEPA_REFERENCE_DIR, a shared/golden above
    for d in tests/golden "${IJEPA_REFERENCE_DIR:-}" ../shared/golden ../../shared/golden; do
        if [ -n "$d" ] && ls "$d"/ref_step_*.pt >/dev/null 2>&1; then src=$d; break; fi
    done
fi
src=${src:-tests/golden}
if ls "$src"/ref_step_*.pt "$src"/ref_traj_*.pt >/dev/null 2>&1; then
    mkdir -p .golden && cp "$src"/ref_*.pt "$src"/ref_*.pth.tar .golden/ \
        && say "golden files: $(ls .golden | wc -l) files from $src into .golden/"
else
    say "no golden files in $src (set GOLDEN_SRC): the GPU tests would fail their golden check"
    missing=1
fi

size=$(du -scm .bench_ref .whl .golden 2>/dev/null | tail -1 | cut -f1)
say "carried folders: ${size} MiB (the working tree and these must stay under 64 MiB)"
echo
echo "carry: [\".bench_ref\", \".whl\", \".golden\"]"
echo "command (main window, under 8 minutes): bash benchmarks/run_gpu.sh"
echo "command (extras, optional):             bash benchmarks/run_gpu.sh --extras"
echo "afterwards, here: python benchmarks/bench_step.py --report <main>/rows.jsonl [<extras>/rows.jsonl] --md page.md"
exit $missing
