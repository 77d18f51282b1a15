"""The collapse monitor measures the target features and warns when they collapse."""
import logging
from types import SimpleNamespace

import torch

from ijepa_fast.data.demo import DemoImages
from ijepa_fast.model import IJEPA
from ijepa_fast.training.monitor import CollapseMonitor


def _monitor(every=5):
    cfg = SimpleNamespace(monitor_every=every, monitor_images=64, collapse_std=0.01, collapse_rank=0.25)
    return CollapseMonitor(DemoImages(80, 48, seed=0), 32, cfg, seed=0, device=torch.device("cpu"))


def test_monitor_measures_and_warns_on_collapse(caplog):
    model = IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=1, pred_dim=32, embed_dim=64, depth=2,
                        num_heads=2)
    mon = _monitor()
    assert mon.images.shape == (64, 3, 32, 32) and mon.due(10) and not mon.due(7)
    with caplog.at_level(logging.WARNING, logger="ijepa_fast"):
        healthy = mon.measure(model)
    assert healthy["feat_std"] > 0.05 and healthy["feat_rank"] >= 1 and "collapse" not in caplog.text
    with torch.no_grad():  # collapse: every image maps to the same features
        model.target_encoder.patch_embed.proj.weight.zero_()
        model.target_encoder.patch_embed.proj.bias.zero_()
    with caplog.at_level(logging.WARNING, logger="ijepa_fast"):
        collapsed = mon.measure(model)
    assert collapsed["feat_std"] < 1e-4 and "possible collapse" in caplog.text


def test_monitor_off_and_logged_by_the_trainer(tmp_path):
    import json

    from conftest import run_cli

    assert not _monitor(every=0).due(5)
    run_cli("train", "--run-dir", tmp_path / "run", "--steps", "4", "run.monitor_every=2", "run.progress=false",
            "run.plot=false", "run.log_every=4", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
            "model.pred_depth=1", "model.pred_dim=16", "data.demo_images=64", "data.batch_size=8")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "feat_std" in r] == [2, 4]
    assert all(r["feat_rank"] >= 1 for r in rows if "feat_rank" in r)
