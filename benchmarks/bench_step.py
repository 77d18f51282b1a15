"""The training step on one GPU, beside the released step at equal work.

    python benchmarks/bench_step.py [--models vit_huge:14:128,vit_base:16:256,vit_large:16:128,vit_giant:16:16]
                                    [--masks reference,default] [--paths fast,fp8] [--steps 10] [--warmup 3]
                                    [--reference] [--out F.jsonl] [--md F.md]
    python benchmarks/bench_step.py --report F.jsonl [G.jsonl ...] --md F.md   # the page from rows measured

One JSON object per line (see ijepa_fast/bench/step.py for every field): images/s, tokens/s, model
TFLOP/s and MFU against the bf16 matmul peak measured in the same run and against the card's spec
peak, peak memory, projected GPU-hours for the published recipes of that model. ``--paths``:
``plain`` (the reference-equivalent step, ``perf.preset=plain``), ``fast`` (the perf defaults, bf16 on
CUDA), ``fp8`` / ``fp8-rowwise`` / ``fp8-tensorwise`` (the defaults with FP8 encoder linear layers).
The first row of each model and mask mode is always the step ``ijepa-fast train`` runs with the
recipe as shipped (``"perf": "defaults"``, the resolved switches in ``perf_resolved``); the other
paths and the ``--perf`` variants are extra rows. With ``--reference`` and the
released implementation in .bench_ref (shared/anchors/README.md), the released step is timed in
the same run, fed ijepa-fast's reference-mode masks at the same seed, warm-up and steps
(``benchmarks/reference_equal_work.py``), so that it and our reference-mask rows process the same
tokens; ``--reference-masks own`` lets it draw its own. The markdown page (``ijepa_fast.bench.report``)
has the table, the throughput goals (met / not met / not measured) and the GPU-hours per recipe;
rows are grouped by ``run_id`` ($BENCH_RUN_ID, or one per process) and a page shows one run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from common import ROOT, emit, environment

from ijepa_fast.bench.suite import released_step

RUN_ID = os.environ.get("BENCH_RUN_ID") or time.strftime("%Y%m%dT%H%M%S")


def reference_rows(model, patch, batch, *, steps, warmup, out, env, variants=("released",), masks="ours",
                   pred_depth=12, img=224, device="cuda"):
    """The released step's rows, timed in a subprocess at the same predictor depth, resolution and
    masks as ours (equal work); none, saying so, without .bench_ref/."""
    if not (ROOT / ".bench_ref" / "reference_step.py").exists():
        print("no .bench_ref/reference_step.py: skipping the released step", file=sys.stderr)
        return []
    rows = []
    for variant in variants:
        extra = {"released": (), "compiled": ("--sdpa", "--compile")}[variant] + (("--own-masks",) if masks == "own"
                                                                                  else ())
        got, p = released_step(model, patch, batch, steps=steps, warmup=warmup, pred_depth=pred_depth, img=img,
                               device=device, extra=extra, root=ROOT)
        for r in got:
            r.update(env)
            rows.append(r)
            emit(r, out)
        if p.returncode:
            print(p.stderr[-2000:], file=sys.stderr)
    return rows


def newest_run(path) -> list[dict]:
    """The rows of the newest run (``run_id``) in a JSON-lines file (every row where none has one)."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    run = [r for r in rows if r.get("run_id")]
    latest = run[-1]["run_id"] if run else None
    return [r for r in rows if r.get("run_id") == latest] if latest else rows


def report(paths, md, command):
    """Write the page from the newest run's rows of each JSON-lines file, merged (two commands of
    one GPU window, each with its own file, make one page)."""
    from ijepa_fast.bench.report import step_report

    rows = [r for path in paths for r in newest_run(path)]
    peaks = [r["tflops_bf16_8192"] for r in rows if r.get("bench") == "matmul_peak"]
    text = step_report([r for r in rows if r.get("bench") == "step"],
                       [r for r in rows if r.get("bench") == "reference_step"], command=command,
                       peak=peaks[0] if len(set(peaks)) == 1 else None)
    if len(set(peaks)) > 1:
        text = text.replace("matmul peak measured in the same run", "matmul peak measured in the same run "
                            f"(each process its own; {min(peaks):.0f}-{max(peaks):.0f} TFLOP/s)", 1)
    open(md, "w").write(text)


def parse_variant(text: str) -> dict:
    """'optimizer=fused_tail,token_buckets=4' -> {'optimizer': 'fused_tail', 'token_buckets': '4'}
    (values are typed and checked by the config when the step is built)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--perf {text!r}: expected KEY=VALUE items separated by commas")
        out[key.strip().removeprefix("perf.")] = value.strip()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit_huge:14:128,vit_base:16:256,vit_large:16:128,vit_giant:16:16")
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--masks", default="reference,default")
    p.add_argument("--paths", default="fast", help="comma list of plain, fast, fp8 (= fp8-rowwise), fp8-tensorwise")
    p.add_argument("--perf", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="a variant of the fast path with these perf.* settings (repeat for several variants), "
                        "e.g. --perf optimizer=fused_tail --perf activation_checkpointing=selective,"
                        "selective_blocks=predictor")
    p.add_argument("--device", default="cuda")
    p.add_argument("--reference", action="store_true", help="also time the released step (needs .bench_ref)")
    p.add_argument("--reference-variants", default="released",
                   help="released (as shipped) and/or compiled (with sdpa + per-block compile)")
    p.add_argument("--reference-masks", default="ours", choices=("ours", "own"),
                   help="feed the released step our reference-mode masks (equal work) or let it draw its own")
    p.add_argument("--report", nargs="+", metavar="ROWS", help="only write --md from the newest run in each of "
                   "these JSON-lines files, merged")
    p.add_argument("--pred-depth", type=int, help="predictor depth of ours and of the released step "
                   "(default: the published recipe's, 16 for vit_giant, else 12)")
    p.add_argument("--out")
    p.add_argument("--md")
    args = p.parse_args()
    command = "python benchmarks/bench_step.py " + " ".join(sys.argv[1:])
    if args.report:
        report(args.report, args.md, command)
        return

    import torch

    from ijepa_fast.bench.step import BenchSpec, matmul_peak_tflops, run

    device = torch.device(args.device)
    env = {**environment(args.device), "run_id": RUN_ID}
    peak = matmul_peak_tflops(device)
    if peak:
        emit({"bench": "matmul_peak", "tflops_bf16_8192": round(peak, 1), **env}, args.out)
    variants = [parse_variant(v) for v in args.perf]
    # the first row of each setting is the user's step: what `ijepa-fast train` runs with the recipe as
    # shipped ("perf": "defaults", every switch resolved for the device); paths and variants follow
    runs = [("fast", {})] + [(p_, v) for p_ in args.paths.split(",") for v in (variants or [{}])
                             if (p_ != "plain" or not v) and (p_, v) != ("fast", {})]
    rows = []
    for item in args.models.split(","):
        model, patch, batch = item.split(":")
        pred_depth = args.pred_depth or (16 if model == "vit_giant" else 12)
        if args.reference:  # the same predictor depth and resolution as ours: equal work
            rows += reference_rows(model, patch, batch, steps=args.steps, warmup=args.warmup, out=args.out, env=env,
                                   variants=args.reference_variants.split(","), masks=args.reference_masks,
                                   pred_depth=pred_depth, img=args.img, device=args.device)
        for mode in args.masks.split(","):
            for path, variant in runs:
                fp8 = {"fp8": "rowwise", "fp8-rowwise": "rowwise", "fp8-tensorwise": "tensorwise"}.get(path)
                spec = BenchSpec(model=model, patch=int(patch), img=args.img, batch=int(batch), pred_depth=pred_depth,
                                 mask_mode=mode, fast=path != "plain", fp8=fp8, perf=variant, steps=args.steps,
                                 warmup=args.warmup, device=args.device)
                try:
                    row = {**run(spec, peak), **env}
                except torch.cuda.OutOfMemoryError:
                    row = {"bench": "step", "model": model, "patch": int(patch), "batch": int(batch), "masks": mode,
                           "fast": path != "plain", "fp8": fp8, "perf": [f"{k}={v}" for k, v in variant.items()],
                           "error": "out of memory", **env}
                    torch.cuda.empty_cache()
                rows.append(row)
                emit(row, args.out)
    if args.md and rows:
        from ijepa_fast.bench.report import step_report

        with open(args.md, "w") as f:
            f.write(step_report([r for r in rows if r["bench"] == "step"],
                                [r for r in rows if r["bench"] == "reference_step"],
                                command=command, peak=peak))


if __name__ == "__main__":
    main()
