"""A custom training loop around ijepa_fast.Engine on the built-in demo images (CPU, seconds).

    python examples/engine_loop.py --steps 8
"""
import argparse

import torch

from ijepa_fast import IJEPA, Engine, MaskConfig, Schedules
from ijepa_fast.data.demo import generate


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--save", help="write the Engine state here at the end (resume with --resume)")
    ap.add_argument("--resume", help="an Engine state written by --save")
    args = ap.parse_args(argv)

    images, _ = generate(args.images, size=48, seed=0)  # uint8 [N, 3, 48, 48]
    images = (images.float() / 255 - 0.5) / 0.25
    steps_per_epoch = args.images // args.batch_size
    torch.manual_seed(0)
    model = IJEPA.build("custom", img_size=48, patch_size=6, embed_dim=64, depth=2, num_heads=4, pred_depth=1,
                        pred_dim=32)
    engine = Engine(model, Schedules(steps_per_epoch, epochs=max(1, -(-args.steps // steps_per_epoch)), warmup=0.5),
                    mask=MaskConfig(min_keep=4, sampler="python"), seed=0)
    if args.resume:
        engine.load_state_dict(torch.load(args.resume, weights_only=True))
    for step in range(engine.next_step, args.steps):
        epoch, i = divmod(step, steps_per_epoch)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(epoch))
        batch = images[order[i * args.batch_size:(i + 1) * args.batch_size]]
        result = engine.step(batch, step)  # masks, LR/WD, forward, backward, AdamW, EMA
        print(f"step {step}  loss {result.loss:.5f}  lr {result.lr:.2e}  momentum {result.momentum:.5f}")
    if args.save:
        torch.save(engine.state_dict(), args.save)


if __name__ == "__main__":
    main()
