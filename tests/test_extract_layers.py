"""The linear-probe protocol's features: the average-pooled outputs of the last N blocks, concatenated
(N x the width; N=1 is the pooled output), from extract, the command line and probe."""
import json

import pytest
import torch
from PIL import Image

from ijepa_fast.checkpoint.format import add_prefix, save_atomic
from ijepa_fast.cli import main
from ijepa_fast.data.demo import DemoImages
from ijepa_fast.eval import encode, extract, load
from ijepa_fast.models import VisionTransformer


def _encoder(seed=0, depth=5):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=depth, num_heads=4).eval()


def _by_hand(enc, images, n):
    """Block by block, without hooks: the encoder's final norm on each of the last n outputs, pooled."""
    x = enc.patch_embed(images) + enc.pos_embed
    outs = []
    for blk in enc.blocks:
        x = blk(x, None)
        outs.append(enc.norm(x).mean(1))
    return torch.cat(outs[len(outs) - n:], dim=-1)


@pytest.mark.parametrize("n", [1, 2, 4, 5])
def test_encode_last_n_blocks_equals_the_blocks_by_hand(n):
    enc = _encoder(seed=n)
    images = torch.randn(3, 3, 32, 32)
    pooled, tokens = encode(enc, images, tokens=True, layers=n)
    assert pooled.shape == (3, n * 48)
    torch.testing.assert_close(pooled, _by_hand(enc, images, n), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        out = enc(images)
    torch.testing.assert_close(pooled[:, -48:], out.mean(1), rtol=0, atol=0)  # the last slice: today's features
    torch.testing.assert_close(tokens, out, rtol=0, atol=0)
    assert all(not b._forward_hooks for b in enc.blocks)  # the hooks are gone afterwards


def test_encode_layers_out_of_range():
    with pytest.raises(ValueError, match="--layers 6: the encoder has 5 blocks"):
        encode(_encoder(), torch.randn(1, 3, 32, 32), layers=6)
    with pytest.raises(ValueError, match="--layers 0"):
        extract(_encoder(), DemoImages(4, 32), img=32, layers=0, progress=False)


def test_extract_layers_4_is_4_x_width_and_layers_1_is_todays():
    enc, source = _encoder(seed=3), DemoImages(10, 40, seed=1)
    one = extract(enc, source, img=32, batch_size=4, progress=False)
    four = extract(enc, source, img=32, batch_size=4, progress=False, layers=4)
    assert one.features.shape == (10, 48) and four.features.shape == (10, 4 * 48)
    assert four.meta["layers"] == 4 and one.meta["layers"] == 1 and one.meta["pool"] == "avg"
    torch.testing.assert_close(four.features[:, -48:], one.features, rtol=0, atol=0)
    assert torch.equal(four.labels, one.labels) and four.files == one.files


def test_cli_extract_layers_then_probe(tmp_path, capsys):
    enc = _encoder(seed=7, depth=4)
    save_atomic({"encoder": add_prefix(enc.state_dict()), "target_encoder": add_prefix(enc.state_dict()),
                 "ijepa_fast": {"num_heads": 4}}, tmp_path / "c.pth.tar")
    colours = [(220, 40, 40), (40, 200, 60), (50, 60, 220)]
    for split, n in (("train", 6), ("val", 3)):
        for c, col in enumerate(colours):
            d = tmp_path / "data" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 40), tuple(min(255, v + 4 * i) for v in col)).save(d / f"{i}.png")
    for split in ("train", "val"):
        assert main(["extract", str(tmp_path / "c.pth.tar"), "--data", str(tmp_path / "data" / split), "--layers",
                     "4", "--workers", "0", "--device", "cpu", "--out", str(tmp_path / f"{split}.safetensors")]) == 0
    assert "features (18, 192)" in capsys.readouterr().out
    tr = load(tmp_path / "train.safetensors")
    assert tr.features.shape == (18, 4 * 48) and tr.meta["layers"] == 4
    assert main(["probe", "linear", "--train", str(tmp_path / "train.safetensors"), "--val",
                 str(tmp_path / "val.safetensors"), "--epochs", "30"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["val_images"] == 9 and res["top1"] == 100.0
    # features of one width against another: the error names --layers
    assert main(["extract", str(tmp_path / "c.pth.tar"), "--data", str(tmp_path / "data" / "val"), "--workers", "0",
                 "--device", "cpu", "--out", str(tmp_path / "val1.safetensors")]) == 0
    capsys.readouterr()
    assert main(["probe", "linear", "--train", str(tmp_path / "train.safetensors"), "--val",
                 str(tmp_path / "val1.safetensors")]) == 2
    assert "--layers (here 4 and 1)" in capsys.readouterr().err
