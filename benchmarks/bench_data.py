"""Images per second of each data loader at 224 px, on generated ImageNet-sized JPEGs.

    python benchmarks/bench_data.py [--images 512 --batch 128 --workers 2 --steps 8] [--out F] [--md F]

Writes the images once into a temporary folder (500 x 375 JPEGs, quality 90, about ImageNet's
average), then times each loader over ``--steps`` batches after one warm-up batch: the PIL loader
with ``--workers`` processes, and DALI (on the GPU when there is one, else its CPU pipeline)
when installed. Masks are drawn for every batch, as in training. One JSON object per line.
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from common import emit, environment, write_markdown


def make_images(folder: Path, n: int) -> None:
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    for i in range(n):
        img = Image.effect_noise((500, 375), 40).convert("RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x, y = rng.randint(0, 450), rng.randint(0, 330)
            draw.ellipse((x, y, x + rng.randint(20, 160), y + rng.randint(20, 160)),
                         fill=tuple(rng.randint(0, 255) for _ in range(3)))
        img.save(folder / f"{i:05d}.jpg", quality=90)


def time_loader(loader, steps: int) -> float:
    it = iter(loader)
    next(it)  # warm-up: workers start, pipelines build
    t = time.perf_counter()
    n = 0
    for _ in range(steps):
        n += next(it).images.shape[0]
    return n / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out")
    p.add_argument("--md")
    args = p.parse_args()

    import torch

    from ijepa_fast.config import DataConfig, MaskConfig
    from ijepa_fast.data import FolderImages, make_loader, transform_from_config
    from ijepa_fast.data.dali import DaliLoader, available
    from ijepa_fast.masks import MultiBlockSampler

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(str(device))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_images(Path(tmp), args.images)
        src = FolderImages(tmp)
        cfg = DataConfig(path=tmp, crop_size=224)
        sampler = MultiBlockSampler((16, 16), MaskConfig(), seed=0)
        stop = args.steps + 1
        loader = make_loader(src, transform_from_config(cfg), sampler, args.batch, 0, stop, num_workers=args.workers)
        rows.append({"bench": "data", "loader": "pil", "workers": args.workers, "device": "cpu",
                     "images_per_s": round(time_loader(loader, args.steps), 1), **env})
        emit(rows[-1], args.out)
        version = available()
        if version:
            loader = DaliLoader(src, cfg, sampler, args.batch, 0, stop, device=device, num_workers=args.workers)
            rows.append({"bench": "data", "loader": f"dali {version}", "workers": args.workers,
                         "device": "gpu (mixed decode)" if device.type == "cuda" else "cpu",
                         "images_per_s": round(time_loader(loader, args.steps), 1), **env})
            emit(rows[-1], args.out)
    if args.md:
        write_markdown(args.md, "Data loaders: images per second at 224 px",
                       f"python benchmarks/bench_data.py --images {args.images} --batch {args.batch} "
                       f"--workers {args.workers} --steps {args.steps}", rows,
                       [("loader", "loader"), ("device", "decoding on"), ("workers", "workers / threads"),
                        ("images_per_s", "images/s")],
                       "500 x 375 JPEGs (quality 90) decoded, RandomResizedCrop(224, 0.3-1.0), normalised, with "
                       "masks drawn per batch; images/s is the total over the timed batches, after one warm-up "
                       "batch.")


if __name__ == "__main__":
    main()
