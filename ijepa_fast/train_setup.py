"""The trainer's set-up helpers: the process's device, the learning rates scaled to the global batch,
the token buckets compiled before training, and the run's opening log lines."""
from __future__ import annotations

import torch

from . import __version__, distributed
from .config import Config
from .kernels.dispatch import describe as describe_kernels
from .models.varlen import describe as describe_attention
from .runlog import log


def resolve_device(spec: str, env: distributed.DistEnv | None = None) -> torch.device:
    """'auto' -> the process's GPU (cuda:LOCAL_RANK under a launcher) or the CPU."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", (env.local_rank if env else 0) % torch.cuda.device_count())
        return torch.device("cpu")
    from .errors import ConfigError

    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"run.device={spec!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device={spec}: CUDA is not available here; use run.device=cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"run.device={spec}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0 ..)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"run.device={spec}: training runs on cpu or cuda")
    return dev


def scaled_optim(cfg: Config, global_batch: int):
    """The optimisation settings with the learning rates scaled as optim.lr_scaling says."""
    import dataclasses

    o = cfg.optim
    if o.lr_scaling == "none":
        return o, 1.0
    f = global_batch / o.base_batch
    return dataclasses.replace(o, lr=o.lr * f, start_lr=o.start_lr * f, final_lr=o.final_lr * f), f


def warm_up_buckets(trainer, batches: int = 32, force: bool = False) -> int:
    """With token buckets and compile (``perf.token_buckets``, ``perf.compile``): one forward and
    backward per distinct bucketed shape among the masks of the next ``batches`` steps, so that the
    static-shape blocks compile before training rather than on the first step of each bucket.
    Zero images, the step's precision; weights, gradients, optimiser and random state untouched.
    Returns the number of shapes compiled (0 when the switches are off and ``force`` is not set)."""
    import time

    from . import perf
    from .step import autocast_dtype, micro_batches

    c = trainer.cfg
    if not force and not (c.perf.compile and c.perf.token_buckets):
        return 0
    b = c.data.batch_size
    dtype = trainer.master.dtype if trainer.master is not None else torch.float32
    images = torch.zeros(b, 3, c.data.crop_size, c.data.crop_size, device=trainer.device, dtype=dtype)
    # the micro-batches' masks exactly as the step slices them (a slice keeps its batch's padded length)
    masks = [m for i in range(batches)
             for _, m in micro_batches(images, trainer.sampler.sample(b, trainer.step + i), c.optim.accum_steps)]
    half = None if trainer.master is not None else autocast_dtype(trainer.device, c.run.precision)
    t0 = time.time()
    with torch.autocast(trainer.device.type, dtype=half or torch.float32, enabled=half is not None):
        n = perf.warm_up(trainer.run_model, images, masks)
    log.info(f"token buckets: {n} block shapes compiled before training in {time.time() - t0:.1f} s "
             f"(the masks of the next {batches} steps)")
    return n


def describe_run(trainer) -> None:
    """The run's opening log lines: versions, kernels, attention, masks, folder, model, data."""
    c, m = trainer.cfg, trainer.model
    n_enc = sum(p.numel() for p in m.encoder.parameters())
    n_pred = sum(p.numel() for p in m.predictor.parameters())
    log.info(f"ijepa-fast {__version__} | torch {torch.__version__} | device {trainer.device} | "
             f"precision {c.run.precision} | threads {torch.get_num_threads()}")
    log.info(describe_kernels(c.model.kernels, trainer.device) + (" | deterministic" if c.run.deterministic else ""))
    half = trainer.device.type == "cuda" and (c.perf.bf16_weights or c.run.precision in ("auto", "bf16"))
    log.info(describe_attention(c.model.attn, c.model.layout, c.model.varlen_attn, trainer.device, half))
    native = trainer.sampler.native()  # built (once, cached) before data-loader workers fork
    log.info(f"mask sampler: {'compiled (csrc/)' if native is not None else 'Python'}, mode {c.mask.mode}")
    log.info(f"run folder: {trainer.run_dir}")
    log.info(f"model {c.model.name}/{c.model.patch_size} at {c.data.crop_size}px (grid {m.grid[0]}x{m.grid[1]}): "
             f"encoder {n_enc / 1e6:.2f}M params, predictor {n_pred / 1e6:.2f}M "
             f"({c.model.pred_depth}x{c.model.pred_dim}); attention {c.model.attn}; loss {c.optim.loss}")
    scaling = ("not scaled" if c.optim.lr_scaling == "none" else
               f"scaled x{trainer.lr_factor:.3g} (global batch / {c.optim.base_batch})")
    log.info(f"data: {trainer.source.root}: {len(trainer.source)} images; global batch {trainer.global_batch} = "
             f"{c.data.batch_size} x {trainer.world} process(es)"
             + (f" ({c.optim.accum_steps} micro-batches each)" if c.optim.accum_steps > 1 else "")
             + f"; {trainer.steps_per_epoch} steps/epoch x {c.optim.epochs} epochs; peak lr "
             f"{trainer.schedules.lr:.3g} ({scaling}); masks {c.mask.mode}; parallelism {trainer.strategy}")
