"""Pretrain a tiny I-JEPA on the generated demo images, export its target encoder to timm's layout,
and train a linear probe on timm's features: all on the CPU, nothing downloaded.

    python examples/export_timm_probe.py --steps 60 --out /tmp/ijepa_timm_probe

Needs timm (``pip install --no-deps timm`` beside a working torchvision); where timm cannot be
imported it exports to transformers' layout and probes ``IJepaModel`` instead (``--library hf``
chooses that directly).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ijepa_fast import train
from ijepa_fast.config import load_config
from ijepa_fast.data.demo import generate
from ijepa_fast.interop.export import export_encoder


def pretrain(out: Path, steps: int) -> Path:
    """A few steps of the CPU demo (a 4-block ViT on 32 px crops); returns the checkpoint."""
    cfg = load_config("demo_cpu", [f"run.max_steps={steps}", f"run.dir={out / 'run'}", "run.progress=false",
                                   "run.plot=false", "data.demo_images=512", "run.monitor_every=0"])
    return train(cfg, "demo") / "jepa-latest.pth.tar"


def timm_features(folder: Path):
    import timm  # the folder's config.json holds the architecture and every constructor argument

    cfg = json.loads((folder / "config.json").read_text())
    model = timm.create_model(cfg["architecture"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors")), **cfg["model_args"])
    return lambda x: model.eval()(x), cfg["pretrained_cfg"]  # global_pool='avg', no head: pooled features


def hf_features(folder: Path):
    from transformers import IJepaModel

    model = IJepaModel.from_pretrained(folder).eval()
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    return (lambda x: model(pixel_values=x).last_hidden_state.mean(1)), {"mean": pre["image_mean"],
                                                                          "std": pre["image_std"]}


@torch.no_grad()
def embed(features, pre: dict, images: torch.Tensor, side: int) -> torch.Tensor:
    x = torch.nn.functional.interpolate(images.float() / 255, size=(side, side), mode="bicubic", align_corners=False)
    x = (x - torch.tensor(pre["mean"]).view(1, 3, 1, 1)) / torch.tensor(pre["std"]).view(1, 3, 1, 1)
    return torch.cat([features(b) for b in x.split(128)])


def linear_probe(xtr, ytr, xva, yva, epochs: int = 300) -> float:
    """A linear classifier on standardised features (full-batch Adam); validation top-1 in percent."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    torch.manual_seed(0)  # the same head initialisation whichever library computed the features
    head = torch.nn.Linear(xtr.shape[1], int(ytr.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(xtr), ytr).backward()
        opt.step()
    return float((head(xva).argmax(1) == yva).float().mean() * 100)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="pretraining steps")
    p.add_argument("--out", default="runs/export_timm_probe", help="folder for the run and the export")
    p.add_argument("--library", default="auto", choices=("auto", "timm", "hf"), help="auto: timm, else transformers")
    p.add_argument("--images", type=int, default=600, help="labelled demo images for the probe (2/3 train)")
    args = p.parse_args(argv)
    out = Path(args.out)
    ckpt = pretrain(out, args.steps)
    library = args.library
    if library == "auto":
        try:
            import timm  # noqa: F401
            library = "timm"
        except (ImportError, RuntimeError) as e:  # RuntimeError: a torchvision whose compiled ops cannot load
            print(f"timm cannot be imported ({str(e).splitlines()[0]}): probing transformers' IJepaModel instead")
            library = "hf"
    folder, message = export_encoder(ckpt, out / library, format=library, which="target")
    print(message)
    features, pre = (timm_features if library == "timm" else hf_features)(folder)
    images, labels = generate(args.images, size=48, seed=1)  # a fresh draw: not the pretraining images
    feats = embed(features, pre, images, side=32)
    n = len(labels) * 2 // 3
    result = {"library": library, "steps": args.steps, "features": list(feats.shape),
              "top1": round(linear_probe(feats[:n], labels[:n], feats[n:], labels[n:]), 2)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
