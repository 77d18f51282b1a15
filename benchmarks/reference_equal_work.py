"""The released training step fed ijepa-fast's reference-mode masks: equal work beside our step.

    python benchmarks/reference_equal_work.py --model vit_huge --patch 14 --batch 128 --steps 10 --warmup 3
                                              [--sdpa --compile] [--seed 0] [--own-masks]

Runs ``.bench_ref/reference_step.py`` (the released step as it ships; shared/anchors/README.md)
with its mask collator swapped for ijepa-fast's sampler in ``reference`` mode, which has the
released sampler's semantics (one block size per batch, the exclusive corner bound, contexts
truncated to the batch minimum) but its own seeded random stream (drawn here by the Python
sampler, which gives the same masks as the compiled one). Batch ``s`` of the script's
pool is ``MultiBlockSampler(grid, MaskConfig(mode="reference"), seed).sample(batch, s)``, exactly
the batches ``ijepa_fast.bench.step.run`` times at the same seed, warm-up and step count, so the
released step and ours process the same context and target tokens in every timed step. Every
JSON line the script prints gains ``"masks"``: ``"ijepa-fast reference mode"``, or ``"released
collator"`` with ``--own-masks`` (the script as it ships). The released models are built directly
on the script's ``--device`` (initialising ViT-H on the host takes a minute; the step timed is
unchanged). Other options go to the script.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import sys

from common import ROOT

from ijepa_fast.bench.report import EQUAL_MASKS


def collator(seed: int):
    """A stand-in for the released MaskCollator drawing ijepa-fast's reference-mode masks."""
    from ijepa_fast.config import MaskConfig
    from ijepa_fast.masks import MultiBlockSampler

    class OurMasks:
        def __init__(self, *, input_size, patch_size, pred_mask_scale, enc_mask_scale, aspect_ratio, nenc, npred,
                     allow_overlap, min_keep):
            grid = (input_size[0] // patch_size, input_size[1] // patch_size)
            cfg = MaskConfig(mode="reference", num_targets=npred, target_scale=tuple(pred_mask_scale),
                             target_aspect=tuple(aspect_ratio), num_context=nenc, context_scale=tuple(enc_mask_scale),
                             min_keep=min_keep, allow_overlap=allow_overlap, sampler="python")
            self.sampler = MultiBlockSampler(grid, cfg, seed=seed)
            self.step = 0

        def __call__(self, batch):
            masks = self.sampler.sample(len(batch), self.step)
            self.step += 1
            enc, pred = masks.to_lists()
            return None, enc, pred

    return OurMasks


def on_device(build, device: str):
    """``build`` (a released model constructor) run with ``device`` as the default device."""
    import torch

    @functools.wraps(build)
    def wrapped(*args, **kwargs):
        with torch.device(device):
            return build(*args, **kwargs)

    return wrapped


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    p.add_argument("--seed", type=int, default=0, help="the mask seed of ijepa_fast.bench.step (0)")
    p.add_argument("--own-masks", action="store_true", help="keep the released collator (not equal work)")
    p.add_argument("--script", default=str(ROOT / ".bench_ref" / "reference_step.py"))
    p.add_argument("--device", default="cuda")
    args, rest = p.parse_known_args()
    spec = importlib.util.spec_from_file_location("reference_step", args.script)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    for name in ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant", "vit_predictor"):
        if name in ref.vit.__dict__:
            setattr(ref.vit, name, on_device(ref.vit.__dict__[name], args.device))
    label = "released collator" if args.own_masks else EQUAL_MASKS
    if not args.own_masks:
        ref.MaskCollator = collator(args.seed)
    emit = ref.emit
    ref.emit = lambda rec: emit({**rec, "masks": label})
    sys.argv = [args.script, "--device", args.device, *rest]
    ref.main()


if __name__ == "__main__":
    main()
