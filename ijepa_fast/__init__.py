"""ijepa-fast: a kernel-optimised engine for I-JEPA pretraining.

``import ijepa_fast`` loads nothing but this file; the names below are imported on first use,
so the package imports without a GPU, a compiler or any optional package.

Library use (see README "Use from your own trainer")::

    from ijepa_fast import IJEPA, MaskConfig, MultiBlockSampler, Schedules, make_optimizer, train_step
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"


_EXPORTS = {
    "IJEPA": "model", "jepa_loss": "model", "make_optimizer": "step", "param_groups": "step",
    "train_step": "step", "StepResult": "step",
    "MaskBatch": "masks", "MultiBlockSampler": "masks", "MaskCollator": "masks",
    "Schedules": "schedules", "warmup_cosine_lr": "schedules", "cosine_weight_decay": "schedules",
    "ema_momentum": "schedules",
    "Config": "config", "ModelConfig": "config", "DataConfig": "config", "MaskConfig": "config",
    "OptimConfig": "config", "RunConfig": "config", "load_config": "config",
    "IJEPAFastError": "errors", "ConfigError": "errors", "CheckpointError": "errors", "DataError": "errors",
    "TrainingStopped": "errors",
    "VisionTransformer": "models", "VisionTransformerPredictor": "models", "build_encoder": "models",
    "build_predictor": "models",
    "load_strict": "checkpoint", "read_checkpoint": "checkpoint", "save_atomic": "checkpoint",
    "encoder_from_checkpoint": "checkpoint", "models_from_checkpoint": "checkpoint",
    "export_safetensors": "checkpoint",
    "Trainer": "train", "train": "train", "Engine": "engine", "PerfConfig": "config",
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
