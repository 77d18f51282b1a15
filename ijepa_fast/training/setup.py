"""The trainer's set-up helpers: the process's device, the learning rates scaled to the global batch,
and the run's opening log lines (from values)."""
from __future__ import annotations

import torch

from .. import __version__
from ..config import Config
from ..kernels.dispatch import describe as describe_kernels
from ..models.varlen import describe as describe_attention
from ..runlog.output import log
from . import distributed


def resolve_device(spec: str, env: distributed.DistEnv | None = None, *, setting: str = "run.device") -> torch.device:
    """'auto' -> the process's GPU (cuda:LOCAL_RANK under a launcher) or the CPU; anything else checked
    against this machine, a ConfigError naming ``setting`` (a config key, or a flag such as '--device')."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", (env.local_rank if env else 0) % torch.cuda.device_count())
        return torch.device("cpu")
    from ..errors import ConfigError

    def named(value: str) -> str:
        return f"{setting} {value}" if setting.startswith("--") else f"{setting}={value}"

    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"{named(repr(spec))} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{named(spec)}: CUDA is not available here; use {named('cpu')} or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"{named(spec)}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0 ..)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"{named(spec)}: use cpu or cuda")
    return dev


def scaled_optim(cfg: Config, global_batch: int):
    """The optimisation settings with the learning rates scaled as optim.lr_scaling says."""
    import dataclasses

    o = cfg.optim
    if o.lr_scaling == "none":
        return o, 1.0
    f = global_batch / o.base_batch
    return dataclasses.replace(o, lr=o.lr * f, start_lr=o.start_lr * f, final_lr=o.final_lr * f), f


def describe_run(cfg: Config, device: torch.device, model, *, native_sampler: bool, run_dir, data: tuple,
                 world: int, steps_per_epoch: int, peak_lr: float, lr_factor: float, strategy: str) -> None:
    """The run's opening log lines: versions, kernels, attention, masks, folder, model, data.
    ``data``: (the image source's folder or None, its number of images); ``cfg.perf`` resolved."""
    c, m = cfg, model
    n_enc = sum(p.numel() for p in m.encoder.parameters())
    n_pred = sum(p.numel() for p in m.predictor.parameters())
    log.info(f"ijepa-fast {__version__} | torch {torch.__version__} | device {device} | "
             f"precision {c.run.precision} | threads {torch.get_num_threads()}")
    log.info(describe_kernels(c.model.kernels, device) + (" | deterministic" if c.run.deterministic else ""))
    half = device.type == "cuda" and (c.perf.bf16_weights is True or c.run.precision in ("auto", "bf16"))
    log.info(describe_attention(c.model.attn, c.model.layout, c.model.varlen_attn, device, half))
    log.info(f"mask sampler: {'compiled (csrc/)' if native_sampler else 'Python'}, mode {c.mask.mode}")
    log.info(f"run folder: {run_dir}")
    log.info(f"model {c.model.name}/{c.model.patch_size} at {c.data.crop_size}px (grid {m.grid[0]}x{m.grid[1]}): "
             f"encoder {n_enc / 1e6:.2f}M params, predictor {n_pred / 1e6:.2f}M "
             f"({c.model.pred_depth}x{c.model.pred_dim}); attention {c.model.attn}; loss {c.optim.loss}")
    scaling = ("not scaled" if c.optim.lr_scaling == "none" else
               f"scaled x{lr_factor:.3g} (global batch / {c.optim.base_batch})")
    root, n_images = data
    log.info(f"data: {root}: {n_images} images; global batch {c.data.batch_size * world} = "
             f"{c.data.batch_size} x {world} process(es)"
             + (f" ({c.optim.accum_steps} micro-batches each)" if c.optim.accum_steps > 1 else "")
             + f"; {steps_per_epoch} steps/epoch x {c.optim.epochs} epochs; peak lr "
             f"{peak_lr:.3g} ({scaling}); masks {c.mask.mode}; parallelism {strategy}")
