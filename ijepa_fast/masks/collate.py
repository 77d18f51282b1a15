"""``MaskCollator``: a ``collate_fn`` for any torch DataLoader that adds each batch's I-JEPA masks.

    collator = MaskCollator(model.grid, MaskConfig(), seed=0, steps_per_epoch=len(dataset) // 64)
    loader = DataLoader(dataset, batch_size=64, num_workers=8, collate_fn=collator, drop_last=True)
    for epoch in range(epochs):
        collator.set_epoch(epoch)                   # before iterating, as with a DistributedSampler
        for images, masks in loader:                # masks: the MaskBatch of this batch's step
            ...

Batch ``n`` of an epoch gets the masks ``MultiBlockSampler(grid, cfg, seed).sample(B, step)`` of
step ``epoch * steps_per_epoch + n`` (``set_step(s)`` starts the next pass at step ``s`` instead):
exactly the masks ``train_step``'s, ``Engine``'s and ``IJEPAModule``'s own sampling draws, whatever
the number of workers, and the same again after a resume.

How it stays deterministic in worker processes: masks depend only on ``(seed, step)``, never on
a random state, so the one thing a worker must know is which batch it is collating. A map-style
DataLoader hands the batches of a pass to its workers in turn (batch ``n`` to worker
``n % num_workers``, starting again at worker 0 each pass), so worker ``w``'s ``k``-th batch of a
pass is batch ``w + k * num_workers``. ``set_epoch`` / ``set_step`` write the pass's first step
into shared memory, which persistent workers see too, and restart every worker's count. This
needs the DataLoader's default ``in_order=True`` and a map-style dataset (an iterable dataset's
workers may finish unevenly); call ``set_epoch`` before every pass (without it, a pass with
persistent workers or ``num_workers=0`` continues counting where the last one stopped).
"""
from __future__ import annotations

import os

import torch
from torch.utils.data import default_collate, get_worker_info

from .multiblock import MaskBatch, MultiBlockSampler


class MaskCollator:
    """``collate_fn(samples) -> (images, masks)``.

    grid: the patch grid ``(rows, cols)``, or a model with a ``grid`` (an ``IJEPA`` or an encoder).
    cfg: a ``MaskConfig`` (default ``MaskConfig()``). seed: the run's seed (the sampler's).
    steps_per_epoch: batches per epoch, for ``set_epoch``. rank, world: this process's place among
    several (its images are images ``rank + b * world`` of the global batch, as with a
    DistributedSampler). collate: how samples become the image batch (``default_collate``); a
    sample that is a tuple or list (an ``ImageFolder``'s ``(image, label)``) contributes its first
    element, the image.
    """

    def __init__(self, grid, cfg=None, seed: int = 0, *, steps_per_epoch: int | None = None, rank: int = 0,
                 world: int = 1, collate=default_collate):
        if cfg is None:
            from ..config import MaskConfig

            cfg = MaskConfig()
        grid = getattr(grid, "grid", grid)
        self.sampler = MultiBlockSampler(grid, cfg, seed=seed, rank=rank, world=world)
        self.steps_per_epoch = steps_per_epoch
        self.collate = collate
        # [first step of the pass, generation]; shared so that persistent workers see set_epoch
        self._pass = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._seen, self._count = None, 0  # (process, generation) counted, and batches collated in it

    # -- passes
    @property
    def start(self) -> int:
        """The step of the current (or next) pass's first batch."""
        return int(self._pass[0])

    def set_step(self, step: int) -> None:
        """The next pass's first batch gets the masks of ``step``; later batches, the steps after it."""
        self._pass[0] = int(step)
        self._pass[1] += 1

    def set_epoch(self, epoch: int) -> None:
        """The next pass is epoch ``epoch``: its first batch is step ``epoch * steps_per_epoch``."""
        if self.steps_per_epoch is None:
            raise ValueError("MaskCollator.set_epoch needs steps_per_epoch (batches per epoch); pass it to the "
                             "constructor, or call set_step(first_step_of_the_epoch)")
        self.set_step(int(epoch) * int(self.steps_per_epoch))

    def next_step(self) -> int:
        """The step whose masks this process's next call draws (and counts it)."""
        start, gen = (int(v) for v in self._pass.tolist())
        if (os.getpid(), gen) != self._seen:  # a new pass, or a new (forked or spawned) worker
            self._seen, self._count = (os.getpid(), gen), 0
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = start + worker + self._count * workers
        self._count += 1
        return step

    # -- collation
    def masks(self, batch_size: int, step: int) -> MaskBatch:
        """The masks of ``step`` for ``batch_size`` images (as the sampler draws them)."""
        return self.sampler.sample(batch_size, step)

    def __call__(self, samples):
        if samples and isinstance(samples[0], (tuple, list)):
            samples = [s[0] for s in samples]
        images = self.collate(samples)
        return images, self.masks(len(samples), self.next_step())
