"""Every range and cross-field rule of the configuration, checked before anything runs.

``validate(cfg)`` raises a ``ConfigError`` naming the first bad key and what to change; a config
that passes cannot crash later on a value (negative learning rates, heads that do not divide the
width, zero-sized images...).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

from ..errors import ConfigError
from ..models.vit import VIT_SIZES


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _finite(obj, prefix: str = "") -> None:
    """Every number of the tree is finite (nan and inf are never a setting)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            _finite(value, key + ".")
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{key}: {value!r} is not a finite number")


def validate(cfg) -> None:
    """Checks of every field's range and across fields, with messages that say what to change."""
    _finite(cfg)
    _model(cfg.model, cfg.data)
    _data(cfg.data, cfg.model)
    _mask(cfg.mask)
    patches = (cfg.data.crop_size // cfg.model.patch_size) ** 2
    _need(cfg.mask.num_targets <= patches, "mask.num_targets",
          f"{cfg.mask.num_targets} target blocks cannot fit a grid of {patches} patches (the reference uses 4)")
    _need(cfg.mask.num_context <= patches, "mask.num_context",
          f"{cfg.mask.num_context} context blocks cannot fit a grid of {patches} patches (the reference uses 1)")
    _optim(cfg.optim, cfg.data)
    _run(cfg.run)
    _need(not (cfg.dist.strategy == "fsdp" and cfg.perf.bf16_weights is True), "perf.bf16_weights",
          "FSDP has its own bf16 parameters: leave perf.bf16_weights off with dist.strategy=fsdp")
    _need(not (cfg.dist.strategy == "fsdp" and cfg.perf.optimizer == "fused_tail"), "perf.optimizer",
          "the fused tail works on whole parameters, not FSDP shards: use perf.optimizer=auto with dist.strategy=fsdp")
    _need(not (cfg.dist.strategy == "fsdp" and cfg.perf.fp8 not in ("false", "auto")), "perf.fp8",
          "FP8 linear layers are not supported with dist.strategy=fsdp here: use dist.strategy=ddp or perf.fp8=false")
    _need(not (cfg.perf.cuda_graphs is True and cfg.perf.optimizer != "fused_tail"), "perf.cuda_graphs",
          "the graph-ready step needs perf.optimizer=fused_tail (set it, or perf.cuda_graphs=false)")
    _need(not (cfg.perf.cuda_graphs is True and cfg.optim.on_nonfinite != "stop"), "perf.cuda_graphs",
          "the graph-ready step decides finiteness on the device and stops at a non-finite step: set "
          "optim.on_nonfinite=stop or perf.cuda_graphs=false")
    _need(not (cfg.perf.cuda_graphs is True and cfg.optim.accum_steps != 1), "perf.cuda_graphs",
          "the graph-ready step runs one micro-batch: set optim.accum_steps=1 or perf.cuda_graphs=false")
    _need(not (cfg.perf.compile is True and cfg.perf.token_buckets == 0), "perf.token_buckets",
          "0 with perf.compile=true would compile dynamic shapes (the slow path): leave it auto or set 1-16")


def _model(m, d) -> None:
    _need(m.patch_size >= 1, "model.patch_size", f"must be at least 1, got {m.patch_size}")
    _need(m.pred_depth >= 1, "model.pred_depth", f"must be at least 1, got {m.pred_depth}")
    _need(m.pred_dim >= 1, "model.pred_dim", f"must be at least 1, got {m.pred_dim}")
    _need(m.init_std > 0, "model.init_std", f"must be positive, got {m.init_std}")
    if m.name == "custom":
        _need(m.depth >= 1, "model.depth", f"must be at least 1, got {m.depth}")
        _need(m.embed_dim >= 1, "model.embed_dim", f"must be at least 1, got {m.embed_dim}")
        _need(m.num_heads >= 1 and m.embed_dim % m.num_heads == 0, "model.num_heads",
              f"{m.num_heads} does not divide model.embed_dim={m.embed_dim}")
        _need(m.mlp_ratio > 0, "model.mlp_ratio", f"must be positive, got {m.mlp_ratio}")
        _need(int(m.embed_dim * m.mlp_ratio) >= 1, "model.mlp_ratio",
              f"{m.mlp_ratio} x model.embed_dim={m.embed_dim} leaves the MLP no hidden unit (standard ViTs use 4)")
        heads = m.num_heads
    else:
        heads = VIT_SIZES[m.name].heads
    pred_heads = m.pred_heads if m.pred_heads is not None else heads
    _need(pred_heads >= 1 and m.pred_dim % pred_heads == 0, "model.pred_heads" if m.pred_heads else "model.pred_dim",
          f"{pred_heads} predictor heads do not divide model.pred_dim={m.pred_dim}")


def _data(d, m) -> None:
    _need(d.batch_size >= 1, "data.batch_size", f"must be at least 1, got {d.batch_size}")
    _need(d.global_batch is None or d.global_batch >= 1, "data.global_batch",
          f"must be at least 1 or null, got {d.global_batch}")
    _need(d.crop_size >= 1, "data.crop_size", f"must be positive, got {d.crop_size}")
    _need(d.crop_size % m.patch_size == 0, "data.crop_size",
          f"{d.crop_size} is not a multiple of model.patch_size={m.patch_size}")
    _need(0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale", "needs 0 < min <= max <= 1")
    _need(0 < d.crop_ratio[0] <= d.crop_ratio[1], "data.crop_ratio", "needs 0 < min <= max")
    _need(all(s > 0 for s in d.std), "data.std", f"every value must be positive, got {list(d.std)}")
    _need(d.num_workers >= 0, "data.num_workers", f"must be 0 (load in the main process) or more, got {d.num_workers}")
    _need(d.demo_images >= 1, "data.demo_images", f"must be at least 1, got {d.demo_images}")
    _need(d.demo_size >= 1, "data.demo_size", f"must be at least 1, got {d.demo_size}")


def _mask(k) -> None:
    _need(k.num_targets >= 1, "mask.num_targets", f"needs at least one target block, got {k.num_targets}")
    _need(k.num_context >= 1, "mask.num_context", f"needs at least one context block, got {k.num_context}")
    _need(0 < k.target_scale[0] <= k.target_scale[1] < 1, "mask.target_scale", "needs 0 < min <= max < 1")
    _need(0 < k.target_aspect[0] <= k.target_aspect[1], "mask.target_aspect", "needs 0 < min <= max")
    _need(0 < k.context_scale[0] <= k.context_scale[1] <= 1, "mask.context_scale", "needs 0 < min <= max <= 1")
    _need(k.min_keep >= 0, "mask.min_keep", f"must be 0 or more, got {k.min_keep}")


def _optim(o, d) -> None:
    _need(o.epochs >= 1, "optim.epochs", f"must be at least 1, got {o.epochs}")
    _need(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _need(o.start_lr >= 0, "optim.start_lr", f"must be 0 or more, got {o.start_lr}")
    _need(o.final_lr >= 0, "optim.final_lr", f"must be 0 or more, got {o.final_lr}")
    _need(o.warmup >= 0, "optim.warmup", f"must be 0 or more epochs, got {o.warmup}")
    _need(o.warmup <= o.epochs, "optim.warmup",
          f"{o.warmup} epochs of warm-up is longer than the run's optim.epochs={o.epochs}: the peak optim.lr would "
          f"never be reached")
    for key in ("lr", "start_lr", "final_lr"):
        value = getattr(o, key)
        _need(value <= 1, f"optim.{key}", f"{value} is far above any learning rate AdamW trains a ViT with "
              f"(the reference's peak is 1e-3)")
    _need(o.weight_decay >= 0, "optim.weight_decay", f"must be 0 or more, got {o.weight_decay}")
    _need(o.final_weight_decay >= 0, "optim.final_weight_decay", f"must be 0 or more, got {o.final_weight_decay}")
    _need(o.ipe_scale > 0, "optim.ipe_scale", f"must be positive, got {o.ipe_scale}")
    _need(0 <= o.ema[0] <= o.ema[1] <= 1, "optim.ema", "needs 0 <= start <= end <= 1")
    _need(all(0 <= b < 1 for b in o.betas), "optim.betas", f"each must be in [0, 1), got {list(o.betas)}")
    _need(o.eps > 0, "optim.eps", f"must be positive, got {o.eps}")
    _need(o.grad_clip is None or o.grad_clip > 0, "optim.grad_clip", "must be positive or null")
    _need(o.base_batch >= 1, "optim.base_batch", f"must be at least 1, got {o.base_batch}")
    _need(o.accum_steps >= 1 and d.batch_size % o.accum_steps == 0, "optim.accum_steps",
          f"must divide data.batch_size={d.batch_size}")
    _need(d.global_batch is None or o.accum_steps == 1, "optim.accum_steps",
          f"is derived from data.global_batch={d.global_batch}: leave it at 1 and set data.batch_size to the "
          f"micro-batch that fits memory")


DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


def _run(r) -> None:
    _need(bool(DEVICE.fullmatch(r.device)), "run.device",
          f"{r.device!r} is not a device: use auto, cpu, cuda or cuda:N")
    _need(r.log_every >= 1, "run.log_every", f"must be at least 1, got {r.log_every}")
    _need(r.max_steps is None or r.max_steps >= 1, "run.max_steps", f"must be at least 1 or null, got {r.max_steps}")
    _need(r.threads is None or r.threads >= 1, "run.threads", f"must be at least 1 or null, got {r.threads}")
    _need(r.checkpoint_every >= 0, "run.checkpoint_every", f"must be 0 (every epoch) or more, got {r.checkpoint_every}")
    _need(r.keep_last >= 1, "run.keep_last", f"must be at least 1, got {r.keep_last}")
    _need(r.keep_every_epochs >= 0, "run.keep_every_epochs", f"must be 0 (never) or more, got {r.keep_every_epochs}")
    _need(r.monitor_every >= 0, "run.monitor_every", f"must be 0 (off) or more, got {r.monitor_every}")
    _need(r.monitor_images >= 2, "run.monitor_images", f"must be at least 2, got {r.monitor_images}")
    _need(r.collapse_std >= 0, "run.collapse_std", f"must be 0 or more, got {r.collapse_std}")
    _need(0 <= r.collapse_rank <= 1, "run.collapse_rank", f"must be in [0, 1], got {r.collapse_rank}")
    _need(len(set(r.loggers)) == len(r.loggers), "run.loggers", f"names a logger twice: {list(r.loggers)}")
    _need(bool(r.wandb_project), "run.wandb_project", "must be a non-empty project name")
    _need(bool(r.tag) and "/" not in r.tag, "run.tag", f"must be a non-empty file-name prefix, got {r.tag!r}")


def config_warnings(cfg) -> list[str]:
    """Values that are legal but probably not meant, each as a line naming the key and why."""
    out = []
    o, r = cfg.optim, cfg.run
    if o.start_lr > o.lr:
        out.append(f"optim.start_lr={o.start_lr} is above optim.lr={o.lr}: the warm-up lowers the learning rate")
    if o.final_lr > o.lr:
        out.append(f"optim.final_lr={o.final_lr} is above optim.lr={o.lr}: the schedule ends higher than its peak")
    cpus = os.cpu_count() or 1
    if r.threads and r.threads > cpus:
        out.append(f"run.threads={r.threads} exceeds the {cpus} CPUs of this machine: the threads will compete for "
                   f"them (leave run.threads null for torch's default)")
    if cfg.model.name == "custom" and cfg.model.mlp_ratio < 1:
        out.append(f"model.mlp_ratio={cfg.model.mlp_ratio} makes the MLP narrower than the model (standard ViTs "
                   f"use 4)")
    if cfg.mask.num_targets > 16:
        out.append(f"mask.num_targets={cfg.mask.num_targets}: the predictor runs once per target block, so a step "
                   f"costs about {cfg.mask.num_targets / 4:.0f} times the reference's 4")
    return out
