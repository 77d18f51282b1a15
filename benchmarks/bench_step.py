"""The training step on one GPU: every published model size, both mask modes, fast paths on and off.

    python benchmarks/bench_step.py [--models vit_base:16:256,vit_large:16:128,vit_huge:14:128,vit_giant:16:16]
                                    [--steps 10] [--reference] [--out F.jsonl] [--md F.md]

One JSON object per line (see ijepa_fast/bench.py for every field): images/s, tokens/s, model
TFLOP/s and MFU against the bf16 matmul peak measured in the same run, peak memory, projected
GPU-hours for the published recipes of that model, the layout and attention used. With
``--reference`` and the reference implementation unpacked in .bench_ref/.ref (see
shared/anchors/README.md), the released step is timed in the same run for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from common import ROOT, emit, environment, write_markdown


def reference_rows(model, patch, batch, steps, out, variants=("released", "compiled")):
    script = ROOT / ".bench_ref" / "reference_step.py"
    if not script.exists():
        print(f"no {script}: skipping the reference step", file=sys.stderr)
        return []
    rows = []
    for extra in [{"released": [], "compiled": ["--sdpa", "--compile"]}[v] for v in variants]:
        cmd = [sys.executable, str(script), "--model", model, "--patch", str(patch), "--batch", str(batch),
               "--steps", str(steps)] + extra
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OUT": ""})
        for line in p.stdout.splitlines():
            if line.startswith("{") and '"official_train_step"' in line:
                r = json.loads(line)
                r["bench"] = "reference_step"
                r["variant"] = "released" if not extra else "released + sdpa + compile"
                rows.append(r)
                emit(r, out)
        if p.returncode:
            print(p.stderr[-2000:], file=sys.stderr)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit_base:16:256,vit_large:16:128,vit_huge:14:128,vit_giant:16:16")
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--masks", default="reference,default")
    p.add_argument("--paths", default="plain,fast")
    p.add_argument("--device", default="cuda")
    p.add_argument("--reference", action="store_true", help="also time the released step (needs .bench_ref)")
    p.add_argument("--reference-variants", default="released,compiled",
                   help="which released steps: as shipped, and with sdpa + per-block compile")
    p.add_argument("--out")
    p.add_argument("--md")
    args = p.parse_args()

    import torch

    from ijepa_fast.bench import BenchSpec, matmul_peak_tflops, run

    device = torch.device(args.device)
    env = environment(args.device)
    peak = matmul_peak_tflops(device)
    if peak:
        emit({"bench": "matmul_peak", "tflops_bf16_8192": round(peak, 1), **env}, args.out)
    rows, refs = [], []
    for item in args.models.split(","):
        model, patch, batch = item.split(":")
        pred_depth = 16 if model == "vit_giant" else 12
        if args.reference:
            refs += reference_rows(model, patch, batch, args.steps, args.out, args.reference_variants.split(","))
        for mode in args.masks.split(","):
            for path in args.paths.split(","):
                spec = BenchSpec(model=model, patch=int(patch), img=args.img, batch=int(batch), pred_depth=pred_depth,
                                 mask_mode=mode, fast=path == "fast", steps=args.steps, warmup=args.warmup,
                                 device=args.device)
                try:
                    row = {**run(spec, peak), **env}
                except torch.cuda.OutOfMemoryError:
                    row = {"bench": "step", "model": model, "batch": int(batch), "masks": mode,
                           "fast": path == "fast", "error": "out of memory", **env}
                    torch.cuda.empty_cache()
                rows.append(row)
                emit(row, args.out)
    if args.md and rows:
        cols = [("model", "model"), ("batch", "batch"), ("masks", "masks"), ("fast", "fast paths"),
                ("layout", "layout"), ("step_ms", "step ms"), ("images_per_s", "images/s"),
                ("ctx_tokens_per_s", "context tokens/s"), ("tflops", "model TFLOP/s"), ("mfu", "MFU"),
                ("peak_mem_gib", "peak GiB"), ("gpu_hours", "GPU-hours (recipe)")]
        notes = f"bf16 matmul peak measured in the same run: {peak:.0f} TFLOP/s." if peak else ""
        for r in refs:
            notes += (f"\n\nReleased step, same run ({r['variant']}): {r['model']} batch {r['batch']}: "
                      f"{r['step_ms']} ms, {r['img_per_s']} images/s, {r['peak_mem_gib']} GiB.")
        write_markdown(args.md, "The training step", "python benchmarks/bench_step.py", rows, cols, notes)


if __name__ == "__main__":
    main()
