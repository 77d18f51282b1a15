"""Learning-rate, weight-decay and EMA-momentum schedules as plain functions of the step.

``step`` is the 0-based index of the training iteration. The values are those the released
code uses at that iteration: its LR and weight-decay schedulers advance once *before* each step
(so iteration ``step`` sees their value at count ``step + 1``), and its momentum generator yields
its value for count ``step`` after the step. Past the end of a schedule (``ipe_scale < 1``, or
steps beyond the planned run) every value is held at its final value, where the released code's
cosines would turn back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def warmup_cosine_lr(step: int, warmup_steps: int, total_steps: int, start_lr: float, ref_lr: float,
                     final_lr: float) -> float:
    """Linear warm-up from start_lr to ref_lr over warmup_steps, then cosine to final_lr at total_steps."""
    t = step + 1
    if t < warmup_steps:
        return start_lr + t / max(1, warmup_steps) * (ref_lr - start_lr)
    progress = min(1.0, (t - warmup_steps) / max(1, total_steps - warmup_steps))
    return max(final_lr, final_lr + (ref_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def cosine_weight_decay(step: int, total_steps: int, start_wd: float, final_wd: float) -> float:
    """Cosine from start_wd to final_wd over total_steps, then held at final_wd."""
    progress = min(1.0, (step + 1) / total_steps)
    wd = final_wd + (start_wd - final_wd) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(final_wd, wd) if final_wd <= start_wd else min(final_wd, wd)


def ema_momentum(step: int, total_steps: float, start: float = 0.996, end: float = 1.0,
                 kind: str = "linear") -> float:
    """EMA momentum: 'linear' (released code) or 'cosine' (paper text) from start to end."""
    progress = min(step / total_steps, 1.0)
    if kind == "linear":
        return start + progress * (end - start)
    if kind == "cosine":
        return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown momentum schedule {kind!r}; use 'linear' or 'cosine'")


@dataclass
class Schedules:
    """The three schedules of a run, from its optimisation settings and iterations per epoch."""

    steps_per_epoch: int
    epochs: int
    warmup: float = 40.0
    start_lr: float = 2e-4
    lr: float = 1e-3
    final_lr: float = 1e-6
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    ipe_scale: float = 1.0
    ema: tuple = (0.996, 1.0)
    ema_schedule: str = "linear"

    @classmethod
    def from_config(cls, optim, steps_per_epoch: int) -> Schedules:
        return cls(steps_per_epoch, optim.epochs, optim.warmup, optim.start_lr, optim.lr, optim.final_lr,
                   optim.weight_decay, optim.final_weight_decay, optim.ipe_scale, tuple(optim.ema),
                   optim.ema_schedule)

    @property
    def total_steps(self) -> int:
        """Steps the LR and weight-decay schedules span."""
        return int(self.ipe_scale * self.epochs * self.steps_per_epoch)

    def lr_at(self, step: int) -> float:
        warm = int(self.warmup * self.steps_per_epoch)
        return warmup_cosine_lr(step, warm, self.total_steps, self.start_lr, self.lr, self.final_lr)

    def wd_at(self, step: int) -> float:
        return cosine_weight_decay(step, self.total_steps, self.weight_decay, self.final_weight_decay)

    def momentum_at(self, step: int) -> float:
        span = self.steps_per_epoch * self.epochs * self.ipe_scale
        return ema_momentum(step, span, self.ema[0], self.ema[1], self.ema_schedule)

    def apply(self, optimizer, step: int) -> tuple[float, float]:
        """Set this step's LR on every group and weight decay on groups not flagged WD_exclude."""
        lr, wd = self.lr_at(step), self.wd_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
            if not group.get("WD_exclude", False):
                group["weight_decay"] = wd
        return lr, wd
