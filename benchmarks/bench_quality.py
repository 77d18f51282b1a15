"""Representation quality on real data with no download: I-JEPA on scikit-learn's digits.

    python benchmarks/bench_quality.py [--recipes published,stable] [--splits 0,1,2] [--threads 2]
                                       [--out F.jsonl] [--md F.md] [--plot F.png] [--workdir DIR]

Each split puts 1,200 of the 1,797 digits (upsampled to 32 px) in a training set and 597 in a
test set. On the training images (labels unused) a ViT (patch 4, width 192, depth 6, 3 heads;
predictor 96 x 4; batch 128 unless the recipe sets another) is pretrained with each recipe,
watched by the collapse monitor;
then a linear probe (learning rate chosen on held-out training images) is fitted on the frozen,
average-pooled features of the training images and scored on the test images, for the target
encoder, the context encoder, the same encoder at its random initialisation, and the raw pixels.
Reported: linear and 10-nearest-neighbour top-1 per split and the mean and spread over splits, each
encoder's per-dimension std and effective rank (RankMe, and the rank of the centred features) at
the end, and a plot of loss, spread and rank over the steps. A finished run in --workdir is not
trained again, only probed.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import ROOT, emit, environment, write_markdown

BASE = ["model.name=custom", "model.embed_dim=192", "model.depth=6", "model.num_heads=3", "model.patch_size=4",
        "model.pred_dim=96", "model.pred_depth=4", "data.source=digits", "data.demo_size=32", "data.crop_size=32",
        "data.batch_size=128", "data.num_workers=0", "mask.min_keep=4", "mask.sampler=python",
        "run.progress=false", "run.plot=false", "run.log_every=9", "run.monitor_every=18", "run.monitor_images=512",
        "run.checkpoint_every=0", "run.keep_every_epochs=0"]

RECIPES = {
    # the published ViT-H/14 recipe, scaled to this run: lr 2e-4 -> 1e-3 -> 1e-6, EMA 0.996 -> 1
    "published": ["optim.epochs=60", "optim.warmup=5", "optim.start_lr=2e-4", "optim.lr=1e-3", "optim.final_lr=1e-6",
                  "optim.ema=[0.996, 1.0]", "mask.mode=reference"],
    # the recipe that does not collapse here (how it was found: benchmarks/results/quality_digits_search.md):
    # the published learning rates with a slower EMA (0.998 -> 1), whole contexts, batch 32 (four times
    # the steps of batch 128), half the epochs
    "stable": ["optim.epochs=30", "optim.warmup=5", "optim.start_lr=2e-4", "optim.lr=1e-3", "optim.final_lr=1e-6",
               "optim.ema=[0.998, 1.0]", "mask.mode=default", "data.batch_size=32"],
}


def split(seed: int, n: int = 1797, train: int = 1200):
    import torch

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:train], perm[train:]


def tensors(images_u8):
    """uint8 [N, 3, 32, 32] -> normalised float (the training normalisation, no crop)."""
    import torch

    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    return (images_u8.float() / 255 - mean) / std


def features(encoder, x):
    import torch

    from ijepa_fast.eval import encode

    with torch.no_grad():
        return torch.cat([encode(encoder.eval(), chunk)[0] for chunk in x.split(256)])


def probe(train_f, train_y, test_f, test_y):
    from ijepa_fast.eval import linear_probe

    return linear_probe(train_f, train_y, test_f, test_y, epochs=100)["top1"]


def run_recipe(name, overrides, seed, workdir, images, labels, threads, device="cpu",
               probes=("target", "context", "random", "pixels")):
    import torch

    from ijepa_fast.checkpoint.format import models_from_checkpoint
    from ijepa_fast.config import load_config
    from ijepa_fast.data.digits import DigitsImages
    from ijepa_fast.eval import collapse_stats, effective_rank, knn_probe
    from ijepa_fast.model import IJEPA
    from ijepa_fast.runlog.output import read_metrics
    from ijepa_fast.training.trainer import Trainer

    tr, te = split(seed)
    run_dir = Path(workdir) / f"{name}-split{seed}"
    cfg = load_config(None, BASE + overrides + [f"run.seed={seed}", f"run.dir={run_dir}", f"run.threads={threads}",
                                                  f"run.device={device}"])
    Trainer(cfg, name, source=DigitsImages(32, indices=tr)).run()  # resumes (or skips) a finished run
    enc, _, tgt = models_from_checkpoint(run_dir / f"{cfg.run.tag}-latest.pth.tar", num_heads=3)
    torch.manual_seed(seed)
    random_init = IJEPA.from_config(cfg).target_encoder  # the same initialisation as the run's
    x = tensors(images)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    prev, ms = 0, 0.0
    for r in metrics:  # the pretraining's own time, from the logged step times
        ms, prev = ms + r["step_ms"] * (r["step"] - prev), r["step"]
    out = {"recipe": name, "split": seed, "pretrain_minutes": round(ms / 60000, 1), "steps": metrics[-1]["step"]}
    for label, model in (("target", tgt), ("context", enc), ("random", random_init)):
        if label not in probes:
            continue
        f = features(model, x)
        out[f"probe_{label}"] = probe(f[tr], labels[tr], f[te], labels[te])
        out[f"knn_{label}"] = knn_probe(f[tr], labels[tr], f[te], labels[te], k=10)["top1"]
        stats = collapse_stats(f[te])
        out[f"{label}_std"], out[f"{label}_rank"] = round(stats["std_mean"], 4), round(stats["rank"], 2)
        out[f"{label}_rank_centred"] = round(effective_rank(f[te] - f[te].mean(0)), 2)
    if "pixels" in probes:
        out["probe_pixels"] = probe(x.flatten(1)[tr], labels[tr], x.flatten(1)[te], labels[te])
    out["curve"] = [{k: r.get(k) for k in ("step", "loss", "feat_std", "feat_rank")} for r in metrics]
    return out


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=110)
    colours = {"published": "#c33", "stable": "#136"}
    for r in rows:
        c = [p for p in r["curve"] if p.get("feat_std") is not None]
        kw = dict(color=colours.get(r["recipe"], None), alpha=0.8, lw=1.2, label=f"{r['recipe']} (split {r['split']})")
        axes[0].plot([p["step"] for p in r["curve"]], [p["loss"] for p in r["curve"]], **kw)
        axes[1].plot([p["step"] for p in c], [p["feat_std"] for p in c], **kw)
        axes[2].plot([p["step"] for p in c], [p["feat_rank"] for p in c], **kw)
    for ax, title in zip(axes, ("loss", "target features: mean per-dimension std", "target features: effective rank")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="published,stable")
    p.add_argument("--splits", default="0,1,2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=str(ROOT / "runs" / "quality"))
    p.add_argument("--device", default="cpu", help="where to pretrain (probes run on the CPU)")
    p.add_argument("--probe", default="target,context,random,pixels", help="which features to probe")
    p.add_argument("--set", action="append", default=[], help="extra override for every recipe (key=value)")
    p.add_argument("--out")
    p.add_argument("--md")
    p.add_argument("--plot")
    args = p.parse_args()
    from ijepa_fast.data.digits import load_digits_tensor

    images, labels = load_digits_tensor(32)
    env = environment(args.device)
    rows = []
    for name in args.recipes.split(","):
        for seed in (int(s) for s in args.splits.split(",")):
            row = {**run_recipe(name, RECIPES[name] + args.set, seed, args.workdir, images, labels, args.threads,
                                  args.device, args.probe.split(",")),
                   **env}
            rows.append(row)
            emit({k: v for k, v in row.items() if k != "curve"}, args.out)
    summary = []
    for name in args.recipes.split(","):
        rs = [r for r in rows if r["recipe"] == name]
        s = {"recipe": name, "splits": len(rs), **env}
        for k in ("probe_target", "probe_context", "probe_random", "probe_pixels", "knn_target", "knn_random",
                  "target_std", "random_std", "target_rank", "target_rank_centred", "random_rank_centred",
                  "pretrain_minutes"):
            vals = [r[k] for r in rs if k in r]
            if not vals:
                continue
            d = 4 if k.endswith("_std") else 2
            s[k] = f"{statistics.mean(vals):.{d}f} ± {statistics.pstdev(vals):.{d}f}"
        summary.append(s)
        print(json.dumps(s))
    if args.plot:
        plot(rows, args.plot)
    if args.md:
        write_markdown(args.md, "Representation quality: I-JEPA on scikit-learn's digits",
                       f"python benchmarks/bench_quality.py --recipes {args.recipes} --splits {args.splits}", summary,
                       [("recipe", "recipe"), ("probe_target", "linear probe, target encoder (%)"),
                        ("probe_context", "context encoder (%)"), ("probe_random", "random encoder (%)"),
                        ("probe_pixels", "raw pixels (%)"), ("knn_target", "kNN target (%)"),
                        ("knn_random", "kNN random (%)"), ("target_std", "target per-dim std"),
                        ("random_std", "random per-dim std"), ("target_rank", "target RankMe"),
                        ("target_rank_centred", "target rank, centred"),
                        ("random_rank_centred", "random rank, centred"),
                        ("pretrain_minutes", "pretraining minutes")],
                       "Mean ± spread over the splits. Pretraining minutes add up the logged step times (runs that "
                       "share the cores take longer). Recipes: " + "; ".join(
                           f"`{k}`: {' '.join(v)}" for k, v in RECIPES.items() if k in args.recipes.split(",")))


if __name__ == "__main__":
    main()
