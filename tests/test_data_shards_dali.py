"""Shard folders under DALI (CPU pipelines here): the DALI loader gives a shard folder the batches of
its image folder; DALI's webdataset reader covers every usable image once per pass across ranks and
decodes the same pixels as the DALI loader on the folder."""
import pytest
import torch
from PIL import Image

from ijepa_fast.config import MaskConfig
from ijepa_fast.data import FolderImages
from ijepa_fast.data.dali import DaliLoader, available
from ijepa_fast.data.shards import ShardImages, write_shards
from ijepa_fast.masks import MultiBlockSampler

pytestmark = pytest.mark.skipif(available() is None, reason="NVIDIA DALI is not installed (pip install "
                                                             "nvidia-dali-cuda130)")


class Cfg:
    crop_size, crop_scale, crop_ratio, hflip = 32, (0.3, 1.0), (0.75, 4 / 3), True
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class WholeImage(Cfg):  # square images, area 1 and aspect 1: the crop is the whole image, no flip
    crop_scale, crop_ratio, hflip = (1.0, 1.0), (1.0, 1.0), False


def noise_folder(root, n, classes=2):
    for i in range(n):
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        px = torch.randint(0, 256, (48, 48, 3), dtype=torch.uint8)
        Image.frombytes("RGB", (48, 48), bytes(px.flatten().tolist())).save(d / f"{i:03d}.jpg", quality=90)
    return root


def sampler():
    return MultiBlockSampler((4, 4), MaskConfig(min_keep=0), seed=0)


def test_data_shards_dali_loader_gives_the_folder_batches(tmp_path):
    src = noise_folder(tmp_path / "imgs", 24)
    good = (src / "c0" / "000.jpg").read_bytes()
    (src / "c1" / "zz_trunc.jpg").write_bytes(good[: len(good) // 2])
    write_shards(src, tmp_path / "shards", shard_bytes=20_000)
    folder, shards = FolderImages(src), ShardImages(tmp_path / "shards")
    a = list(DaliLoader(folder, Cfg, sampler(), 4, 0, 4, seed=6, rank=0, world=2, num_workers=1))
    b = list(DaliLoader(shards, Cfg, sampler(), 4, 0, 4, seed=6, rank=0, world=2, num_workers=1))
    assert [x.epoch for x in b] == [0, 0, 0, 1] and any(x.skipped for x in b)
    for x, y in zip(a, b):
        assert x.indices == y.indices and torch.equal(x.labels, y.labels)
        assert torch.equal(x.images, y.images)  # the same bytes, the same seeded pipeline
        assert [n.rsplit("/", 1)[-1] for n in x.skipped] == [n.rsplit("/", 1)[-1] for n in y.skipped]


def webdataset(shards, cfg, batch, start, stop, **kw):
    from ijepa_fast.data.dali_wds import WebDatasetLoader

    return list(WebDatasetLoader(shards, cfg, sampler(), batch, start, stop, num_workers=1, shuffle_buffer=8, **kw))


def test_data_shards_webdataset_covers_each_image_once_per_pass(tmp_path):
    src = noise_folder(tmp_path / "imgs", 24, classes=3)
    good = (src / "c0" / "000.jpg").read_bytes()
    (src / "c1" / "zz_trunc.jpg").write_bytes(good[: len(good) // 2])  # left out of DALI's index
    write_shards(src, tmp_path / "shards", shard_bytes=30_000, seed=1)
    shards = ShardImages(tmp_path / "shards")
    assert len(shards) == 25 and len(shards.suspect) == 1
    usable = sorted(set(range(25)) - set(shards.suspect))  # 24: 12 a rank a pass, 3 steps of 4
    passes = {0: [], 1: []}
    firsts = []
    for rank in range(2):
        out = webdataset(shards, Cfg, 4, 0, 6, seed=3, rank=rank, world=2)
        assert all(b.images.shape == (4, 3, 32, 32) and torch.isfinite(b.images).all() for b in out)
        assert [b.epoch for b in out] == [0, 0, 0, 1, 1, 1]  # 25 // 8 = 3 steps an epoch
        idx = [i for b in out for i in b.indices]
        assert [int(v) for b in out for v in b.labels] == [shards.labels[i] for i in idx]
        passes[0] += idx[:12]
        passes[1] += idx[12:]
        firsts.append(set(idx[:12]))
    for p in (0, 1):
        assert sorted(passes[p]) == usable  # every usable image exactly once per pass, across the ranks
    assert firsts[0] == set(passes[1][12:])  # rank 1 reads rank 0's slice in the second pass


def test_data_shards_webdataset_decodes_the_folder_pixels(tmp_path):
    src = noise_folder(tmp_path / "imgs", 16)
    write_shards(src, tmp_path / "shards", shard_bytes=20_000, seed=2)
    folder, shards = FolderImages(src), ShardImages(tmp_path / "shards")
    dali_folder = {}
    for b in DaliLoader(folder, WholeImage, sampler(), 8, 0, 2, seed=0, num_workers=1):
        dali_folder.update({i: b.images[k] for k, i in enumerate(b.indices)})
    got = webdataset(shards, WholeImage, 4, 0, 4, seed=5)
    assert sorted(i for b in got for i in b.indices) == list(range(16))
    for b in got:
        for k, i in enumerate(b.indices):
            assert torch.equal(b.images[k], dali_folder[i])


def test_data_shards_webdataset_resumes_at_the_start_of_its_pass(tmp_path):
    from ijepa_fast.data.dali_wds import WebDatasetLoader

    src = noise_folder(tmp_path / "imgs", 24)
    write_shards(src, tmp_path / "shards", shard_bytes=20_000)
    shards = ShardImages(tmp_path / "shards")
    full = webdataset(shards, Cfg, 2, 0, 18, seed=1, rank=1, world=2)  # 12 images a pass: 6 steps
    resumed = webdataset(shards, Cfg, 2, 8, 12, seed=1, rank=1, world=2)  # step 8 lies in pass 1 (steps 6-11)
    assert [b.step for b in resumed] == list(range(8, 12)) and [b.epoch for b in resumed] == [1] * 4
    got = [i for b in resumed for i in b.indices]
    assert len(set(got)) == 8 and set(got) <= set(i for b in full[6:12] for i in b.indices)  # pass 1's slice
    # unequal slices (25 images, 2 ranks: 12 and 13): rank 0 reads slice 0, then 1, then 0 ...
    shards.suspect = [0]
    loader = WebDatasetLoader(shards, Cfg, sampler(), 1, 0, 1, rank=0, world=2)
    loader.usable = 25
    assert [loader.pass_of(s) for s in (0, 11, 12, 24, 25, 36, 50)] == [(0, 0), (0, 0), (1, 1), (1, 1), (2, 0),
                                                                       (2, 0), (4, 0)]


def test_data_shards_webdataset_selected_by_config_in_training(tmp_path):
    from conftest import run_cli

    noise_folder(tmp_path / "imgs", 16)
    write_shards(tmp_path / "imgs", tmp_path / "shards")
    p = run_cli("train", "--data", tmp_path / "shards", "--run-dir", tmp_path / "run", "--steps", "2",
                "data.loader=dali_webdataset", "data.batch_size=8", "data.num_workers=1", "run.progress=false",
                "run.plot=false")
    assert "webdataset reader" in p.stderr and (tmp_path / "run" / "jepa-latest.pth.tar").exists()
