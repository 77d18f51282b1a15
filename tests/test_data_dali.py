"""The DALI loader (CPU pipeline here): end to end on generated JPEGs, against the PIL loader,
with corrupt files, across ranks, resumed mid-epoch."""
import pytest
import torch
from PIL import Image

from ijepa_fast.config import MaskConfig
from ijepa_fast.data import FolderImages, TrainTransform, make_loader
from ijepa_fast.data.dali import DaliLoader, available, usable_bytes
from ijepa_fast.masks import MultiBlockSampler

pytestmark = pytest.mark.skipif(available() is None, reason="NVIDIA DALI is not installed (pip install "
                                                             "nvidia-dali-cuda130)")

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 120), (250, 250, 10), (10, 250, 250)]


class Cfg:
    crop_size, crop_scale, crop_ratio, hflip = 32, (0.3, 1.0), (0.75, 4 / 3), True
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def solid_images(folder, n, size=(64, 48)):
    """Solid colours: every crop of an image has the same colour, so loaders must agree exactly."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, COLOURS[i % len(COLOURS)]).save(folder / f"{i:03d}.jpg", quality=100)
    return FolderImages(folder)


def sampler():
    return MultiBlockSampler((4, 4), MaskConfig(min_keep=0), seed=0)


def test_data_dali_cpu_pipeline_end_to_end_matches_pil(tmp_path):
    src = solid_images(tmp_path / "imgs", 24)
    dali = list(DaliLoader(src, Cfg, sampler(), 8, 0, 4, seed=5, num_workers=1))
    pil = list(make_loader(src, TrainTransform(32, hflip=True, seed=5), sampler(), 8, 0, 4, seed=5))
    assert [b.step for b in dali] == [0, 1, 2, 3] and [b.epoch for b in dali] == [0, 0, 0, 1]
    for d, p in zip(dali, pil):
        assert d.images.shape == p.images.shape == (8, 3, 32, 32) and d.images.dtype == torch.float32
        assert torch.equal(d.labels, p.labels)  # the same images in the same order
        assert torch.equal(d.masks.targets, p.masks.targets)
        # solid colours: per-image channel means agree to JPEG rounding (normalised units)
        assert (d.images.mean((2, 3)) - p.images.mean((2, 3))).abs().max() < 0.05
        assert (d.images.std((2, 3)) < 0.05).all()
        lo = (0 - torch.tensor(Cfg.mean)) / torch.tensor(Cfg.std)
        hi = (1 - torch.tensor(Cfg.mean)) / torch.tensor(Cfg.std)
        assert (d.images.amin((0, 2, 3)) >= lo - 0.05).all() and (d.images.amax((0, 2, 3)) <= hi + 0.05).all()


def test_data_dali_statistics_on_textured_images(tmp_path):
    """Natural-ish images (gradients): both loaders crop 0.3-1.0 of the area and agree on statistics."""
    folder = tmp_path / "grad"
    folder.mkdir()
    for i in range(32):
        img = Image.linear_gradient("L").resize((96, 80)).rotate(i * 11).convert("RGB")
        img.save(folder / f"{i}.jpg", quality=95)
    src = FolderImages(folder)
    d = torch.cat([b.images for b in DaliLoader(src, Cfg, sampler(), 16, 0, 4, seed=1, num_workers=1)])
    p = torch.cat([b.images for b in make_loader(src, TrainTransform(32, hflip=True, seed=1), sampler(), 16, 0, 4,
                                                 seed=1)])
    assert abs(d.mean() - p.mean()) < 0.15 and abs(d.std() - p.std()) < 0.15


def test_data_dali_corrupt_files_are_skipped_and_counted(tmp_path):
    src_dir = tmp_path / "imgs"
    solid_images(src_dir, 14)
    good = (src_dir / "000.jpg").read_bytes()
    (src_dir / "900_junk.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (src_dir / "901_trunc.jpg").write_bytes(good[: len(good) // 2])
    (src_dir / "902_empty.png").write_bytes(b"")
    assert not usable_bytes(good[: len(good) // 2]) and usable_bytes(good)
    src = FolderImages(src_dir)
    batches = list(DaliLoader(src, Cfg, sampler(), 17, 0, 2, seed=0, num_workers=1))
    skipped = sorted(n.rsplit("/", 1)[-1] for b in batches for n in b.skipped)
    assert skipped == sorted(["900_junk.jpg", "901_trunc.jpg", "902_empty.png"] * 2)
    assert all(torch.isfinite(b.images).all() for b in batches)
    lo, hi = (0 - 0.485) / 0.229, (1 - 0.406) / 0.225  # normalised pixels of any image
    assert all(lo - 1e-3 <= float(b.images.min()) and float(b.images.max()) <= hi + 1e-3 for b in batches)
    assert all(float(b.images.std()) > 0.05 for b in batches)  # real pixels, not a constant fill


def test_data_dali_sharding_covers_each_image_once_per_epoch(tmp_path):
    src = solid_images(tmp_path / "imgs", 30)
    seen = []
    for rank in range(2):
        for b in DaliLoader(src, Cfg, sampler(), 5, 0, 3, seed=2, rank=rank, world=2, num_workers=1):
            assert b.images.shape[0] == 5
            seen += b.indices
    assert len(seen) == len(set(seen)) == 30  # 3 steps x 5 images x 2 ranks: the whole epoch, once
    pil = [i for rank in range(2) for b in make_loader(src, TrainTransform(32), sampler(), 5, 0, 3, seed=2,
                                                       rank=rank, world=2) for i in b.indices]
    assert sorted(pil) == sorted(seen)


def test_data_dali_resumes_at_the_same_images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(20):
        Image.new("RGB", (40, 40), (i * 12, 255 - i * 12, 7 * i)).save(folder / f"{i:02d}.jpg", quality=100)
    src = FolderImages(folder)
    full = list(DaliLoader(src, Cfg, sampler(), 4, 0, 5, seed=3, num_workers=1))
    part = list(DaliLoader(src, Cfg, sampler(), 4, 3, 5, seed=3, num_workers=1))
    for a, b in zip(full[3:], part):
        assert a.step == b.step
        assert (a.images.mean((2, 3)) - b.images.mean((2, 3))).abs().max() < 0.05  # the same images


def test_data_dali_selected_by_config_in_training(tmp_path):
    from conftest import run_cli

    solid_images(tmp_path / "imgs", 16)
    p = run_cli("train", "--data", tmp_path / "imgs", "--run-dir", tmp_path / "run", "--steps", "2",
                "data.loader=dali", "data.batch_size=8", "data.num_workers=1", "run.progress=false", "run.plot=false")
    assert "data loader: DALI" in p.stderr and (tmp_path / "run" / "jepa-latest.pth.tar").exists()
