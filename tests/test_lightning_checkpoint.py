"""A Lightning checkpoint of IJEPAModule is a checkpoint like any other: read into the published
layout, and taken by extract, export, the hub entry points and run.resume."""
import sys

import pytest
import torch
from conftest import ROOT, run_cli
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch", reason="PyTorch Lightning is not installed (pip install lightning)")

from ijepa_fast import IJEPA, Schedules  # noqa: E402
from ijepa_fast.checkpoint.format import encoder_from_checkpoint, read_checkpoint, strip_prefix  # noqa: E402
from ijepa_fast.cli import main  # noqa: E402
from ijepa_fast.config import MaskConfig  # noqa: E402
from ijepa_fast.errors import CheckpointUnreadable  # noqa: E402
from ijepa_fast.lightning import IJEPAModule  # noqa: E402

# the demo config's model, so that `ijepa-fast train` can resume from the Lightning checkpoint
MODEL = ["model.name=custom", "model.embed_dim=128", "model.depth=4", "model.num_heads=4", "model.patch_size=4",
         "model.pred_depth=2", "model.pred_dim=64"]


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=2, pred_dim=64, embed_dim=128, depth=4,
                        num_heads=4)
    module = IJEPAModule(model, Schedules(steps_per_epoch=2, epochs=4), mask=MaskConfig(min_keep=4), seed=1)
    data = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(TensorDataset(data), batch_size=4, collate_fn=module.collate_fn()))
    path = tmp_path_factory.mktemp("lightning") / "last.ckpt"
    trainer.save_checkpoint(path)
    return path, module.model


def test_lightning_checkpoint_reads_into_the_published_layout(lightning_ckpt):
    path, model = lightning_ckpt
    ckpt = read_checkpoint(path)
    for name in ("encoder", "predictor", "target_encoder"):
        own = getattr(model, name).state_dict()
        got = strip_prefix(ckpt[name])
        assert set(got) == set(own) and all(k.startswith("module.") for k in ckpt[name])
        assert all(torch.equal(got[k], own[k]) for k in own)
    assert not torch.equal(strip_prefix(ckpt["encoder"])["blocks.0.attn.qkv.weight"],
                           strip_prefix(ckpt["target_encoder"])["blocks.0.attn.qkv.weight"])  # trained, EMA apart
    assert ckpt["epoch"] == 1 and ckpt["opt"]["state"] and ckpt["ijepa_fast"]["rng"]


def test_lightning_checkpoint_in_extract_export_and_hub(lightning_ckpt, tmp_path, capsys):
    path, model = lightning_ckpt
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model.target_encoder(images)
        got = encoder_from_checkpoint(path)(images)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    sys.path.insert(0, str(ROOT))
    try:
        import hubconf
    finally:
        sys.path.remove(str(ROOT))
    with torch.no_grad():
        torch.testing.assert_close(hubconf.encoder(str(path), which="encoder")(images), model.encoder(images))
    assert main(["export", str(path), str(tmp_path / "enc.safetensors")]) == 0
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "enc.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in model.target_encoder.state_dict().items())
    from PIL import Image

    from ijepa_fast.data.demo import DemoImages

    src = tmp_path / "imgs" / "a"
    src.mkdir(parents=True)
    for i, img in enumerate(DemoImages(3, 32).images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(src / f"{i}.png")
    capsys.readouterr()
    assert main(["extract", str(path), "--data", str(tmp_path / "imgs"), "--layers", "2", "--workers", "0",
                 "--device", "cpu", "--out", str(tmp_path / "f.safetensors")]) == 0
    assert "features (3, 256)" in capsys.readouterr().out


def test_train_resumes_from_a_lightning_checkpoint(lightning_ckpt, tmp_path):
    path, _ = lightning_ckpt
    proc = run_cli("train", "--run-dir", tmp_path / "run", "--steps", "33", f"run.resume={path}",
                   "run.progress=false", "run.plot=false", "run.monitor_every=0", *MODEL, cwd=tmp_path)
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"resumed from {path} at step 32" in log, proc.stderr[-2000:]
    assert torch.load(tmp_path / "run" / "jepa-latest.pth.tar", weights_only=True)["ijepa_fast"]["step"] == 33


def test_a_lightning_checkpoint_of_something_else_is_refused(tmp_path):
    torch.save({"state_dict": {"net.weight": torch.zeros(2)}, "epoch": 0, "global_step": 0}, tmp_path / "x.ckpt")
    with pytest.raises(CheckpointUnreadable, match="Lightning checkpoint without an I-JEPA encoder"):
        read_checkpoint(tmp_path / "x.ckpt")
