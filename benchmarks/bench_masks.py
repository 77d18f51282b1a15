"""Milliseconds per batch of each multi-block mask sampler, on one CPU core.

    python benchmarks/bench_masks.py [--batch 128 --img 224 --patch 14 --repeats 100] [--out FILE]

One JSON object per line: each mode of each sampler implementation present, and, where the
reference implementation is unpacked in .bench_ref/.ref (see shared/anchors), its collator on the
same machine for comparison.
"""
from __future__ import annotations

import argparse
import sys

from common import ROOT, emit, environment, summary, time_host, write_markdown


def bench_ours(args, env, rows):
    import torch

    from ijepa_fast.config import MaskConfig
    from ijepa_fast.masks import MultiBlockSampler, native

    impls = ["python"] + (["cpp"] if native.load() is not None else [])  # identical masks, two implementations
    for impl in impls:
        for mode in ("reference", "default"):
            sampler = MultiBlockSampler((args.img // args.patch,) * 2, MaskConfig(mode=mode), seed=0, impl=impl)
            ms = time_host(lambda: sampler(args.batch), args.repeats)
            ctx = tgt = 0.0
            n = args.stat_batches
            for step in range(n):
                c, t = sampler.sample(args.batch, step).mean_tokens()
                ctx, tgt = ctx + c / n, tgt + t / n
            rows.append({"bench": "masks", "impl": impl, "mode": mode, "batch": args.batch, "img": args.img,
                         "patch": args.patch, "threads": torch.get_num_threads(), **summary(ms),
                         "mean_ctx_tokens": round(ctx, 2), "mean_tgt_tokens": round(tgt, 2), **env})
            emit(rows[-1], args.out)


def bench_reference(args, env, rows):
    ref = ROOT / ".bench_ref" / ".ref"
    if not (ref / "src" / "masks" / "multiblock.py").exists():
        return
    import logging

    import torch

    sys.path.insert(0, str(ref))
    from src.masks.multiblock import MaskCollator  # the reference implementation, never committed

    logging.disable(logging.WARNING)
    coll = MaskCollator(input_size=(args.img, args.img), patch_size=args.patch, pred_mask_scale=(0.15, 0.2),
                        enc_mask_scale=(0.85, 1.0), aspect_ratio=(0.75, 1.5), nenc=1, npred=4, allow_overlap=False,
                        min_keep=10)
    batch = [torch.zeros(1)] * args.batch
    ms = time_host(lambda: coll(batch), max(10, args.repeats // 5))
    rows.append({"bench": "masks", "impl": "reference_collator", "mode": "reference", "batch": args.batch,
                 "img": args.img, "patch": args.patch, "threads": torch.get_num_threads(), **summary(ms), **env})
    emit(rows[-1], args.out)


NOTES = ("One thread. `reference_collator` is the released implementation's collator, timed on the same machine in "
         "the same run when it is unpacked in .bench_ref/.ref (it is not part of this repository). Token counts are "
         "means per image over the batches of the first `--stat-batches` steps (1000): after truncation to the "
         "batch minimum (reference mode), or whole (default mode); the released sampler keeps 68.7 and 176.8.")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--stat-batches", type=int, default=1000, help="batches averaged for the token counts")
    p.add_argument("--out", help="also append the JSON lines to this file")
    p.add_argument("--md", help="also write a Markdown table to this file")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)  # one core, as the goal is stated
    env = environment("cpu")
    rows = []
    bench_ours(args, env, rows)
    bench_reference(args, env, rows)
    if args.md:
        write_markdown(args.md, "Mask samplers: milliseconds per batch on one CPU core",
                       f"python benchmarks/bench_masks.py --batch {args.batch} --img {args.img} --patch {args.patch}",
                       rows, [("impl", "sampler"), ("mode", "mode"), ("median_ms", "median ms"), ("p10_ms", "p10"),
                              ("p90_ms", "p90"), ("mean_ctx_tokens", "context tokens / image"),
                              ("mean_tgt_tokens", "target tokens / image")], NOTES)


if __name__ == "__main__":
    main()
