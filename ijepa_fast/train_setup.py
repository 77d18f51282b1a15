"""The trainer's set-up helpers: the process's device and the learning rates scaled to the global batch."""
from __future__ import annotations

import torch

from . import distributed
from .config import Config


def resolve_device(spec: str, env: distributed.DistEnv | None = None) -> torch.device:
    """'auto' -> the process's GPU (cuda:LOCAL_RANK under a launcher) or the CPU."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", (env.local_rank if env else 0) % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={spec} but CUDA is not available here; use run.device=cpu or auto")
    return dev


def scaled_optim(cfg: Config, global_batch: int):
    """The optimisation settings with the learning rates scaled as optim.lr_scaling says."""
    import dataclasses

    o = cfg.optim
    if o.lr_scaling == "none":
        return o, 1.0
    f = global_batch / o.base_batch
    return dataclasses.replace(o, lr=o.lr * f, start_lr=o.start_lr * f, final_lr=o.final_lr * f), f
