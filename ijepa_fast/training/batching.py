"""The batch of a run: global batch, per-process batch, micro-batch and gradient accumulation.

Two ways to say it. Without ``data.global_batch``, ``data.batch_size`` images per process make a
step, split into ``optim.accum_steps`` micro-batches: the global batch is batch_size x processes.
With ``data.global_batch`` (the published recipes: 2048), that many images make a step whatever
the process count: each process takes global_batch / processes of them and runs them
``data.batch_size`` at a time (the micro-batch that fits its memory), accumulating gradients;
``optim.accum_steps`` is derived. 2048 on one process with ``data.batch_size=16`` is 128
micro-batches a step, the same step as 16 GPUs x 128.

The learning rates of a recipe were tuned for its global batch (``optim.base_batch``); a run at
another global batch gets a warning saying so.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int  # images per optimiser step, all processes
    per_process: int  # images per step on each process
    micro_batch: int  # images per forward and backward pass
    accum_steps: int  # micro-batches per step (per_process = micro_batch x accum_steps)
    world: int  # processes

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.per_process} x {self.world} process(es)"
                + (f", {self.accum_steps} micro-batches of {self.micro_batch} each" if self.accum_steps > 1 else ""))


def _divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def plan_batch(data, optim, world: int) -> BatchPlan:
    """The run's batches from ``data`` (a DataConfig), ``optim`` (an OptimConfig) and the process
    count; a ConfigError saying what to set when they do not fit together."""
    if data.global_batch is None:
        micro = data.batch_size // optim.accum_steps
        return BatchPlan(data.batch_size * world, data.batch_size, micro, optim.accum_steps, world)
    g = data.global_batch
    if optim.accum_steps != 1:
        raise ConfigError(f"optim.accum_steps={optim.accum_steps}: with data.global_batch the accumulation is derived; "
                          f"leave optim.accum_steps at 1 and set data.batch_size to the micro-batch that fits memory")
    if g % world:
        near = sorted({max(world, g // world * world), (g // world + 1) * world})
        raise ConfigError(f"data.global_batch={g} does not split over {world} processes: set it to a multiple of "
                          f"{world} (e.g. {' or '.join(map(str, near))})")
    per = g // world
    micro = min(data.batch_size, per)
    if per % micro:
        raise ConfigError(f"data.batch_size={data.batch_size} (the micro-batch) does not divide the {per} images each "
                          f"of {world} process(es) takes of data.global_batch={g}: set data.batch_size to a divisor "
                          f"of {per} (e.g. {_divisor_at_most(per, micro)})")
    return BatchPlan(g, per, micro, per // micro, world)


def batch_warning(plan: BatchPlan, optim) -> str | None:
    """A warning when the run's global batch is not the one the learning rates were tuned for
    (``optim.base_batch``), else None."""
    if plan.global_batch == optim.base_batch:
        return None
    lr = ("the learning rates are scaled linearly by the ratio (optim.lr_scaling=linear), which the published "
          "recipes did not check" if optim.lr_scaling == "linear" else "they are used as given")
    return (f"the global batch is {plan.global_batch} ({plan.describe()}) but the learning rates were tuned for a "
            f"global batch of {optim.base_batch} (optim.base_batch): {lr}; set data.global_batch={optim.base_batch} "
            f"to train at the recipe's batch with gradient accumulation")


def with_plan(cfg, plan: BatchPlan):
    """A copy of ``cfg`` (a Config) in the per-process terms the step runs with: ``data.batch_size``
    = the per-process batch, ``optim.accum_steps`` = the micro-batches, ``data.global_batch`` null
    (the copy plans to the same batches again)."""
    data = dataclasses.replace(cfg.data, batch_size=plan.per_process, global_batch=None)
    optim = dataclasses.replace(cfg.optim, accum_steps=plan.accum_steps)
    return dataclasses.replace(cfg, data=data, optim=optim)
