"""The training loader: whole batches (images and their masks) built in worker processes.

Each item is one step: ``StepBatches`` yields ``(step, epoch, indices)`` and ``BatchBuilder``
loads, augments and stacks those images and draws the step's masks. Everything is a function of
the seed and the step, so a run resumed at step ``s`` receives exactly the batches an
uninterrupted run receives from step ``s`` on, whatever the number of workers.

Epoch order: a permutation seeded by (seed, epoch); rank ``r`` of ``world`` processes takes
positions ``r, r + world, ...`` of each global batch, and the last incomplete batch is dropped.
Unusable images (unreadable, truncated, not images) are replaced by the next image of the epoch
order and reported with the batch, so the run counts them instead of crashing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..masks import MaskBatch
from ..masks.rng import derive
from .images import DataError

ORDER_TAG = 0x0D


@dataclass
class Batch:
    images: torch.Tensor  # float [B, 3, H, W]
    masks: MaskBatch
    step: int
    epoch: int
    labels: torch.Tensor | None = None
    skipped: list = field(default_factory=list)  # names of unusable files replaced in this batch
    indices: list = field(default_factory=list)  # the source index of each image (after replacements)

    def pin_memory(self) -> Batch:
        return Batch(self.images.pin_memory(), self.masks.pin_memory(), self.step, self.epoch,
                     None if self.labels is None else self.labels.pin_memory(), self.skipped, self.indices)


def epoch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(derive(seed, ORDER_TAG, epoch) & ((1 << 63) - 1))
    return torch.randperm(n, generator=g)


class StepBatches(torch.utils.data.Sampler):
    """Yields (step, epoch, image indices) for steps start .. stop-1 of this rank."""

    def __init__(self, n_images: int, batch_size: int, start: int, stop: int, seed: int = 0,
                 rank: int = 0, world: int = 1):
        self.n, self.batch, self.start, self.stop = n_images, batch_size, start, stop
        self.seed, self.rank, self.world = seed, rank, world
        self.steps_per_epoch = n_images // (batch_size * world)
        if self.steps_per_epoch == 0:
            raise DataError(f"{n_images} images are fewer than one global batch "
                            f"({batch_size} x {world} processes); lower data.batch_size or add images")

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        order, order_epoch = None, -1
        for step in range(self.start, self.stop):
            epoch, i = divmod(step, self.steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(self.n, epoch, self.seed), epoch
            glob = self.batch * self.world
            chunk = order[i * glob:(i + 1) * glob]
            yield step, epoch, chunk[self.rank::self.world].tolist()


class BatchBuilder(torch.utils.data.Dataset):
    """Turns a (step, epoch, indices) item into a Batch."""

    def __init__(self, source, transform, sampler, seed: int = 0):
        self.source, self.transform, self.sampler, self.seed = source, transform, sampler, seed

    def __len__(self) -> int:  # items come from StepBatches; this is only informative
        return len(self.source)

    def __getitem__(self, item) -> Batch:
        step, epoch, indices = item
        order = None
        images, labels, skipped, used = [], [], [], []
        labelled = getattr(self.source, "labels", None)
        for pos, idx in enumerate(indices):
            img, tries = self.source.load(idx), 0
            while img is None:
                skipped.append(self.source.name(idx))
                if order is None:
                    order = epoch_order(len(self.source), epoch, self.seed).tolist()
                tries += 1
                if tries > 32:
                    raise DataError(f"32 unusable images in a row near {self.source.name(idx)}; is the data readable?")
                idx = order[(order.index(idx) + 1) % len(order)]
                img = self.source.load(idx)
            images.append(self.transform(img, epoch, idx))
            used.append(idx)
            if labelled is not None:
                labels.append(labelled[idx])
        masks = self.sampler.sample(len(indices), step)
        lab = torch.tensor(labels) if labelled is not None else None
        return Batch(torch.stack(images), masks, step, epoch, lab, skipped, used)


def _identity(x):
    return x


def _ignore_interrupt(worker_id: int) -> None:
    """Data-loader workers leave Ctrl-C to the main process (which finishes the step and checkpoints)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(source, transform, sampler, batch_size: int, start: int, stop: int, *, seed: int = 0,
                rank: int = 0, world: int = 1, num_workers: int = 0, pin_memory: bool = False):
    """A DataLoader over steps start .. stop-1, yielding one Batch per step, in order."""
    steps = StepBatches(len(source), batch_size, start, stop, seed, rank, world)
    builder = BatchBuilder(source, transform, sampler, seed)
    return torch.utils.data.DataLoader(
        builder, sampler=steps, batch_size=None, collate_fn=_identity, num_workers=num_workers,
        pin_memory=pin_memory, persistent_workers=False, prefetch_factor=2 if num_workers else None,
        worker_init_fn=_ignore_interrupt if num_workers else None)
