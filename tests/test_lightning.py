"""IJEPAModule under Lightning's Trainer (CPU): its steps are train_step's (losses, weights, target
encoder), with masks from a MaskCollator or drawn by the module, and a resume through a Lightning
checkpoint continues exactly as an uninterrupted run."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch", reason="PyTorch Lightning is not installed (pip install lightning)")

from ijepa_fast import IJEPA, MaskConfig, Schedules  # noqa: E402
from ijepa_fast.lightning import IJEPAModule  # noqa: E402
from ijepa_fast.masks import MultiBlockSampler  # noqa: E402
from ijepa_fast.training.step import make_optimizer, train_step  # noqa: E402

STEPS_PER_EPOCH, EPOCHS, BATCH = 3, 2, 4
SCHED = Schedules(steps_per_epoch=STEPS_PER_EPOCH, epochs=EPOCHS, warmup=0.5, start_lr=1e-4, lr=1e-3, final_lr=1e-6)
MASKS = MaskConfig(min_keep=4)


def model(seed=0):
    torch.manual_seed(seed)
    return IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=1, pred_dim=24, embed_dim=48, depth=2,
                       num_heads=3, attn="math")


DATA = torch.randn(STEPS_PER_EPOCH * BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(7))


class Losses(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(module.last_result.loss)


def fit(module, *, epochs, collate, workers=0, ckpt_path=None, save=None):
    loader = DataLoader(TensorDataset(DATA), batch_size=BATCH, shuffle=False, num_workers=workers,
                        collate_fn=module.collate_fn() if collate else None, persistent_workers=workers > 0)
    rec = Losses()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True, callbacks=[rec])
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)
    assert trainer.global_step == epochs * STEPS_PER_EPOCH
    return rec.losses


def reference_run(steps):
    ref = model()
    opt = make_optimizer(ref)
    sampler = MultiBlockSampler(ref.grid, MASKS, seed=3)
    losses = []
    for step in range(steps):
        images = DATA[(step % STEPS_PER_EPOCH) * BATCH:][:BATCH]
        losses.append(train_step(ref, opt, images, sampler.sample(BATCH, step), step, SCHED, precision="fp32").loss)
    return ref, opt, losses


@pytest.mark.parametrize("collate", [False, True], ids=["module-masks", "collator-masks"])
def test_lightning_steps_are_train_steps(collate):
    module = IJEPAModule(model(), SCHED, mask=MASKS, seed=3, precision="fp32")
    losses = fit(module, epochs=EPOCHS, collate=collate)
    ref, opt, want = reference_run(EPOCHS * STEPS_PER_EPOCH)
    assert losses == pytest.approx(want, rel=1e-6, abs=0)
    got = module.model.state_dict()
    assert any(k.startswith("target_encoder.") for k in got)
    for k, v in ref.state_dict().items():  # the same ops in the same order: equal to fp32 rounding
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert module.last_result.lr == SCHED.lr_at(EPOCHS * STEPS_PER_EPOCH - 1)
    assert module.last_result.momentum == SCHED.momentum_at(EPOCHS * STEPS_PER_EPOCH - 1)


def test_lightning_checkpoint_resumes_exactly(tmp_path):
    """Masks from collators in two persistent workers; the resumed run starts from other weights."""
    straight = IJEPAModule(model(), SCHED, mask=MASKS, seed=3, precision="fp32")
    want = fit(straight, epochs=EPOCHS, collate=True, workers=2)
    first = IJEPAModule(model(), SCHED, mask=MASKS, seed=3, precision="fp32")
    head = fit(first, epochs=1, collate=True, workers=2, save=tmp_path / "epoch1.ckpt")
    resumed = IJEPAModule(model(seed=1), SCHED, mask=MASKS, seed=3, precision="fp32")
    tail = fit(resumed, epochs=EPOCHS, collate=True, workers=2, ckpt_path=tmp_path / "epoch1.ckpt")
    assert head + tail == want
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (m.optimizers().optimizer.state_dict()["state"] for m in (straight, resumed))
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    other = IJEPAModule(model(), SCHED, mask=MASKS, seed=4, precision="fp32")
    with pytest.raises(Exception, match="seed=3"):
        fit(other, epochs=EPOCHS, collate=False, ckpt_path=tmp_path / "epoch1.ckpt")


def test_lightning_refuses_several_processes():
    """Under a multi-process strategy the module stops at set-up, saying what to use instead."""
    from types import SimpleNamespace

    from ijepa_fast.errors import ConfigError

    module = IJEPAModule(model(), SCHED, mask=MASKS, seed=3)
    module._trainer = SimpleNamespace(global_rank=1, world_size=2)
    with pytest.raises(ConfigError, match="one process.*Engine"):
        module.setup("fit")
    module._trainer = SimpleNamespace(global_rank=0, world_size=1)
    module.setup("fit")  # one process: fine
