"""The collapse monitor: spread and effective rank of the target encoder's features during training.

Every ``run.monitor_every`` steps the target encoder embeds a fixed set of ``run.monitor_images``
images (centre crops, chosen once by the seed); the average-pooled features give the mean
per-dimension standard deviation and the effective rank (RankMe). Both are logged with the
metrics, and a warning says when the spread falls below ``run.collapse_std`` or the rank below
``run.collapse_rank`` times its first measurement of the run: the signs of a representation
collapsing. (The rank is compared with where it started because its healthy value depends on the
model and the data: the pooled features of a freshly initialised small ViT on simple images can
have an effective rank of only a few.)
"""
from __future__ import annotations

import torch

from ..eval.features import EvalTransform, encode
from ..eval.metrics import collapse_stats
from ..runlog.output import log


class CollapseMonitor:
    def __init__(self, source, crop_size: int, run_cfg, *, seed: int, device: torch.device):
        self.every = run_cfg.monitor_every
        self.std_floor, self.rank_floor = run_cfg.collapse_std, run_cfg.collapse_rank
        self.device = device
        self.baseline = None  # the first effective rank of the run
        self.images = None
        if self.every <= 0 or len(source) == 0:
            return
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(source), generator=g)[: run_cfg.monitor_images].tolist()
        t = EvalTransform(crop_size)
        imgs = [t(img) for img in (source.load(i) for i in order) if img is not None]
        self.images = torch.stack(imgs) if imgs else None

    def due(self, step: int) -> bool:
        return self.images is not None and step % self.every == 0

    @torch.no_grad()
    def measure(self, model) -> dict:
        enc = model.target_encoder
        feats = torch.cat([encode(enc, chunk.to(self.device))[0].cpu() for chunk in self.images.split(128)])
        stats = collapse_stats(feats)
        out = {"feat_std": round(stats["std_mean"], 6), "feat_std_min": round(stats["std_min"], 6),
               "feat_rank": round(stats["rank"], 3)}
        if self.baseline is None:
            self.baseline = stats["rank"]
        floor = self.rank_floor * self.baseline
        if stats["std_mean"] < self.std_floor or stats["rank"] < floor:
            log.warning(f"possible collapse: target features' per-dimension std {stats['std_mean']:.4g} "
                        f"(warns below {self.std_floor}), effective rank {stats['rank']:.2f} (started at "
                        f"{self.baseline:.2f}, warns below {floor:.2f}); consider a lower optim.lr or a slower EMA "
                        f"(optim.ema)")
        return out
