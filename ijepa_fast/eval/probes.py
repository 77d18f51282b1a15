"""Probes on frozen features: linear, attentive, k-nearest-neighbours, low-shot.

All report top-1 and top-5 accuracy (top-k with k = min(5, classes)) on the validation set.

- ``linear_probe``: a linear classifier on average-pooled features (standardised with the train
  statistics), SGD with momentum and a cosine schedule; the learning rate is chosen on a
  held-out tenth of the training set (stratified), then the probe is retrained on all of it.
- ``attentive_probe``: one cross-attention pooling layer (a learned query over the patch tokens)
  and a linear head, AdamW with a cosine schedule, the same learning-rate selection.
- ``knn_probe``: cosine similarity, the k nearest training features vote with weights
  exp(similarity / T).
- ``lowshot``: exactly N labelled images per class (or a percentage of each class), several seeds;
  the mean and spread of the linear probe.
"""
from __future__ import annotations

import math
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F

LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def topk(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(top-1, top-k) accuracy in percent, k = min(5, number of classes)."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top == labels[:, None]
    return 100.0 * hit[:, 0].float().mean().item(), 100.0 * hit.any(1).float().mean().item()


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held-out) indices; about ``fraction`` of every class held out (at least one where a
    class has two or more)."""
    g = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = min(len(idx) - 1, max(1, round(len(idx) * fraction))) if len(idx) > 1 else 0
        held.append(idx[:n])
        keep.append(idx[n:])
    return torch.cat(keep).sort().values, torch.cat(held).sort().values


def per_class(labels: torch.Tensor, n: int | None = None, percent: float | None = None, seed: int = 0) -> torch.Tensor:
    """Indices of exactly ``n`` images per class (or ``percent`` % of each class, at least one),
    drawn with ``seed``; a class with fewer images contributes all of them."""
    if (n is None) == (percent is None):
        raise ValueError("give n per class or a percentage, not both")
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        take = n if n is not None else max(1, round(len(idx) * percent / 100))
        out.append(idx[torch.randperm(len(idx), generator=g)[:take]])
    return torch.cat(out).sort().values


def _classes(*labels) -> int:
    return int(max(int(lab.max()) for lab in labels if len(lab))) + 1


def _fit(model: nn.Module, opt, x, y, epochs: int, batch: int, seed: int) -> nn.Module:
    """Cross-entropy minibatch training with a cosine learning-rate schedule."""
    steps = epochs * math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            j = perm[i:i + batch]
            loss = F.cross_entropy(model(x[j]), y[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def _sweep(train, train_y, val, val_y, fit, lrs, lr, seed) -> dict:
    """Choose the learning rate on a held-out tenth of the training set (unless ``lr`` is given),
    refit on all of it, score on the validation set."""
    sweep = {}
    if lr is None:
        keep, held = stratified_split(train_y, 0.1, seed)
        for cand in lrs:
            model = fit(train[keep], train_y[keep], cand)
            with torch.no_grad():
                sweep[cand] = topk(model(train[held]), train_y[held])[0]
        lr = max(sweep, key=lambda k: (sweep[k], -k))
    model = fit(train, train_y, lr)
    with torch.no_grad():
        top1, top5 = topk(model(val), val_y)
    return {"top1": top1, "top5": top5, "lr": lr, "sweep_heldout_top1": sweep}


def _linear_fit(classes, epochs, batch, wd, seed):
    def fit(x, y, lr):
        head = nn.Linear(x.shape[1], classes)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
        return _fit(head, opt, x, y, epochs, batch, seed)
    return fit


def _standardise(train, *others):
    mu, sd = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return [(t - mu) / sd for t in (train,) + others]


def linear_probe(train_x, train_y, val_x, val_y, lrs=LRS, epochs: int = 100, batch: int = 256, wd: float = 0.0,
                 seed: int = 0, lr: float | None = None) -> dict:
    """See the module docstring. ``lr`` skips the sweep."""
    train_x, val_x = _standardise(train_x.float(), val_x.float())
    fit = _linear_fit(_classes(train_y, val_y), epochs, batch, wd, seed)
    res = _sweep(train_x, train_y, val_x, val_y, fit, lrs, lr, seed)
    return {"probe": "linear", **res, "train": len(train_x), "val": len(val_x)}


def knn_probe(train_x, train_y, val_x, val_y, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> dict:
    train = F.normalize(train_x.float(), dim=1)
    val = F.normalize(val_x.float(), dim=1)
    classes = _classes(train_y, val_y)
    k = min(k, len(train))
    votes = []
    for i in range(0, len(val), chunk):
        sim = val[i:i + chunk] @ train.T
        s, j = sim.topk(k, dim=1)
        w = (s / temperature).exp()
        v = torch.zeros(len(s), classes).scatter_add_(1, train_y[j], w)
        votes.append(v)
    top1, top5 = topk(torch.cat(votes) if votes else torch.zeros(0, classes), val_y)
    return {"probe": "knn", "top1": top1, "top5": top5, "k": k, "temperature": temperature}


class AttentivePooler(nn.Module):
    """One cross-attention layer: a learned query attends over the patch tokens; then a linear head."""

    def __init__(self, dim: int, classes: int, heads: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, classes)
        nn.init.trunc_normal_(self.query, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.norm(tokens)
        pooled, _ = self.attn(self.query.expand(len(t), -1, -1), t, t, need_weights=False)
        return self.head(pooled[:, 0])


def attentive_probe(train_tokens, train_y, val_tokens, val_y, lrs=(1e-4, 3e-4, 1e-3, 3e-3), epochs: int = 30,
                    batch: int = 128, heads: int = 1, seed: int = 0, lr: float | None = None) -> dict:
    """See the module docstring; tokens are [N, T, D] patch features."""
    classes = _classes(train_y, val_y)

    def fit(x, y, lr_):
        torch.manual_seed(seed)
        model = AttentivePooler(x.shape[-1], classes, heads)
        return _fit(model, torch.optim.AdamW(model.parameters(), lr=lr_, weight_decay=0.01), x, y, epochs, batch, seed)

    res = _sweep(train_tokens.float(), train_y, val_tokens.float(), val_y, fit, lrs, lr, seed)
    return {"probe": "attentive", **res}


def lowshot(train_x, train_y, val_x, val_y, n: int | None = None, percent: float | None = None,
            seeds=(0, 1, 2), **linear_kw) -> dict:
    """The linear probe on N labels per class (or a percentage), over several seeds."""
    runs = []
    for s in seeds:
        idx = per_class(train_y, n, percent, seed=s)
        per = torch.bincount(train_y[idx])
        kw = dict(linear_kw)
        if per.min() < 5:  # too few labels to hold any out: a fixed learning rate
            kw.setdefault("lr", 0.1)
        runs.append(linear_probe(train_x[idx], train_y[idx], val_x, val_y, seed=s, **kw))
    top1 = [r["top1"] for r in runs]
    top5 = [r["top5"] for r in runs]
    return {"probe": "lowshot", "per_class": n, "percent": percent, "seeds": list(seeds),
            "top1": statistics.mean(top1), "top1_std": statistics.pstdev(top1), "top5": statistics.mean(top5),
            "top5_std": statistics.pstdev(top5), "runs": [r["top1"] for r in runs], "labels": int(len(idx))}
