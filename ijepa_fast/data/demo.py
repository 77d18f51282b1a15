"""The built-in demo image set: generated, so nothing is downloaded or shipped.

Each image has a random two-colour gradient background and two to four objects of one kind,
its class: 0 rectangles, 1 discs, 2 striped squares, 3 crosses. Colours, sizes and positions are
random, so predicting one region from another takes some understanding of the scene.
"""
from __future__ import annotations

import torch

from .images import TensorImages

CLASSES = ("rectangles", "discs", "stripes", "crosses")


def _shape_mask(kind: int, yy, xx, cy, cx, r):
    dy, dx = yy - cy, xx - cx
    if kind == 0:
        return (dy.abs() <= r) & (dx.abs() <= r * 0.6)
    if kind == 1:
        return dy * dy + dx * dx <= r * r
    if kind == 2:
        return (dy.abs() <= r) & (dx.abs() <= r) & ((yy // 2) % 2 == 0)
    return ((dy.abs() <= r) & (dx.abs() <= r * 0.3)) | ((dx.abs() <= r) & (dy.abs() <= r * 0.3))


def generate(n: int, size: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [n, 3, size, size], int64 labels [n]), the same for the same arguments."""
    g = torch.Generator().manual_seed(seed)
    yy = torch.arange(size, dtype=torch.float32).view(size, 1).expand(size, size)
    xx = torch.arange(size, dtype=torch.float32).view(1, size).expand(size, size)
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    for i in range(n):
        c0, c1 = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
        angle = torch.rand(1, generator=g) * 6.2832
        t = (xx * torch.cos(angle) + yy * torch.sin(angle)) / size * 0.7 + 0.5
        img = c0 * (1 - t) + c1 * t
        for _ in range(int(torch.randint(2, 5, (1,), generator=g))):
            cy, cx = (torch.rand(2, generator=g) * size).tolist()
            r = float(size * (0.08 + 0.12 * torch.rand(1, generator=g)))
            colour = torch.rand(3, 1, 1, generator=g)
            mask = _shape_mask(int(labels[i]), yy, xx, cy, cx, r)
            img = torch.where(mask, colour, img)
        images[i] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels


class DemoImages(TensorImages):
    """The generated set as an image source (``load(i)`` -> RGB PIL image)."""

    def __init__(self, n: int = 2048, size: int = 48, seed: int = 0):
        images, labels = generate(n, size, seed)
        super().__init__(images, labels.tolist(), CLASSES, f"<demo: {n} generated images of {size}px>", "demo")
