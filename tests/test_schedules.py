import math

import pytest

from ijepa_fast.training.schedules import Schedules, cosine_weight_decay, ema_momentum, warmup_cosine_lr


def test_schedules_lr_closed_form():
    kw = dict(warmup_steps=10, total_steps=110, start_lr=2e-4, ref_lr=1e-3, final_lr=1e-6)
    # iteration s uses the value at count s + 1 (the released scheduler steps before the step)
    assert warmup_cosine_lr(0, **kw) == pytest.approx(2e-4 + 0.1 * 8e-4)
    assert warmup_cosine_lr(4, **kw) == pytest.approx(2e-4 + 0.5 * 8e-4)
    assert warmup_cosine_lr(9, **kw) == pytest.approx(1e-3)  # count 10: cosine at progress 0
    for s in range(9, 110):
        t = (s + 1 - 10) / 100
        assert warmup_cosine_lr(s, **kw) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * t)))
    assert warmup_cosine_lr(59, **kw) == pytest.approx((1e-3 + 1e-6) / 2)
    assert warmup_cosine_lr(500, **kw) >= 1e-6  # never below final_lr


def test_schedules_weight_decay_closed_form():
    for s in range(100):
        p = (s + 1) / 100
        expected = 0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * p))
        assert cosine_weight_decay(s, 100, 0.04, 0.4) == pytest.approx(expected)
    assert cosine_weight_decay(49, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine_weight_decay(300, 100, 0.04, 0.4) == pytest.approx(0.4)  # held at the end


def test_schedules_momentum_linear_and_cosine():
    assert ema_momentum(0, 1000) == pytest.approx(0.996)
    assert ema_momentum(250, 1000) == pytest.approx(0.997)
    assert ema_momentum(1000, 1000) == pytest.approx(1.0)
    assert ema_momentum(5000, 1000) == pytest.approx(1.0)
    assert ema_momentum(0, 1000, kind="cosine") == pytest.approx(0.996)
    assert ema_momentum(500, 1000, kind="cosine") == pytest.approx(0.998)
    assert ema_momentum(250, 1000, kind="cosine") == pytest.approx(1 - 0.004 * 0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ValueError):
        ema_momentum(1, 10, kind="step")


def test_schedules_from_epochs():
    s = Schedules(steps_per_epoch=625, epochs=300, warmup=40)
    assert s.total_steps == 187500
    assert s.lr_at(40 * 625 - 1) == pytest.approx(1e-3)
    assert s.lr_at(s.total_steps - 1) == pytest.approx(1e-6, abs=1e-9)
    assert s.momentum_at(s.total_steps) == pytest.approx(1.0)
    s2 = Schedules(steps_per_epoch=10, epochs=10, ipe_scale=1.25)
    assert s2.total_steps == 125
