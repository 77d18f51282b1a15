"""Token buckets' padding and shape count, and activations kept per block, by computation (CPU).

    python benchmarks/bench_shapes.py [--batches 200 --batch 128 --img 224 --patch 14] [--memory]

Buckets: for reference and default masks, the padded and the packed layout, and each
``perf.token_buckets`` setting, the mean fraction of the blocks' token rows (encoder and
predictor) that are padding, and how many distinct block shapes the batches give (one compiled
graph each with static shapes). ``--memory``: the bytes each encoder / predictor block keeps for
its backward pass per token (measured on one block at full width in bf16, ``saved_memory``), and
the resulting estimate for the whole step's kept activations at ViT-H/14 (an estimate, not a
measurement of a GPU run: non-block tensors and the allocator's slack are not counted).
"""
from __future__ import annotations

import argparse

from common import emit


def buckets_table(args) -> None:
    from ijepa_fast.config import MaskConfig
    from ijepa_fast.masks import MultiBlockSampler
    from ijepa_fast.perf.buckets import apply, padding_fraction, shape_key
    from ijepa_fast.perf.packing import pack

    grid = (args.img // args.patch,) * 2
    for mode in ("reference", "default"):
        sampler = MultiBlockSampler(grid, MaskConfig(mode=mode), seed=0)
        batches = [sampler.sample(args.batch, step) for step in range(args.batches)]
        for layout in ("padded", "packed"):
            for po in (0, 2, 4, 8):
                prepared = [apply(pack(m) if layout == "packed" else m, po) for m in batches]
                fr = [padding_fraction(m, p) for m, p in zip(batches, prepared)]
                emit({"masks": mode, "layout": layout, "token_buckets": po, "batch": args.batch,
                      "padding_fraction": round(sum(fr) / len(fr), 4), "max_padding_fraction": round(max(fr), 4),
                      "block_shapes": len({shape_key(p) for p in prepared})})


def memory_table(args) -> None:
    from ijepa_fast.bench.saved_memory import per_token_bytes
    from ijepa_fast.config import MaskConfig
    from ijepa_fast.masks import MultiBlockSampler
    from ijepa_fast.models.vit import VIT_SIZES

    enc = VIT_SIZES[args.model]
    grid = (args.img // args.patch,) * 2
    sampler = MultiBlockSampler(grid, MaskConfig(), seed=0)
    ctx = tgt = 0.0
    for step in range(8):
        c, t = sampler.sample(args.batch, step).mean_tokens()
        ctx, tgt = ctx + c / 8, tgt + t / 8
    tokens_enc = args.batch * ctx  # packed context tokens
    tokens_pred = args.batch * (4 * ctx + tgt)  # one packed sequence per (image, target block)
    gib = 2 ** 30
    for mode in (False, "selective", "full"):
        e = per_token_bytes(enc.dim, enc.heads, enc.mlp_ratio, mode)
        p = per_token_bytes(args.pred_dim, enc.heads, 4.0, mode)
        total = (e * tokens_enc * enc.depth + p * tokens_pred * args.pred_depth) / gib
        emit({"model": f"{args.model}/{args.patch}", "batch": args.batch, "checkpointing": mode or "none",
              "encoder_block_bytes_per_token": round(e), "predictor_block_bytes_per_token": round(p),
              "encoder_block_GiB": round(e * tokens_enc / gib, 3),
              "predictor_block_GiB": round(p * tokens_pred / gib, 3),
              "kept_activations_GiB_estimate": round(total, 2), "context_tokens_per_image": round(ctx, 1)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--model", default="vit_huge")
    ap.add_argument("--pred-dim", type=int, default=384)
    ap.add_argument("--pred-depth", type=int, default=12)
    ap.add_argument("--memory", action="store_true", help="also the kept-activation estimate")
    args = ap.parse_args()
    buckets_table(args)
    if args.memory:
        memory_table(args)


if __name__ == "__main__":
    main()
