"""Tar shards (ijepa-fast shard) and their Pillow-path reader: the format read back with Python's
tarfile, and the loader giving a shard folder exactly the batches of the folder it came from."""
import json
import tarfile

import pytest
import torch
from PIL import Image

from ijepa_fast.config import DataConfig, MaskConfig
from ijepa_fast.data import FolderImages, TrainTransform, build_source, make_loader
from ijepa_fast.data.shards import INDEX, ShardImages, parse_size, write_shards
from ijepa_fast.errors import ConfigError, DataError
from ijepa_fast.masks import MultiBlockSampler


def image_folder(root, per_class=7):
    """Three classes of varied images: JPEG and PNG, an upper-case extension, one corrupt file."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for c, name in enumerate(("cat", "dog", "eel")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = 24 + int(torch.randint(0, 40, (), generator=g)), 24 + int(torch.randint(0, 40, (), generator=g))
            px = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g)
            img = Image.frombytes("RGB", (w, h), bytes(px.flatten().tolist()))
            ext = ("jpg", "png", "JPEG")[(i + c) % 3]
            img.save(root / name / f"{i:02d}.{ext}", format="PNG" if ext == "png" else "JPEG")
    good = (root / "cat" / "00.jpg").read_bytes()
    (root / "dog" / "zz_truncated.jpg").write_bytes(good[: len(good) // 3])
    return root


def sampler():
    return MultiBlockSampler((4, 4), MaskConfig(min_keep=0), seed=0)


def test_shards_parse_size():
    assert parse_size("500MB") == 500 * 10**6 and parse_size("1GB") == 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5g") == 1_500_000_000 and parse_size("4096") == 4096 and parse_size("64 KiB") == 65536
    for bad in ("", "1XB", "-1GB", "GB", "0"):
        with pytest.raises(ConfigError, match="--size"):
            parse_size(bad)


def test_shards_format_read_back_with_tarfile(tmp_path):
    src = image_folder(tmp_path / "imgs")
    folder = FolderImages(src)
    index = write_shards(src, tmp_path / "shards", shard_bytes=40_000, seed=3)
    out = tmp_path / "shards"
    assert json.loads((out / INDEX).read_text()) == index and len(index["shards"]) > 1
    seen = {}
    for shard in index["shards"]:
        path = out / shard["file"]
        assert path.stat().st_size == shard["bytes"]
        assert shard["bytes"] <= 40_000 or len(shard["samples"]) == 1
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers()]
            assert all(m.isfile() for m in members) and len(members) == 2 * len(shard["samples"])
            for k, i in enumerate(shard["samples"]):
                img, cls = members[2 * k], members[2 * k + 1]
                ext = folder.files[i].rsplit(".", 1)[1].lower()
                assert img.name == f"{i:09d}.{ext}" and cls.name == f"{i:09d}.cls"
                assert tar.extractfile(img).read() == open(folder.files[i], "rb").read()  # the bytes, as they were
                assert int(tar.extractfile(cls).read().decode()) == folder.labels[i]
                assert (img.offset_data, img.size) == (shard["offsets"][k], shard["sizes"][k])
                seen[i] = shard["file"]
        # DALI's index: one line per usable sample, "<ext> <offset> <size> <name>" for each component
        lines = (out / shard["dali_index"]).read_text().splitlines()
        usable = [i for i in shard["samples"] if i not in index["suspect"]]
        assert lines[0] == f"v1.2 {len(usable)}" and len(lines) == 1 + len(usable)
        with tarfile.open(path) as tar:
            by_name = {m.name: m for m in tar.getmembers()}
        for line in lines[1:]:
            f = line.split()
            assert len(f) == 8 and f[4] == "cls"
            for ext, off, size, name in (f[0:4], f[4:8]):
                assert name.endswith("." + ext) and (int(off), int(size)) == (by_name[name].offset_data,
                                                                              by_name[name].size)
    assert sorted(seen) == list(range(len(folder)))  # every image once
    storage = [i for s in index["shards"] for i in s["samples"]]
    assert storage != sorted(storage)  # stored in a shuffled order
    assert index["classes"] == folder.classes and index["labels"] == folder.labels
    assert [folder.files[i].endswith("zz_truncated.jpg") for i in index["suspect"]] == [True]
    reader = ShardImages(out)
    assert reader.labels == folder.labels and reader.classes == folder.classes and len(reader) == len(folder)
    for i in range(len(folder)):
        assert reader.read_bytes(i) == folder.read_bytes(i)
        a, b = reader.load(i), folder.load(i)
        assert (a is None) == (b is None) and (a is None or a.tobytes() == b.tobytes())


def test_shards_give_the_folder_batches_two_ranks_two_epochs(tmp_path):
    src = image_folder(tmp_path / "imgs")
    write_shards(src, tmp_path / "shards", shard_bytes=30_000)
    folder, shards = FolderImages(src), build_source(DataConfig(path=str(tmp_path / "shards")))
    assert isinstance(shards, ShardImages)
    t = TrainTransform(size=16, hflip=True, seed=4)
    steps = 2 * (len(folder) // (4 * 2))  # two epochs of 4 images x 2 ranks
    skipped = []
    for rank in range(2):
        a = list(make_loader(folder, t, sampler(), 4, 0, steps, seed=4, rank=rank, world=2))
        b = list(make_loader(shards, t, sampler(), 4, 0, steps, seed=4, rank=rank, world=2, num_workers=2))
        assert [x.epoch for x in b] == [0] * (steps // 2) + [1] * (steps // 2)
        for x, y in zip(a, b):
            assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels) and x.indices == y.indices
            assert torch.equal(x.masks.context, y.masks.context)
            assert [n.rsplit("/", 1)[-1] for n in x.skipped] == [n.rsplit("/", 1)[-1] for n in y.skipped]
            skipped += y.skipped
    assert skipped and all(n.endswith(".tar:dog/zz_truncated.jpg") for n in skipped)


def test_shards_resume_mid_epoch_is_exact(tmp_path):
    src = image_folder(tmp_path / "imgs", per_class=5)
    write_shards(src, tmp_path / "shards", shard_bytes=25_000)
    shards = ShardImages(tmp_path / "shards")
    t = TrainTransform(size=16, seed=2)
    full = list(make_loader(shards, t, sampler(), 3, 0, 9, seed=2))  # 5 steps per epoch: crosses into epoch 1
    part = list(make_loader(shards, t, sampler(), 3, 3, 9, seed=2, num_workers=2))
    assert [b.step for b in part] == list(range(3, 9))
    for a, b in zip(full[3:], part):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.indices == b.indices


def test_shards_max_images_and_errors(tmp_path):
    src = image_folder(tmp_path / "imgs", per_class=3)
    index = write_shards(src, tmp_path / "few", max_images=4)
    assert index["count"] == 4 and index["names"] == ["cat/00.jpg", "cat/01.png", "cat/02.JPEG", "dog/00.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        write_shards(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(DataError, match="not empty"):
        write_shards(src, tmp_path / "few")
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="cannot write shards"):
        write_shards(src, tmp_path / "file" / "out")
    (tmp_path / "few" / INDEX).unlink()  # an unfinished write
    with pytest.raises(DataError, match="no index.json"):
        build_source(DataConfig(path=str(tmp_path / "few")))


def test_shards_command(tmp_path):
    from conftest import run_cli

    src = image_folder(tmp_path / "imgs", per_class=3)
    p = run_cli("shard", src, tmp_path / "out", "--size", "20kB")
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert index["count"] == 10 and f"{len(index['shards'])} shard(s)" in p.stdout and "shard-000000.tar" in p.stderr
    p = run_cli("shard", tmp_path / "nothing", tmp_path / "out2", check=False)
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("shard", src, tmp_path / "out3", "--size", "big", check=False)
    assert p.returncode == 2 and "--size" in p.stderr


def test_shards_extract_features_equal_the_folder(tmp_path):
    from conftest import GOLDEN

    from ijepa_fast.checkpoint.format import encoder_from_checkpoint
    from ijepa_fast.data import open_images
    from ijepa_fast.eval import extract

    ckpt = GOLDEN / "ref_ckpt_tiny.pth.tar"
    gold = torch.load(GOLDEN / "ref_step_tiny.pt", weights_only=False)
    enc = encoder_from_checkpoint(ckpt, num_heads=gold["config"]["num_heads"])
    img = enc.patch_size * enc.grid[0]
    src = image_folder(tmp_path / "imgs", per_class=2)
    write_shards(src, tmp_path / "shards")
    a = extract(enc, open_images(src), img=img, batch_size=4, progress=False)
    b = extract(enc, open_images(tmp_path / "shards"), img=img, batch_size=4, progress=False)
    assert isinstance(open_images(tmp_path / "shards"), ShardImages) and len(a) == len(b) == 6
    assert torch.equal(a.features, b.features) and torch.equal(a.labels, b.labels)
    assert [n.rsplit("/", 1)[-1] for n in a.meta["skipped"]] == [n.rsplit("/", 1)[-1] for n in b.meta["skipped"]]
    assert len(b.meta["skipped"]) == 1
