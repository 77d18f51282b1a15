"""I-JEPA on the built-in demo images with PyTorch Lightning: IJEPAModule, MaskCollator masks drawn in
the DataLoader's workers, Lightning's Trainer (CPU, seconds; pip install "ijepa-fast[lightning]").

    python examples/lightning_train.py --epochs 2
"""
import argparse

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ijepa_fast import IJEPA, MaskConfig, Schedules
from ijepa_fast.data.demo import generate
from ijepa_fast.lightning import IJEPAModule


class PrintLoss(pl.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        r = module.last_result
        print(f"step {trainer.global_step - 1}  loss {r.loss:.5f}  lr {r.lr:.2e}  momentum {r.momentum:.5f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None, help="folder for Lightning's checkpoints (default: none written)")
    args = ap.parse_args(argv)

    images, _ = generate(args.images, size=48, seed=0)
    data = TensorDataset((images.float() / 255 - 0.5) / 0.25)
    torch.manual_seed(0)
    model = IJEPA.build("custom", img_size=48, patch_size=6, embed_dim=64, depth=2, num_heads=4, pred_depth=1,
                        pred_dim=32)
    steps_per_epoch = args.images // args.batch_size
    module = IJEPAModule(model, Schedules(steps_per_epoch, epochs=args.epochs, warmup=0.5),
                         mask=MaskConfig(min_keep=4, sampler="python"), seed=0)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
                        collate_fn=module.collate_fn(), persistent_workers=args.workers > 0,
                        generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False,
                         enable_checkpointing=args.out is not None, default_root_dir=args.out,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[PrintLoss()])
    trainer.fit(module, loader)


if __name__ == "__main__":
    main()
