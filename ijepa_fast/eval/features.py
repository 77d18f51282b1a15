"""Feature extraction: a frozen encoder over an image folder, pooled or per patch.

``extract`` runs the encoder (the target encoder by default, as the paper evaluates) on images
resized (shorter side to ``img * 256 / 224``) and centre-cropped to ``img`` pixels, at any
resolution (the positional table is interpolated to the grid; it is exact at the native one),
in batches, in bf16 on a GPU. It returns average-pooled features [N, D] (I-JEPA has no class
token), optionally every patch token [N, T, D], with labels and file names. With ``layers=L`` the
features are the average-pooled outputs of the last L blocks (each through the encoder's final
layer norm), concatenated from the earliest to the last: [N, L x D]; L=4 is the paper's linear-probe
protocol, L=1 the pooled output.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._compat import keyword_only
from ..checkpoint.format import write_atomic
from ..data.transforms import pil_to_tensor
from ..errors import ConfigError, DataError


@dataclass
class Features:
    features: torch.Tensor  # [N, D] average-pooled
    labels: torch.Tensor  # [N] int64 (-1 where the folder has no classes)
    files: list = field(default_factory=list)
    tokens: torch.Tensor | None = None  # [N, T, D] when asked for
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.features.shape[0]


class EvalTransform:
    """Resize the shorter side to img * 256 / 224, centre-crop img x img, normalise."""

    def __init__(self, img: int = 224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        self.img, self.resize = img, int(round(img * 256 / 224))
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, pil) -> torch.Tensor:
        from PIL import Image

        w, h = pil.size
        scale = self.resize / min(w, h)
        pil = pil.resize((max(self.img, round(w * scale)), max(self.img, round(h * scale))), Image.BICUBIC)
        w, h = pil.size
        left, top = (w - self.img) // 2, (h - self.img) // 2
        pil = pil.crop((left, top, left + self.img, top + self.img))
        return (pil_to_tensor(pil).float() / 255 - self.mean) / self.std


class _EvalImages(torch.utils.data.Dataset):
    def __init__(self, source, transform):
        self.source, self.transform = source, transform

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        img = self.source.load(i)
        if img is None:  # unusable: counted by the caller, a zero image keeps the batch shape
            return torch.zeros(3, self.transform.img, self.transform.img), i, False
        return self.transform(img), i, True


@torch.no_grad()
def encode(encoder, images: torch.Tensor, tokens: bool = False,
           layers: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(average-pooled [B, layers x D], patch tokens [B, T, D] of the output or None) of a batch of
    normalised images, in fp32 (the encoder runs under bf16 autocast on a GPU). ``layers``: how many
    of the last blocks' outputs are pooled and concatenated (see the module docstring)."""
    depth = len(encoder.blocks)
    if not 1 <= layers <= depth:
        raise ConfigError(f"--layers {layers}: the encoder has {depth} blocks; choose 1 to {depth} (4 = the linear "
                         f"probe protocol)")
    dev = images.device
    seen = []
    hooks = [blk.register_forward_hook(lambda _m, _i, out: seen.append(out)) for blk in encoder.blocks[depth - layers:]]
    try:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            h = encoder(images)
            inner = [encoder.norm(x) for x in seen[:-1]]  # the last block's normed output is h itself
    finally:
        for hook in hooks:
            hook.remove()
    h = h.float()
    pooled = torch.cat([x.float().mean(1) for x in inner] + [h.mean(1)], dim=-1)
    return pooled, (h if tokens else None)


@torch.no_grad()
@keyword_only(2, ("img", "batch_size", "device", "tokens", "num_workers", "progress", "layers"))
def extract(encoder, source, *, img: int = 224, batch_size: int = 64, device: str | torch.device = "cpu",
            tokens: bool = False, num_workers: int = 0, progress: bool = True, layers: int = 1) -> Features:
    """Features of every image of ``source`` (an image or shard folder, or DemoImages); see the module
    docstring."""
    from ..runlog.output import Progress

    device = torch.device(device)
    encoder = encoder.to(device).eval()
    if img % encoder.patch_size:
        raise ConfigError(f"--img {img} is not a multiple of the encoder's patch size {encoder.patch_size}")
    if not 1 <= layers <= len(encoder.blocks):
        raise ConfigError(f"--layers {layers}: the encoder has {len(encoder.blocks)} blocks; choose 1 to "
                         f"{len(encoder.blocks)} (4 = the linear probe protocol)")
    loader = torch.utils.data.DataLoader(_EvalImages(source, EvalTransform(img)), batch_size=batch_size,
                                         num_workers=num_workers)
    pooled, toks, idx, bad = [], [], [], []
    bar = Progress(len(loader), 0, progress)
    for x, i, ok in loader:
        p, t = encode(encoder, x.to(device), tokens, layers)
        pooled.append(p.cpu())
        if tokens:
            toks.append(t.cpu())
        idx.append(i)
        bad += i[~ok].tolist()
        bar.update(1)
    bar.close()
    idx = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)
    labels = torch.tensor([getattr(source, "labels", [-1] * len(source))[i] for i in idx.tolist()], dtype=torch.int64)
    keep = torch.ones(len(idx), dtype=torch.bool)
    keep[[idx.tolist().index(b) for b in bad]] = False
    feats = torch.cat(pooled)[keep] if pooled else torch.zeros(0, layers * encoder.embed_dim)
    meta = {"img": img, "pool": "avg" if layers == 1 else f"avg of the last {layers} blocks, concatenated",
            "layers": layers, "skipped": [source.name(b) for b in bad], "encoder_dim": encoder.embed_dim,
            "classes": list(getattr(source, "classes", []))}
    return Features(feats, labels[keep], [source.name(i) for i in idx[keep].tolist()],
                    torch.cat(toks)[keep] if tokens and toks else None, meta)


def save(feats: Features, path) -> Path:
    """.safetensors (features, labels, tokens; file names and meta in the header) or .npy (features;
    labels, file names and meta in sibling files)."""
    path = Path(path)
    meta = {**feats.meta, "files": feats.files}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors = {"features": feats.features.contiguous(), "labels": feats.labels.contiguous()}
        if feats.tokens is not None:
            tensors["tokens"] = feats.tokens.contiguous()
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"meta": json.dumps(meta)}))
    elif path.suffix == ".npy":
        import numpy as np

        def npy(array):
            def write(tmp):
                with open(tmp, "wb") as f:
                    np.save(f, array)
            return write

        write_atomic(path, npy(feats.features.numpy()))
        write_atomic(path.with_name(path.stem + "_labels.npy"), npy(feats.labels.numpy()))
        if feats.tokens is not None:
            write_atomic(path.with_name(path.stem + "_tokens.npy"), npy(feats.tokens.numpy()))
        write_atomic(path.with_name(path.stem + "_meta.json"), lambda tmp: Path(tmp).write_text(json.dumps(meta)))
    else:
        raise DataError(f"{path}: write features as .safetensors or .npy")
    return path


def load(path) -> Features:
    """Features written by ``save``; a file that is missing or not such a file is a DataError naming it."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".npy"):
        raise DataError(f"{path}: features are .safetensors or .npy files (from ijepa-fast extract)")
    try:
        feats = _load(path)
    except DataError:
        raise
    except Exception as e:  # a torn, foreign or empty file
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise DataError(f"cannot read features from {path} ({why}): extract them again with ijepa-fast extract") \
            from None
    if feats.features.ndim != 2 or feats.labels.ndim != 1 or len(feats.labels) != len(feats.features):
        raise DataError(f"{path} does not hold features as extract writes them (a [N, D] features and an [N] "
                        f"labels tensor)")
    return feats


def _load(path: Path) -> Features:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata().get("meta", "{}"))
            tok = f.get_tensor("tokens") if "tokens" in f.keys() else None
            if "features" not in f.keys() or "labels" not in f.keys():
                raise DataError(f"{path} holds no features and labels (tensors {sorted(f.keys())[:5]})")
            return Features(f.get_tensor("features"), f.get_tensor("labels"), meta.pop("files", []), tok, meta)
    if path.suffix == ".npy":
        import numpy as np

        meta_path = path.with_name(path.stem + "_meta.json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        tok_path = path.with_name(path.stem + "_tokens.npy")
        labels = torch.from_numpy(np.load(path.with_name(path.stem + "_labels.npy")))
        tokens = torch.from_numpy(np.load(tok_path)) if tok_path.exists() else None
        return Features(torch.from_numpy(np.load(path)), labels, meta.pop("files", []), tokens, meta)
    raise ValueError(f"{path}: features are .safetensors or .npy files")
