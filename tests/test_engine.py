"""ijepa_fast.Engine: the run as one module for someone else's loop. Its steps are train_step's, and
its state_dict resumes bit-exactly (plain and bf16-weights paths)."""
import io

import pytest
import torch

from ijepa_fast import IJEPA, Engine, MaskConfig, PerfConfig, Schedules
from ijepa_fast.masks import MultiBlockSampler
from ijepa_fast.step import make_optimizer, train_step

SCHED = Schedules(steps_per_epoch=4, epochs=2, warmup=1, start_lr=1e-4, lr=1e-3, final_lr=1e-6)
MASKS = MaskConfig(min_keep=4)


def model(seed=0):
    torch.manual_seed(seed)
    return IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=1, pred_dim=24, embed_dim=48, depth=2,
                       num_heads=3, attn="math")


def images(step):
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(100 + step))


def weights(m) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_engine_steps_are_train_steps():
    engine = Engine(model(), SCHED, mask=MASKS, seed=3, precision="fp32")
    ref = model()
    opt = make_optimizer(ref)
    sampler = MultiBlockSampler(ref.grid, MASKS, seed=3)
    for step in range(3):
        a = engine.step(images(step))
        b = train_step(ref, opt, images(step), sampler.sample(4, step), step, SCHED, precision="fp32")
        assert (a.loss, a.lr, a.wd, a.momentum) == (b.loss, b.lr, b.wd, b.momentum)
    assert engine.next_step == 3
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in engine.model.state_dict().items())
    masks = engine.masks(4, 7)
    torch.testing.assert_close(engine(images(7), masks), ref.loss(images(7), masks))  # the plain loss


@pytest.mark.parametrize("bf16", [False, True])
def test_engine_state_dict_resumes_bit_exactly(bf16):
    def make(seed):
        return Engine(model(seed), SCHED, mask=MASKS, seed=3, precision="fp32", perf=PerfConfig(bf16_weights=bf16))

    straight = make(0)
    for step in range(6):
        straight.step(images(step))
    first = make(0)
    for step in range(3):
        first.step(images(step))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = make(seed=1)  # other initial weights: everything must come from the state
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.next_step == 3
    for _ in range(3):
        resumed.step(images(resumed.next_step))
    want, got = weights(straight.model), weights(resumed.model)
    assert all(torch.equal(got[k], want[k]) for k in want)
    for i, st in straight.optimizer.state_dict()["state"].items():
        assert torch.equal(st["exp_avg_sq"], resumed.optimizer.state_dict()["state"][i]["exp_avg_sq"])
    with pytest.raises(ValueError, match="not an Engine state"):
        resumed.load_state_dict({"model": {}})


def test_engine_parameters_are_the_models_once():
    engine = Engine(model(), SCHED, mask=MASKS, perf=PerfConfig(bf16_weights=True))
    assert {id(p) for p in engine.parameters()} == {id(p) for p in engine.model.parameters()}
