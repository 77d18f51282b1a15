"""Image sources: a folder of files (ImageNet layout or flat) and robust decoding.

A source is indexable: ``source.load(i)`` returns an RGB PIL image or ``None`` when the file
cannot be used (unreadable, truncated, not an image); callers skip and count those.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, ImageFile

from ..errors import DataError

__all__ = ["DataError", "FolderImages", "TensorImages", "decode", "scan_folder", "to_rgb", "usable_bytes"]

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")


def scan_folder(root) -> tuple[list[str], list[int], list[str]]:
    """(files, labels, class names) of an image folder.

    ImageNet layout (``root/<class>/<image>``, nested folders allowed) gives one label per class
    folder; a flat folder of images gives label -1 for every file. Hidden files are ignored;
    the order is sorted, so it is the same on every machine.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist (set data.path or pass --data DIR)")
    if not root.is_dir():
        raise DataError(f"data.path {root} is not a folder")
    try:
        classes = sorted(d.name for d in root.iterdir() if _is_dir(d) and not d.name.startswith("."))
    except OSError as e:
        raise DataError(f"cannot read the data folder {root} ({e.strerror or e})") from None
    files, labels = [], []
    for f in _images_in(root, recursive=False):
        files.append(f)
        labels.append(-1)
    for label, name in enumerate(classes):
        for f in _images_in(root / name, recursive=True):
            files.append(f)
            labels.append(label)
    if not files:
        raise DataError(f"no images ({', '.join(EXTENSIONS)}) found in {root}")
    if classes and any(lab == -1 for lab in labels):
        labels = [-1] * len(labels)  # a mix of loose files and class folders: no labels
    return files, labels, classes if labels[0] != -1 else []


def _is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except OSError:  # a symlink loop, a broken mount
        return False


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except OSError:
        return False


def _images_in(folder: Path, recursive: bool) -> list[str]:
    out = []
    if recursive:
        seen = set()  # folders already walked (real paths): a symlink loop is walked once, not forever
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                                 and os.path.realpath(os.path.join(dirpath, d)) not in seen)
            out += [os.path.join(dirpath, f) for f in sorted(filenames)
                    if f.lower().endswith(EXTENSIONS) and not f.startswith(".")]
    else:
        out = [str(p) for p in sorted(folder.iterdir())
               if _is_file(p) and p.suffix.lower() in EXTENSIONS and not p.name.startswith(".")]
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit and float greyscale are rescaled, alpha is dropped over
    black, palette, greyscale and CMYK are converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        if img.mode.startswith("I;16"):
            img = img.convert("I")
        lo, hi = img.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = img.point(lambda v: (v - lo) * scale).convert("L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def decode(path: str) -> Image.Image | None:
    """Fully decode a file to RGB, or None if it is not a usable image."""
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except Exception:
        return None


def usable_bytes(data: bytes) -> bool:
    """A cheap check that a decoder will accept these bytes (not a full decode)."""
    if len(data) < 8:
        return False
    if data[:2] == b"\xff\xd8":  # JPEG: a truncated file lacks its end-of-image marker (allow trailing bytes)
        return b"\xff\xd9" in data[-4096:]
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()  # PNG: chunk checksums; others: structure
        return True
    except Exception:
        return False


class FolderImages:
    """Images of a folder; labels are -1 for a flat folder."""

    def __init__(self, root):
        self.root = str(root)
        self.files, self.labels, self.classes = scan_folder(root)

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> str:
        return self.files[i]

    def read_bytes(self, i: int) -> bytes:
        """The file's bytes (empty when it cannot be read)."""
        try:
            with open(self.files[i], "rb") as f:
                return f.read()
        except OSError:
            return b""

    def load(self, i: int) -> Image.Image | None:
        return decode(self.files[i])


class TensorImages:
    """An image source over uint8 [N, 3, H, W] images held in memory (generated or bundled sets)."""

    def __init__(self, images, labels, classes, root: str, prefix: str):
        self.images, self.labels, self.classes = images, list(labels), list(classes)
        self.root, self.prefix = root, prefix

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        return f"{self.prefix}#{i}"

    def load(self, i: int) -> Image.Image:
        hwc = self.images[i].permute(1, 2, 0).contiguous()
        return Image.frombytes("RGB", (hwc.shape[1], hwc.shape[0]), bytes(hwc.view(-1).tolist()))
