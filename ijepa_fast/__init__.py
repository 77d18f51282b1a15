"""ijepa-fast: a kernel-optimised engine for I-JEPA pretraining.

``import ijepa_fast`` loads nothing but this file; the names below are imported on first use,
so the package imports without a GPU, a compiler or any optional package.

Library use (see README "Use from your own trainer")::

    from ijepa_fast import IJEPA, MaskConfig, MultiBlockSampler, Schedules, make_optimizer, train_step
"""
from __future__ import annotations

import importlib
import sys

from ._aliases import MovedModules

__version__ = "0.1.0"

if not any(isinstance(f, MovedModules) for f in sys.meta_path):
    sys.meta_path.append(MovedModules())


_EXPORTS = {  # name -> the module it lives in, imported on first use
    "IJEPA": "model", "jepa_loss": "model",
    "make_optimizer": "training.step", "param_groups": "training.step", "train_step": "training.step",
    "StepResult": "training.step",
    "MaskBatch": "masks", "MultiBlockSampler": "masks", "MaskCollator": "masks",
    "Schedules": "training.schedules", "warmup_cosine_lr": "training.schedules",
    "cosine_weight_decay": "training.schedules", "ema_momentum": "training.schedules",
    "Config": "config", "ModelConfig": "config", "DataConfig": "config", "MaskConfig": "config",
    "OptimConfig": "config", "RunConfig": "config", "load_config": "config", "PerfConfig": "config",
    "IJEPAFastError": "errors", "ConfigError": "errors", "CheckpointError": "errors", "DataError": "errors",
    "TrainingStopped": "errors",
    "VisionTransformer": "models", "VisionTransformerPredictor": "models", "build_encoder": "models",
    "build_predictor": "models",
    "load_strict": "checkpoint.format", "read_checkpoint": "checkpoint.format", "save_atomic": "checkpoint.format",
    "encoder_from_checkpoint": "checkpoint.format", "models_from_checkpoint": "checkpoint.format",
    "export_safetensors": "checkpoint.format",
    "Trainer": "training.trainer", "train": "training.trainer",
    "Engine": "training.engine",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name == "_C":  # the compiled extension (csrc/), built at first use; None where it cannot be
        from .masks import native

        return native.load()
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ijepa_fast' has no attribute {name!r}")


def __dir__():
    return __all__
