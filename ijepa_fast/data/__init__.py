"""Data: image sources (folder, tar shards, generated demo), augmentation and the step-indexed loader."""
from __future__ import annotations

from .images import DataError, FolderImages, decode, scan_folder
from .loader import Batch, StepBatches, make_loader
from .transforms import TrainTransform

__all__ = ["Batch", "DataError", "FolderImages", "StepBatches", "TrainTransform", "build_loader", "build_source",
           "decode",
           "make_loader", "open_images", "scan_folder", "transform_from_config"]


def build_source(data_cfg, seed: int = 0):
    """The image source a DataConfig names (checked before training starts)."""
    if data_cfg.source == "demo":
        from .demo import DemoImages
        return DemoImages(data_cfg.demo_images, data_cfg.demo_size, seed)
    if data_cfg.source == "digits":
        from .digits import DigitsImages
        return DigitsImages(data_cfg.demo_size)
    if not data_cfg.path:
        raise DataError("data.path is not set: pass --data DIR or data.path=/path/to/images "
                        "(or data.source=demo for the generated demo set)")
    return open_images(data_cfg.path)


def open_images(path):
    """The images under ``path``: a shard folder (it holds the index ``ijepa-fast shard`` writes)
    or an image folder."""
    from .shards import ShardImages, is_shard_folder

    return ShardImages(path) if is_shard_folder(path) else FolderImages(path)  # (a half-written one: its error)


def build_loader(source, data_cfg, sampler, *, start: int, stop: int, seed: int, rank: int, world: int, device,
                 workers: int, log):
    """The loader ``data.loader`` asks for: DALI (image and shard folders; with a message and the Pillow
    loader when DALI is missing) or Pillow in worker processes."""
    from . import dali

    transform = transform_from_config(data_cfg, seed)
    want, version = data_cfg.loader, dali.available()
    use = want in ("dali", "dali_webdataset") or (want == "auto" and device.type == "cuda")
    if want == "dali_webdataset" and version is not None:
        from .shards import ShardImages

        if isinstance(source, ShardImages):
            from .dali_wds import WebDatasetLoader

            log.info(f"data loader: DALI {version} webdataset reader (DALI's order: sharded and shuffled by DALI), "
                     f"decoding on the {'GPU' if device.type == 'cuda' else 'CPU'}")
            return WebDatasetLoader(source, data_cfg, sampler, data_cfg.batch_size, start, stop, seed=seed, rank=rank,
                                    world=world, device=device, num_workers=max(1, workers))
        log.warning("data.loader=dali_webdataset reads shard folders (ijepa-fast shard); using the DALI loader")
    if use and (version is None or not dali.reads_bytes(source)):
        if want != "auto":
            log.warning(f"data.loader={want} but " + ("DALI is not installed (pip install nvidia-dali-cuda130)"
                                                   if version is None else "the data is not an image or shard folder")
                        + "; using the PIL loader")
        use = False
    if use:
        log.info(f"data loader: DALI {version}, decoding on the {'GPU' if device.type == 'cuda' else 'CPU'}")
        return dali.DaliLoader(source, data_cfg, sampler, data_cfg.batch_size, start, stop, seed=seed, rank=rank,
                               world=world, device=device, num_workers=max(1, workers), transform=transform)
    log.info(f"data loader: Pillow in {workers} worker process(es)")
    return make_loader(source, transform, sampler, data_cfg.batch_size, start, stop, seed=seed, rank=rank, world=world,
                       num_workers=workers, pin_memory=data_cfg.pin_memory and device.type == "cuda")


def transform_from_config(data_cfg, seed: int = 0) -> TrainTransform:
    return TrainTransform(data_cfg.crop_size, tuple(data_cfg.crop_scale), tuple(data_cfg.crop_ratio),
                          data_cfg.hflip, tuple(data_cfg.mean), tuple(data_cfg.std), seed)
