"""Images per second of each data loader at 224 px, on generated ImageNet-sized JPEGs, read from
an image folder and from the same images as tar shards.

    python benchmarks/bench_data.py [--images 512 --batch 128 --workers 2 --steps 8 --shard-size 16MB]
                                    [--out F] [--md F]

Writes the images once into a temporary folder (500 x 375 JPEGs, quality 90, about ImageNet's
average) and as shards (``ijepa-fast shard``, timed), then times each loader over ``--steps``
batches after one warm-up batch: the PIL loader with ``--workers`` processes on the folder and on
the shards, and, when DALI is installed (on the GPU when there is one, else its CPU pipeline), the
DALI loader on both and DALI's webdataset reader on the shards. Masks are drawn for every batch,
as in training. One JSON object per line; ``load`` is the 1-minute load average before each
measurement (other processes on the machine).
"""
from __future__ import annotations

import argparse
import os
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
    p.add_argument("--shard-size", default="16MB")
    p.add_argument("--out")
    p.add_argument("--md")
    args = p.parse_args()

    import torch

    from ijepa_fast.config import DataConfig, MaskConfig
    from ijepa_fast.data import FolderImages, make_loader, transform_from_config
    from ijepa_fast.data.dali import DaliLoader, available
    from ijepa_fast.data.dali_wds import WebDatasetLoader
    from ijepa_fast.data.shards import ShardImages, parse_size, write_shards
    from ijepa_fast.masks import MultiBlockSampler

    def load() -> float:
        return round(os.getloadavg()[0], 1)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(str(device))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder, shard_dir = Path(tmp) / "images", Path(tmp) / "shards"
        folder.mkdir()
        make_images(folder, args.images)
        before = load()
        t = time.perf_counter()
        index = write_shards(folder, shard_dir, shard_bytes=parse_size(args.shard_size))
        rows.append({"bench": "data", "loader": "ijepa-fast shard (writing)", "source": "folder -> shards",
                     "workers": 1, "device": "cpu", "images_per_s": round(args.images / (time.perf_counter() - t), 1),
                     "shards": len(index["shards"]), "load": before, **env})
        emit(rows[-1], args.out)
        sources = {"folder": FolderImages(folder), "shards": ShardImages(shard_dir)}
        cfg = DataConfig(path=str(folder), crop_size=224)
        sampler = MultiBlockSampler((16, 16), MaskConfig(), seed=0)
        stop = args.steps + 1
        version = available()
        runs = [("pil", name) for name in sources]
        if version:
            runs += [(f"dali {version}", name) for name in sources] + [(f"dali {version} webdataset", "shards")]
        for kind, name in runs:
            src = sources[name]
            if kind == "pil":
                loader = make_loader(src, transform_from_config(cfg), sampler, args.batch, 0, stop,
                                     num_workers=args.workers)
            elif kind.endswith("webdataset"):
                loader = WebDatasetLoader(src, cfg, sampler, args.batch, 0, stop, device=device,
                                          num_workers=args.workers)
            else:
                loader = DaliLoader(src, cfg, sampler, args.batch, 0, stop, device=device, num_workers=args.workers)
            before = load()
            on = "cpu" if kind == "pil" or device.type != "cuda" else "gpu (mixed decode)"
            rows.append({"bench": "data", "loader": kind, "source": name, "workers": args.workers, "device": on,
                         "images_per_s": round(time_loader(loader, args.steps), 1), "load": before, **env})
            emit(rows[-1], args.out)
    if args.md:
        write_markdown(args.md, "Data loaders: images per second at 224 px",
                       f"python benchmarks/bench_data.py --images {args.images} --batch {args.batch} "
                       f"--workers {args.workers} --steps {args.steps} --shard-size {args.shard_size}", rows,
                       [("loader", "loader"), ("source", "reads"), ("device", "decoding on"),
                        ("workers", "workers / threads"), ("images_per_s", "images/s"), ("load", "load average")],
                       "500 x 375 JPEGs (quality 90) decoded, RandomResizedCrop(224, 0.3-1.0), normalised, with "
                       "masks drawn per batch; images/s is the total over the timed batches, after one warm-up "
                       "batch. The writing row is `ijepa-fast shard` copying the folder into tar shards. "
                       "The load average (1 minute, before each measurement) counts the other processes sharing "
                       "the machine's cores.")


if __name__ == "__main__":
    main()
