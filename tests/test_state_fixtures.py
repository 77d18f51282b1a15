"""State files written by an earlier version of the engine (tests/fixtures/, made by make_state_fixtures.py)
still load and continue: a run-folder checkpoint, an Engine state and a Lightning checkpoint."""
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from fixtures.make_state_fixtures import TRAIN, images, tiny_model

from ijepa_fast import Engine, MaskConfig, Schedules, encoder_from_checkpoint, read_checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def files(kind: str) -> list[Path]:
    found = sorted(FIXTURES.glob(f"{kind}_v*.*[!l]"))  # not the .yaml beside a trainer checkpoint
    assert found, f"no {kind} fixture in {FIXTURES}"
    return found


@pytest.mark.parametrize("path", files("trainer"), ids=lambda p: p.name)
def test_run_checkpoint_reads_and_resumes(path, tmp_path):
    ckpt = read_checkpoint(path)
    assert ckpt["ijepa_fast"]["step"] == 3 and set(ckpt) >= {"encoder", "predictor", "target_encoder", "opt"}
    enc = encoder_from_checkpoint(path)
    assert enc.embed_dim == 32 and len(enc.blocks) == 2
    p = run_cli("train", "--run-dir", tmp_path / "run", "--steps", 5, *TRAIN, f"run.resume={path}")
    assert "at step 3" in p.stderr
    after = torch.load(tmp_path / "run" / "jepa-latest.pth.tar", weights_only=True)
    assert after["ijepa_fast"]["step"] == 5
    k = "module.blocks.0.attn.qkv.weight"
    assert not torch.equal(after["encoder"][k], ckpt["encoder"][k])  # it trained on from the old weights


@pytest.mark.parametrize("path", files("engine"), ids=lambda p: p.name)
def test_engine_state_loads_and_steps(path):
    state = torch.load(path, weights_only=True)
    engine = Engine(tiny_model(seed=7), Schedules(10, 2, 1), mask=MaskConfig(min_keep=4), seed=3)
    engine.load_state_dict(state)
    assert engine.next_step == 2
    for k, v in engine.model.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    result = engine.step(images(2))
    assert torch.isfinite(torch.tensor(result.loss)) and engine.next_step == 3


@pytest.mark.parametrize("path", files("lightning"), ids=lambda p: p.name)
def test_lightning_checkpoint_resumes(path, tmp_path):
    L = pytest.importorskip("lightning")
    from ijepa_fast.lightning import IJEPAModule

    module = IJEPAModule(tiny_model(seed=7), Schedules(10, 2, 1), mask=MaskConfig(min_keep=4), seed=3)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat([images(s) for s in range(3)])),
                                       batch_size=4)
    trainer = L.Trainer(max_steps=3, max_epochs=2, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, data, ckpt_path=str(path))
    assert trainer.global_step == 3
    saved = torch.load(path, weights_only=False)["state_dict"]
    k = next(k for k in saved if k.endswith("blocks.0.attn.qkv.weight"))
    assert not torch.equal(module.state_dict()[k], saved[k])
