"""hubconf.py (in the checkout, not the wheel): torch.hub.load(..., source="local") builds our
encoders from local checkpoints only, with the features encoder_from_checkpoint gives."""
import pytest
import torch
from conftest import ROOT

from ijepa_fast import IJEPA, CheckpointError, encoder_from_checkpoint
from ijepa_fast.checkpoint.format import add_prefix
from ijepa_fast.models import build_encoder

pytestmark = pytest.mark.skipif(not (ROOT / "hubconf.py").is_file(),
                                reason="hubconf.py is in the source checkout, not the installed package")


def hub(name, **kw):
    return torch.hub.load(str(ROOT), name, source="local", **kw)


def test_hub_encoder_from_a_custom_checkpoint(tmp_path):
    model = IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=1, pred_dim=24, embed_dim=48, depth=2,
                        num_heads=3)
    with torch.no_grad():
        for p in model.target_encoder.parameters():  # a target encoder that differs from the context encoder
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "tiny.pth.tar"
    torch.save({**{n: add_prefix(getattr(model, n).state_dict()) for n in ("encoder", "predictor", "target_encoder")},
                "ijepa_fast": {"num_heads": 3}}, path)
    x = torch.randn(2, 3, 32, 32)
    for which in ("target_encoder", "encoder"):
        got = hub("encoder", checkpoint=str(path), which=which)
        want = encoder_from_checkpoint(path, which).eval()
        assert got.num_heads == 3
        with torch.no_grad():
            torch.testing.assert_close(got(x), want(x), rtol=0, atol=0)
            torch.testing.assert_close(got(x), getattr(model, which).eval()(x), rtol=0, atol=0)
    assert not torch.equal(hub("encoder", checkpoint=str(path))(x), hub("encoder", checkpoint=str(path),
                                                                        which="encoder")(x))


def test_hub_named_sizes_check_the_checkpoint(tmp_path):
    enc = build_encoder("vit_tiny", 32, 16)
    path = tmp_path / "vit_tiny16.pth.tar"
    torch.save({"target_encoder": add_prefix(enc.state_dict())}, path)
    got = hub("vit_tiny16", checkpoint=str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(got(x), encoder_from_checkpoint(path).eval()(x), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="not vit_base with patch 16"):
        hub("vit_base16", checkpoint=str(path))
    fresh = hub("vit_small16", img_size=32)  # no checkpoint: freshly initialised, nothing downloaded
    assert (fresh.embed_dim, len(fresh.blocks), fresh.patch_size) == (384, 12, 16)


def test_hub_named_size_on_an_odd_width_says_which_entry_point_fits(tmp_path):
    """A width no head count of the named size divides: a CheckpointError naming the 'encoder' entry point."""
    model = IJEPA.build("custom", img_size=32, patch_size=8, pred_depth=1, pred_dim=16, embed_dim=40, depth=2,
                        num_heads=4)
    path = tmp_path / "odd.pth.tar"
    torch.save({n: add_prefix(getattr(model, n).state_dict()) for n in ("encoder", "predictor", "target_encoder")},
               path)
    with pytest.raises(CheckpointError, match="does not hold a vit_base encoder with patch 16 .*'encoder' entry"):
        hub("vit_base16", checkpoint=str(path))
    assert hub("encoder", checkpoint=str(path), num_heads=4).embed_dim == 40
