"""NVIDIA DALI loader: decoding and augmentation on the GPU (``device="mixed"``), or on the CPU.

It walks the same step-indexed order as the PIL loader (``StepBatches``: a seeded permutation
per epoch, sharded by rank, resumable at any step) and yields the same ``Batch`` objects, the
images already on the training device. Per image: read the file (from a shard folder, its bytes
in the tar), RandomResizedCrop fused into the decoder (``decoders.image_random_crop``), resize,
optional flip, normalise to CHW float (or bf16).

Bad inputs never crash a run. A reader process checks every file's bytes before DALI sees them
(a JPEG must end with its end marker, PNG chunks must pass their checksums, other formats must
open and verify) and swaps an unusable file for the next image of the epoch order, reporting it
with the batch. Should the decoder still fail on a batch, that batch is decoded by the PIL loader
instead, the pipeline is rebuilt, and the run goes on.

Resuming restarts at the exact image position; DALI's augmentation draws are seeded by the start
step, so they are not bit-identical to an uninterrupted run (the PIL loader's are).
"""
from __future__ import annotations

import logging

import torch

from .images import FolderImages, usable_bytes
from .loader import Batch, BatchBuilder, StepBatches, epoch_order

log = logging.getLogger("ijepa_fast")


def available() -> str | None:
    """DALI's version, or None when it is not installed."""
    try:
        import nvidia.dali

        return nvidia.dali.__version__
    except Exception:
        return None


def reads_bytes(source) -> bool:
    """Whether the DALI loader can read ``source``: an image folder or a shard folder."""
    from .shards import ShardImages

    return isinstance(source, (FolderImages, ShardImages))


SKIP_SLOTS = 4


def augment(data, c, gpu: bool):
    """The DALI graph from encoded bytes to a training image: RandomResizedCrop fused into the
    decoder, resize, optional flip, normalisation to CHW float (``c``: a DataConfig)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    img = fn.decoders.image_random_crop(data, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                        random_area=list(c.crop_scale), random_aspect_ratio=list(c.crop_ratio),
                                        num_attempts=10)
    img = fn.resize(img, resize_x=c.crop_size, resize_y=c.crop_size)
    mirror = fn.random.coin_flip(probability=0.5) if c.hflip else 0
    return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
                                    mean=[255 * m for m in c.mean], std=[255 * s for s in c.std])


class _Files:
    """The per-sample callback of DALI's parallel external source (picklable: runs in workers)."""

    def __init__(self, source, batch_size, start, seed, rank, world):
        self.source, self.n, self.batch, self.start = source, len(source), batch_size, start
        self.seed, self.rank, self.world = seed, rank, world
        self.steps_per_epoch = self.n // (batch_size * world)
        self._order = {}

    def order(self, epoch):
        if epoch not in self._order:
            self._order = {epoch: epoch_order(self.n, epoch, self.seed).tolist()}
        return self._order[epoch]

    def index(self, step, j):
        epoch, i = divmod(step, self.steps_per_epoch)
        glob = self.batch * self.world
        return epoch, self.order(epoch)[i * glob + self.rank + j * self.world]

    def __call__(self, info):
        import numpy as np

        step = self.start + info.iteration
        epoch, idx = self.index(step, info.idx_in_batch)
        order, pos, bad = None, None, []
        for _ in range(64):
            data = self.source.read_bytes(idx)
            if usable_bytes(data):
                # [image used, number of files skipped for it, the first SKIP_SLOTS of them (-1 = none)]
                slots = (bad + [-1] * SKIP_SLOTS)[:SKIP_SLOTS]
                return np.frombuffer(data, dtype=np.uint8), np.array([idx, len(bad)] + slots, dtype=np.int64)
            bad.append(idx)
            order = order or self.order(epoch)
            pos = order.index(idx) if pos is None else pos
            pos = (pos + 1) % len(order)
            idx = order[pos]
        raise RuntimeError(f"64 unusable images in a row near {self.source.name(idx)}; is the data readable?")


def to_torch(images, device: torch.device) -> torch.Tensor:
    """A dense DALI batch as a float tensor on ``device``."""
    import numpy as np

    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = images.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(images.as_tensor()))


class DaliLoader:
    """Iterates ``Batch`` objects for steps start .. stop-1 (see the module docstring)."""

    def __init__(self, source, data_cfg, sampler, batch_size: int, start: int, stop: int, *,
                 seed: int = 0, rank: int = 0, world: int = 1, device: torch.device | None = None,
                 num_workers: int = 4, transform=None):
        if not reads_bytes(source):
            raise ValueError("the DALI loader reads image folders and shard folders (data.source=folder)")
        self.source, self.cfg, self.sampler = source, data_cfg, sampler
        self.batch, self.start, self.stop = batch_size, start, stop
        self.seed, self.rank, self.world = seed, rank, world
        self.device = device or torch.device("cpu")
        self.workers = max(1, num_workers)
        self.steps = StepBatches(len(source), batch_size, start, stop, seed, rank, world)
        self.fallback = BatchBuilder(source, transform, sampler, seed) if transform is not None else None

    def __len__(self) -> int:
        return len(self.steps)

    def _pipeline(self, start: int):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        from ..masks.rng import derive

        c = self.cfg
        gpu = self.device.type == "cuda"
        files = _Files(self.source, self.batch, start, self.seed, self.rank, self.world)

        @pipeline_def(batch_size=self.batch, num_threads=self.workers,
                      device_id=(self.device.index or 0) if gpu else None,
                      seed=derive(self.seed, 0xDA11, start) & 0x7FFFFFFF, py_num_workers=self.workers,
                      py_start_method="spawn", prefetch_queue_depth=2)
        def pipe():
            data, info = fn.external_source(source=files, num_outputs=2, batch=False, parallel=True,
                                            dtype=[types.UINT8, types.INT64])
            return augment(data, c, gpu), info

        p = pipe()
        p.build()
        return p

    def __iter__(self):
        pipe, built_at = None, None
        for step, epoch, indices in self.steps:
            if pipe is None:
                pipe, built_at = self._pipeline(step), step
            try:
                images, info = pipe.run()
            except Exception as e:  # a file the checks let through: decode this batch with PIL
                log.warning(f"DALI could not decode step {step} ({str(e).splitlines()[0][:200]}); "
                            f"using the PIL loader for this batch")
                pipe = None
                if self.fallback is None:
                    raise
                yield self._to_device(self.fallback[(step, epoch, indices)])
                continue
            yield self._batch(step, epoch, images, info)
        del pipe, built_at

    def _batch(self, step, epoch, images, info) -> Batch:
        import numpy as np

        out = to_torch(images, self.device)
        meta = np.array(info.as_tensor()).reshape(-1, 2 + SKIP_SLOTS)
        idx = meta[:, 0].tolist()
        skipped = []
        for row in meta.tolist():
            named = [self.source.name(i) for i in row[2:] if i >= 0]
            skipped += named + [f"(one more unusable file before {self.source.name(row[0])})"] * (row[1] - len(named))
        labels = torch.tensor([self.source.labels[i] for i in idx])
        masks = self.sampler.sample(len(idx), step)
        return Batch(out, masks, step, epoch, labels, skipped, idx)

    def _to_device(self, batch: Batch) -> Batch:
        return Batch(batch.images.to(self.device), batch.masks, batch.step, batch.epoch, batch.labels, batch.skipped,
                     batch.indices)
