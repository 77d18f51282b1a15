"""Training augmentation: RandomResizedCrop, optional horizontal flip, normalisation.

Randomness is explicit: each image's draws come from a ``random.Random`` keyed by (seed, epoch,
image index), so an epoch is augmented identically whichever worker loads which image, and a
resumed run sees the same crops as an uninterrupted one.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from PIL import Image

from ..masks.rng import derive

AUGMENT_TAG = 0xA6


def crop_params(rng: random.Random, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop with area in ``scale`` and aspect in ``ratio``
    (10 tries, then the largest central crop within the aspect range), as torchvision does."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W] (no numpy needed)."""
    w, h = img.size
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(h, w, 3).permute(2, 0, 1)


@dataclass
class TrainTransform:
    """RandomResizedCrop(size, scale, ratio) -> optional flip -> float tensor, normalised."""

    size: int = 224
    scale: tuple = (0.3, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    hflip: bool = False
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    seed: int = 0

    def rng(self, epoch: int, index: int) -> random.Random:
        return random.Random(derive(self.seed, AUGMENT_TAG, epoch, index))

    def __call__(self, img: Image.Image, epoch: int, index: int) -> torch.Tensor:
        return self.normalize(self.augment(img, epoch, index))

    def augment(self, img: Image.Image, epoch: int, index: int) -> torch.Tensor:
        """The crop (and flip) as uint8 [3, size, size]."""
        rng = self.rng(epoch, index)
        top, left, h, w = crop_params(rng, img.width, img.height, self.scale, self.ratio)
        out = img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
        if self.hflip and rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return pil_to_tensor(out)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x.float() / 255.0 - mean) / std
