"""MaskCollator: a DataLoader's batches carry the masks the sampler draws for their steps, the same
in the main process and in worker processes (persistent or not), and again after set_epoch."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ijepa_fast import IJEPA, MaskConfig
from ijepa_fast.masks import MaskBatch, MaskCollator, MultiBlockSampler

CFG = MaskConfig(min_keep=4, sampler="python")
GRID = (8, 8)


class Images(torch.utils.data.Dataset):
    """(image, label) pairs, as an ImageFolder gives them."""

    def __init__(self, n):
        self.x = torch.randn(n, 3, 32, 32)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i


def same(a: MaskBatch, b: MaskBatch) -> bool:
    def eq(x, y):
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
    return all(eq(getattr(a, f), getattr(b, f)) for f in ("context", "targets", "context_lens", "target_lens"))


@pytest.mark.parametrize("workers,persistent", [(0, False), (2, False), (2, True)])
def test_batches_carry_the_samplers_masks_of_their_steps(workers, persistent):
    data = Images(24)
    collator = MaskCollator(GRID, CFG, seed=5, steps_per_epoch=6)
    loader = DataLoader(data, batch_size=4, num_workers=workers, collate_fn=collator,
                        persistent_workers=persistent)
    sampler = MultiBlockSampler(GRID, CFG, seed=5)
    for epoch in (0, 1, 3):  # epoch 3 after 1: a resume skips epochs
        collator.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 6
        for n, (images, masks) in enumerate(batches):
            torch.testing.assert_close(images, data.x[4 * n:4 * n + 4], rtol=0, atol=0)  # labels dropped
            assert same(masks, sampler.sample(4, epoch * 6 + n)), (epoch, n)
    # different steps draw different masks (the comparison above can tell them apart)
    assert not same(sampler.sample(4, 0), sampler.sample(4, 1))


def test_set_step_and_model_grid_and_ranks():
    model = IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=1, pred_dim=16, embed_dim=32, depth=1,
                        num_heads=2)
    data = TensorDataset(torch.randn(8, 3, 32, 32))
    collator = MaskCollator(model, CFG, seed=2, rank=1, world=2)
    collator.set_step(10)
    got = [m for _, m in DataLoader(data, batch_size=2, collate_fn=collator)]
    sampler = MultiBlockSampler(model.grid, CFG, seed=2, rank=1, world=2)
    assert all(same(m, sampler.sample(2, 10 + n)) for n, m in enumerate(got))
    with pytest.raises(ValueError, match="steps_per_epoch"):
        collator.set_epoch(1)
