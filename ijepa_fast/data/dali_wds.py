"""Shard folders read by DALI's own webdataset reader (``data.loader=dali_webdataset``).

``fn.readers.webdataset`` reads the tar files sequentially, through the ``.idx`` files that
``ijepa-fast shard`` writes beside them; the decoding and augmentation are the DALI loader's. Its
order is DALI's, not the step-indexed order of the other loaders:

- sharding: DALI numbers the usable samples in storage order (shard files in turn, members in
  tar order) and gives rank ``r`` of ``w`` the contiguous slice ``[r * n // w, (r + 1) * n // w)``;
  in each following pass the ranks move on to the next slice (``r + 1``, ``r + 2`` ... modulo
  ``w``), so over ``w`` passes every rank sees every sample;
- shuffling: a buffer of ``initial_fill`` samples (``shuffle_buffer``), drawn from with a seed
  derived from ``run.seed`` and the start step; the storage order itself is already a seeded
  shuffle of the folder (``ijepa-fast shard --seed``);
- per pass, the ranks together read every usable sample exactly once; a rank's stream runs on from
  one pass into the next without a gap, so a batch can hold the end of one pass and the start of
  the next;
- resuming at step ``s``: the reader starts the pass that holds step ``s`` from its beginning (slice
  and seed as above): a resume repeats the images already read in that pass. Steps, schedules and
  masks go on exactly; the images and their crops do not equal an uninterrupted run's.

Samples whose bytes fail the DALI loader's check when the shards are written are left out of the
``.idx`` files (so DALI never reads them); the loader logs how many once.
"""
from __future__ import annotations

import logging

import torch

from ..masks.rng import derive
from .loader import Batch, StepBatches

log = logging.getLogger("ijepa_fast")
READER = "shards"


def sample_of(info) -> int:
    """The sample number of a DALI ``source_info`` (``<tar>:<offset>:<key>.<ext>``)."""
    return int(info.rsplit(":", 1)[1].rsplit("/", 1)[-1].split(".", 1)[0])


class WebDatasetLoader:
    """Iterates ``Batch`` objects for steps start .. stop-1 from ``fn.readers.webdataset``."""

    def __init__(self, source, data_cfg, sampler, batch_size: int, start: int, stop: int, *, seed: int = 0,
                 rank: int = 0, world: int = 1, device: torch.device | None = None, num_workers: int = 4,
                 shuffle_buffer: int = 4096):
        from .shards import ShardImages

        if not isinstance(source, ShardImages):
            raise ValueError("data.loader=dali_webdataset reads shard folders (written by ijepa-fast shard)")
        self.source, self.cfg, self.sampler = source, data_cfg, sampler
        self.batch, self.start, self.stop = batch_size, start, stop
        self.seed, self.rank, self.world = seed, rank, world
        self.device = device or torch.device("cpu")
        self.workers, self.buffer = max(1, num_workers), shuffle_buffer
        self.steps_per_epoch = StepBatches(len(source), batch_size, start, stop, seed, rank, world).steps_per_epoch
        self.usable = len(source) - len(source.suspect)
        if self.usable < world:
            raise ValueError(f"{self.usable} usable images are fewer than the {world} processes")
        if source.suspect and start == 0 and rank == 0:
            log.warning(f"{len(source.suspect)} unusable image(s) of {source.root} are left out of the DALI reader")

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def pass_of(self, step: int) -> tuple[int, int]:
        """(the reader pass holding ``step``'s first image, the slice this rank reads in it)."""
        def size(r):  # images of slice r
            return (r + 1) * self.usable // self.world - r * self.usable // self.world

        read, done = step * self.batch, 0
        full = sum(size(r) for r in range(self.world))  # ``world`` passes read every slice once
        done, read = self.world * (read // full), read % full
        while read >= size((self.rank + done) % self.world):
            read -= size((self.rank + done) % self.world)
            done += 1
        return done, (self.rank + done) % self.world

    def pipeline(self):
        import nvidia.dali.fn as fn
        from nvidia.dali import pipeline_def

        from .dali import augment

        gpu = self.device.type == "cuda"
        src = self.source
        _, shard_id = self.pass_of(self.start)
        seed = derive(self.seed, 0xDA12, self.start) & 0x7FFFFFFF

        @pipeline_def(batch_size=self.batch, num_threads=self.workers,
                      device_id=(self.device.index or 0) if gpu else None, seed=seed, prefetch_queue_depth=2)
        def pipe():
            data = fn.readers.webdataset(paths=[src.shards[k] for k in src.dali_shards],
                                         index_paths=[src.dali_indices[k] for k in src.dali_shards],
                                         ext=["jpg;jpeg;png;bmp;webp;tif;tiff;ppm;pgm;gif"], shard_id=shard_id,
                                         num_shards=self.world, random_shuffle=True, initial_fill=self.buffer,
                                         seed=seed, name=READER, missing_component_behavior="skip")
            info = fn.get_property(data, key="source_info")
            return augment(data, self.cfg, gpu), info

        p = pipe()
        p.build()
        return p

    def __iter__(self):
        import numpy as np

        from .dali import to_torch

        pipe = self.pipeline()
        for step in range(self.start, self.stop):
            images, info = pipe.run()
            idx = [sample_of(bytes(np.array(info[j])).decode()) for j in range(len(info))]
            labels = torch.tensor([self.source.labels[i] for i in idx])
            masks = self.sampler.sample(len(idx), step)
            yield Batch(to_torch(images, self.device), masks, step, step // self.steps_per_epoch, labels, [], idx)
