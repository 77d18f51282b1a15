"""The handwritten digits that ship with scikit-learn (1,797 images, 8 x 8, ten classes), upsampled:
a small real image set that needs no download (``pip install scikit-learn``)."""
from __future__ import annotations

import torch

from .images import DataError, TensorImages


def load_digits_tensor(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [1797, 3, size, size] upsampled bilinearly, int64 labels [1797])."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits set comes with scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    pix = torch.tensor(d.images, dtype=torch.float32) / 16.0  # [N, 8, 8] in [0, 1]
    up = torch.nn.functional.interpolate(pix[:, None], size=(size, size), mode="bilinear", align_corners=False)
    img = (up.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return img, torch.tensor(d.target, dtype=torch.int64)


class DigitsImages(TensorImages):
    """An image source over (a subset of) the digits: ``load(i)`` -> RGB PIL image."""

    def __init__(self, size: int = 32, indices=None):
        images, labels = load_digits_tensor(size)
        idx = torch.arange(len(labels)) if indices is None else torch.as_tensor(indices)
        super().__init__(images[idx], labels[idx].tolist(), [str(c) for c in range(10)],
                         f"<scikit-learn digits: {len(idx)} images upsampled to {size}px>", "digit")
