import random

import pytest
import torch
from PIL import Image

from ijepa_fast.config import MaskConfig
from ijepa_fast.data import DataError, FolderImages, StepBatches, TrainTransform, make_loader, scan_folder
from ijepa_fast.data.demo import DemoImages
from ijepa_fast.data.transforms import crop_params
from ijepa_fast.masks import MultiBlockSampler


def write_images(folder, n, size=(40, 30), mode="RGB", ext="jpg"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", size, (i * 20 % 255, 100, 200 - i * 10 % 200))
        img = img.convert(mode) if mode != "RGB" else img
        img.save(folder / f"img{i:03d}.{ext}")


def test_data_scan_imagenet_layout_and_flat(tmp_path):
    write_images(tmp_path / "inet" / "n01", 3)
    write_images(tmp_path / "inet" / "n02", 2, ext="png")
    (tmp_path / "inet" / "n02" / "notes.txt").write_text("not an image")
    files, labels, classes = scan_folder(tmp_path / "inet")
    assert len(files) == 5 and labels == [0, 0, 0, 1, 1] and classes == ["n01", "n02"]
    write_images(tmp_path / "flat", 4)
    files, labels, classes = scan_folder(tmp_path / "flat")
    assert len(files) == 4 and labels == [-1] * 4 and classes == []


def test_data_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        FolderImages(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        FolderImages(tmp_path / "empty")


def test_data_crop_params_within_bounds_and_area():
    rng = random.Random(0)
    for _ in range(500):
        w, h = rng.randint(20, 400), rng.randint(20, 400)
        top, left, ch, cw = crop_params(rng, w, h, (0.3, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0


def test_data_transform_is_deterministic_per_epoch_and_index():
    img = Image.effect_mandelbrot((64, 48), (-2, -1.2, 1, 1.2), 60).convert("RGB")
    t = TrainTransform(size=32, hflip=True, seed=3)
    a, b = t(img, 0, 5), t(img, 0, 5)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, t(img, 1, 5)) and not torch.equal(a, t(img, 0, 6))
    raw = t.augment(img, 0, 5)
    mean = torch.tensor(t.mean).view(3, 1, 1)
    std = torch.tensor(t.std).view(3, 1, 1)
    assert torch.allclose(a, (raw.float() / 255 - mean) / std)


def test_data_unusable_files_are_skipped_and_counted(tmp_path):
    d = tmp_path / "imgs"
    write_images(d, 6)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    good = (d / "img000.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(good[: len(good) // 2])
    Image.new("CMYK", (30, 30)).save(d / "cmyk.jpg")
    Image.new("RGBA", (30, 30), (10, 20, 30, 0)).save(d / "alpha.png")
    Image.new("L", (30, 30), 128).save(d / "grey.png")
    Image.frombytes("I;16", (8, 8), bytes(range(128))).save(d / "deep.png")
    src = FolderImages(d)
    assert len(src) == 12
    sampler = MultiBlockSampler((4, 4), MaskConfig(min_keep=0), seed=0)
    loader = make_loader(src, TrainTransform(size=16), sampler, batch_size=12, start=0, stop=1)
    (batch,) = list(loader)
    assert batch.images.shape == (12, 3, 16, 16) and torch.isfinite(batch.images).all()
    grey = batch.images[[src.name(i).endswith("grey.png") for i in batch.indices].index(True)]
    mean, std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
    want = ((128 / 255 - mean) / std).view(3, 1, 1).expand(3, 16, 16)  # a grey image stays grey, any crop
    torch.testing.assert_close(grey, want, rtol=0, atol=1e-5)
    assert sorted(n.rsplit("/", 1)[-1] for n in batch.skipped) == ["broken.jpg", "truncated.jpg"]


def test_data_order_sharding_covers_each_image_once_per_epoch():
    n, batch, world = 103, 5, 3
    seen = []
    for rank in range(world):
        for step, epoch, idx in StepBatches(n, batch, 0, 6, seed=1, rank=rank, world=world):
            assert epoch == 0 and len(idx) == batch
            seen += idx
    assert len(seen) == len(set(seen)) == 6 * batch * world  # 6 steps of 15 cover 90 distinct images
    ep1 = [i for _, e, idx in StepBatches(n, batch, 6, 12, seed=1) for i in idx]
    ep0 = [i for _, e, idx in StepBatches(n, batch, 0, 6, seed=1) for i in idx]
    assert ep0 != ep1  # a new permutation each epoch


def test_data_loader_resumes_mid_epoch_and_workers_agree():
    src = DemoImages(40, 24, seed=0)
    sampler = MultiBlockSampler((4, 4), MaskConfig(min_keep=0), seed=0)
    t = TrainTransform(size=16, seed=0)
    full = list(make_loader(src, t, sampler, 4, 0, 14))  # 10 steps per epoch: crosses an epoch boundary
    part = list(make_loader(src, t, sampler, 4, 7, 14, num_workers=2))
    assert [b.step for b in part] == list(range(7, 14))
    for a, b in zip(full[7:], part):
        assert torch.equal(a.images, b.images) and torch.equal(a.masks.context, b.masks.context)
        assert torch.equal(a.labels, b.labels)


def test_data_loader_falls_back_to_pil_with_a_message_without_dali(tmp_path):
    from conftest import run_cli

    write_images(tmp_path / "imgs", 16)
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "nvidia").mkdir()
    (blocker / "nvidia" / "dali.py").write_text("raise ImportError('DALI hidden for this test')\n")
    (blocker / "nvidia" / "__init__.py").write_text("")
    p = run_cli("train", "--data", tmp_path / "imgs", "--run-dir", tmp_path / "run", "--steps", "1",
                "data.loader=dali", "data.batch_size=8", "data.num_workers=1", "run.progress=false", "run.plot=false",
                env={"PYTHONPATH": str(blocker)})
    assert "data.loader=dali but DALI is not installed" in p.stderr and "data loader: Pillow" in p.stderr
