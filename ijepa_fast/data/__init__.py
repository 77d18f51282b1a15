"""Data: image sources (folder, generated demo), augmentation and the step-indexed loader."""
from __future__ import annotations

from .images import DataError, FolderImages, decode, scan_folder
from .loader import Batch, StepBatches, make_loader
from .transforms import TrainTransform

__all__ = ["Batch", "DataError", "FolderImages", "StepBatches", "TrainTransform", "build_source", "decode",
           "make_loader", "scan_folder", "transform_from_config"]


def build_source(data_cfg, seed: int = 0):
    """The image source a DataConfig names (checked before training starts)."""
    if data_cfg.source == "demo":
        from .demo import DemoImages
        return DemoImages(data_cfg.demo_images, data_cfg.demo_size, seed)
    if not data_cfg.path:
        raise DataError("data.path is not set: pass --data DIR or data.path=/path/to/images "
                        "(or data.source=demo for the generated demo set)")
    return FolderImages(data_cfg.path)


def transform_from_config(data_cfg, seed: int = 0) -> TrainTransform:
    return TrainTransform(data_cfg.crop_size, tuple(data_cfg.crop_scale), tuple(data_cfg.crop_ratio),
                          data_cfg.hflip, tuple(data_cfg.mean), tuple(data_cfg.std), seed)
