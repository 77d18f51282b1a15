"""The step is one: for the same config and seed, the bench's step, the trainer's step,
``Engine.step`` and ``IJEPAModule`` (on the CPU, fp32 compute) give identical losses and weights
over 3 steps: with fp32 weights, with a bf16 compute copy, and with the fused optimiser tail."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ijepa_fast.bench.step import BenchSpec, build_step
from ijepa_fast.model import IJEPA
from ijepa_fast.training.engine import Engine
from ijepa_fast.training.schedules import Schedules
from ijepa_fast.training.step import read_results
from ijepa_fast.training.trainer import Trainer

STEPS = 3
VARIANTS = {"fp32": {}, "bf16_weights": {"bf16_weights": True},
            "fused_tail": {"bf16_weights": True, "optimizer": "fused_tail"}}


def _losses(results) -> list[float]:
    return [r.loss for r in read_results(list(enumerate(results)))] if results[0].deferred \
        else [r.loss for r in results]


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _config(tiny_cfg, tmp_path, perf: dict):
    cfg = dataclasses.replace(tiny_cfg, perf=dataclasses.replace(tiny_cfg.perf, **perf))
    cfg.run = dataclasses.replace(cfg.run, dir=str(tmp_path / "run"), precision="fp32", monitor_every=0)
    cfg.model = dataclasses.replace(cfg.model, attn="math")  # one attention implementation for every path
    return cfg


def _bench(cfg, spe):
    spec = BenchSpec(model=cfg.model.name, patch=cfg.model.patch_size, img=cfg.data.crop_size,
                     batch=cfg.data.batch_size, pred_depth=cfg.model.pred_depth, mask_mode=cfg.mask.mode, device="cpu")
    setup = build_step(spec, STEPS, cfg.mask, base=cfg, steps_per_epoch=spe)
    return setup.images, _losses([setup.step(i) for i in range(STEPS)]), _state(setup.model), setup.engine


def _trainer(cfg, images):
    trainer = Trainer(cfg)
    b = cfg.data.batch_size
    results = [trainer._one_step(SimpleNamespace(images=images, masks=trainer.sampler.sample(b, i), step=i))
               for i in range(STEPS)]
    return _losses(results), _state(trainer.model), trainer


def _engine(cfg, images, spe):
    engine = Engine.from_config(cfg, device="cpu", schedules=Schedules.from_config(cfg.optim, spe))
    return _losses([engine.step(images, i) for i in range(STEPS)]), _state(engine.model), engine


def _lightning(cfg, images, spe):
    pl = pytest.importorskip("lightning.pytorch", reason="PyTorch Lightning is not installed")
    from ijepa_fast.lightning import IJEPAModule

    torch.manual_seed(cfg.run.seed)
    o = cfg.optim
    module = IJEPAModule(IJEPA.from_config(cfg), Schedules.from_config(o, spe), mask=cfg.mask, seed=cfg.run.seed,
                         precision=cfg.run.precision, grad_clip=o.grad_clip, lr=o.lr, weight_decay=o.weight_decay,
                         betas=o.betas, eps=o.eps, perf=cfg.perf)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(module.last_result.loss)

    loader = DataLoader(TensorDataset(images.repeat(STEPS, 1, 1, 1)), batch_size=len(images), shuffle=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    trainer.fit(module, loader)
    assert trainer.global_step == STEPS
    return losses, _state(module.model), module.engine


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bench_trainer_engine_and_lightning_run_one_step(variant, tiny_cfg, tmp_path):
    cfg = _config(tiny_cfg, tmp_path, VARIANTS[variant])
    spe = cfg.data.demo_images // cfg.data.batch_size  # the trainer's steps per epoch (one process)
    images, want, weights, bench_engine = _bench(cfg, spe)
    start = Engine.from_config(cfg, device="cpu", schedules=Schedules.from_config(cfg.optim, spe)).model.state_dict()
    assert any(not torch.equal(weights[k], v) for k, v in start.items()), "the steps changed no weight"
    assert bench_engine.perf.bf16_weights is bool(VARIANTS[variant].get("bf16_weights"))
    assert (bench_engine.tail is not None) is (variant == "fused_tail")
    for name, (losses, state, engine) in {"trainer": _trainer(cfg, images)[:2] + (None,),
                                          "engine": _engine(cfg, images, spe),
                                          "lightning": _lightning(cfg, images, spe)}.items():
        assert len(losses) == STEPS and losses == want, f"{name}: losses {losses} != the bench's {want}"
        for k, v in weights.items():
            assert torch.equal(state[k], v), f"{name}: {k} differs from the bench's after {STEPS} steps"
        if engine is not None:
            assert engine.perf == bench_engine.perf, name
