"""Timing the training step (``ijepa-fast bench`` and ``benchmarks/bench_step.py``).

One measurement = one model at one batch, with reference-mode or default masks, with the fast
paths on or off, on synthetic images (the data pipeline is measured separately). It reports
images/s, tokens/s, model TFLOP/s and MFU against a matmul peak measured on the same device (and
against the card's spec peak, see ``bench_report``), peak memory, and GPU-hours projected for each
published recipe that uses this model. ``fp8`` adds FP8 linear layers (``perf.fp8``) to the fast path.

Model FLOPs per image count 2 x MACs of the linear layers and attention matmuls: the target
encoder forward on all N tokens, 3 x the context encoder forward on the context tokens, and 3 x
the predictor forward on each (context + target block) sequence, as in the reference figures.
"""
from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..config import Config, MaskConfig, PerfConfig, merge
from ..errors import ConfigError
from ..model import IJEPA
from ..models import VIT_SIZES
from ..training.engine import Engine
from ..training.schedules import Schedules
from ..training.step import read_results
from .report import RECIPES, add_spec_mfu, gpu_hours  # noqa: F401  (RECIPES: re-exported)

PUBLISHED_BATCH = {"vit_base": 256, "vit_large": 128, "vit_huge": 128, "vit_giant": 16, "vit_small": 256,
                   "vit_tiny": 256}


def vit_flops(dim: int, depth: int, mlp: int, tokens: float) -> float:
    """Forward FLOPs of ``depth`` pre-norm blocks on one sequence of ``tokens`` tokens (2 x MACs)."""
    linear = 2 * tokens * (4 * dim * dim + 2 * dim * mlp)
    attn = 2 * 2 * tokens * tokens * dim
    return depth * (linear + attn)


def model_flops_per_image(model: IJEPA, n_tokens: int, ctx_tokens: float, tgt_per_block: float, k: int) -> float:
    enc = model.encoder
    dim, depth = enc.embed_dim, len(enc.blocks)
    mlp = enc.blocks[0].mlp.fc1.out_features
    pred = model.predictor
    pdim = pred.predictor_embed.out_features
    pdepth = len(pred.predictor_blocks)
    pmlp = pred.predictor_blocks[0].mlp.fc1.out_features if pdepth else 4 * pdim
    fl = vit_flops(dim, depth, mlp, n_tokens)
    fl += 3 * vit_flops(dim, depth, mlp, ctx_tokens)
    fl += 3 * k * vit_flops(pdim, pdepth, pmlp, ctx_tokens + tgt_per_block)
    return fl


def matmul_peak_tflops(device: torch.device) -> float | None:
    """bf16 8192^3 matmul TFLOP/s on this GPU (None on the CPU)."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times) / 1e12


@dataclass(kw_only=True)
class BenchSpec:  # keyword-only: ten fields of like types
    model: str = "vit_huge"
    patch: int = 14
    img: int = 224
    batch: int = 128
    pred_depth: int = 12
    mask_mode: str = "reference"
    fast: bool = True
    fp8: str | None = None  # 'rowwise' or 'tensorwise' on the fast path (perf.fp8)
    perf: dict = field(default_factory=dict)  # more perf.* settings on the fast path: {"optimizer": "fused_tail"}
    steps: int = 10
    warmup: int = 3
    device: str = "cuda"


@dataclass
class StepSetup:
    """A benchmark step, built once: ``step(i)`` runs training step ``i`` on the ``i``-th mask batch
    through ``engine`` (the trainer's step, assembled by ``Engine.from_config`` from ``cfg``)."""
    engine: Engine
    cfg: Config
    pool: list
    images: torch.Tensor
    step: object

    @property
    def model(self) -> IJEPA:
        return self.engine.model


def bench_config(spec: BenchSpec, mask: MaskConfig | None = None, base: Config | None = None) -> Config:
    """The run config a benchmark times: ``base`` (default: the recipes' defaults, every perf switch
    'auto') with only the spec's model, image size, batch, masks and perf switches changed. The plain
    path (``fast=False``) is ``perf.preset=plain`` with the reference kernels and the padded layout."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    cfg.model.name, cfg.model.patch_size, cfg.model.pred_depth = spec.model, spec.patch, spec.pred_depth
    cfg.data.crop_size, cfg.data.batch_size = spec.img, spec.batch
    cfg.mask = copy.deepcopy(mask) if mask is not None else dataclasses.replace(cfg.mask, mode=spec.mask_mode)
    if not spec.fast:
        if spec.perf or spec.fp8:
            raise ValueError("perf settings apply to the fast path only")
        cfg.perf.preset, cfg.model.kernels, cfg.model.layout = "plain", "reference", "padded"
    if spec.fp8:
        cfg.perf.fp8 = spec.fp8
    merge(cfg.perf, dict(spec.perf), "perf.")
    return cfg


def build_step(spec: BenchSpec, batches: int, mask: MaskConfig | None = None, *, base: Config | None = None,
               steps_per_epoch: int = 1000) -> StepSetup:
    """The step ``ijepa-fast train`` would run with ``bench_config(spec, mask, base)``, built by the
    same constructor (``Engine.from_config``), ``batches`` mask batches of its sampler and synthetic
    images. Shared by ``run``, benchmarks/profile_step.py and the tests that prove the steps equal."""
    device = torch.device(spec.device)
    cfg = bench_config(spec, mask, base)
    engine = Engine.from_config(cfg, device=device, schedules=Schedules.from_config(cfg.optim, steps_per_epoch))
    pool = [engine.masks(spec.batch, s) for s in range(batches)]
    images = torch.randn(spec.batch, 3, spec.img, spec.img, device=device)

    def step(i):
        return engine.step(images, i, pool[i])

    return StepSetup(engine, cfg, pool, images, step)


def run(spec: BenchSpec, peak_tflops: float | None = None) -> dict:
    """Time ``spec.steps`` training steps after ``spec.warmup``; one result row."""
    device = torch.device(spec.device)
    setup = build_step(spec, spec.warmup + spec.steps)
    engine, pool, step = setup.engine, setup.pool, setup.step
    model, perf = engine.model, engine.perf
    grid = model.grid
    ctx = statistics.mean(m.mean_tokens()[0] for m in pool)
    tgt = statistics.mean(m.mean_tokens()[1] for m in pool)
    k = pool[0].targets.shape[0]

    t0 = time.time()
    engine.warm_up(spec.batch)
    for i in range(spec.warmup):
        step(i)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    warm_s = time.time() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(spec.warmup, spec.warmup + spec.steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            res = step(i)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            res = step(i)
            times.append(time.perf_counter() - t)
    if res.deferred:
        (res,) = read_results([(spec.warmup + spec.steps - 1, res)])
    sec = statistics.median(times)
    n = grid[0] * grid[1]
    flops = model_flops_per_image(model, n, ctx, tgt / k, k)
    row = {"bench": "step", "model": spec.model, "patch": spec.patch, "img": spec.img, "batch": spec.batch,
           "pred_depth": spec.pred_depth, "masks": spec.mask_mode, "fast": spec.fast, "fp8": spec.fp8,
           "device": str(device),
           "step_ms": round(sec * 1e3, 2), "images_per_s": round(spec.batch / sec, 1),
           "ctx_tokens_per_img": round(ctx, 1), "ctx_tokens_per_s": round(spec.batch * ctx / sec),
           "tokens_per_s": round(spec.batch * (n + ctx + k * (ctx + tgt / k)) / sec),
           "gflop_per_img": round(flops / 1e9, 1), "tflops": round(flops * spec.batch / sec / 1e12, 2),
           "loss": round(res.loss, 4), "warmup_s": round(warm_s, 1), "layout": _layout(engine.prepare(pool[0])),
           "kernels": model.kernels, "perf": perf_name(spec), "perf_resolved": dataclasses.asdict(perf),
           "optimizer": "fused_tail" if engine.tail is not None else perf.optimizer}
    if peak_tflops:
        row["matmul_peak_tflops"] = round(peak_tflops, 1)
        row["mfu"] = round(row["tflops"] / peak_tflops, 3)
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        row["gpu"] = torch.cuda.get_device_name(device)
        add_spec_mfu(row)
    row["gpu_hours"] = gpu_hours(row["images_per_s"], spec.model, spec.patch, spec.img)
    return row


def perf_name(spec: BenchSpec):
    """The row's name for its switches: 'defaults' (what ``ijepa-fast train`` runs with the recipe as
    shipped: every switch 'auto'), 'plain', or the switches set by hand (``['fp8=rowwise', 'k=v']``)."""
    if not spec.fast:
        return "plain"
    if not spec.perf and not spec.fp8:
        return "defaults"
    return ([f"fp8={spec.fp8}"] if spec.fp8 else []) + [f"{k}={v}" for k, v in spec.perf.items()]


def _layout(masks) -> str:
    from ..perf.packing import PackedMasks

    return "packed" if isinstance(masks, PackedMasks) else "padded" if masks.context_lens is not None else "dense"


def check_model(name: str) -> None:
    if name not in VIT_SIZES:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(VIT_SIZES)}")


def run_command(args) -> int:
    """``ijepa-fast bench``: one JSON line per (masks, step) measured. For each mask mode the first row
    is the step ``ijepa-fast train`` runs with the recipe as shipped (``"perf": "defaults"``, every
    switch resolved for the device in ``perf_resolved``); the plain path (``--paths plain|both``) and
    the ``--perf`` / ``--fp8`` variant are extra rows."""
    import json

    check_model(args.model)
    bad = [kv for kv in args.perf if "=" not in kv]
    if bad:
        raise ConfigError(f"--perf {bad[0]}: expected KEY=VALUE, e.g. --perf optimizer=fused_tail")
    perf = dict(kv.removeprefix("perf.").split("=", 1) for kv in args.perf)
    merge(PerfConfig(), dict(perf), "perf.")  # a wrong key or value stops here, before any work
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    peak = matmul_peak_tflops(device)
    masks = ("reference", "default") if args.masks == "both" else (args.masks,)
    patch = args.patch or (14 if args.model == "vit_huge" else 16)
    variants = [(True, None, {})]  # the defaults first
    if args.paths in ("plain", "both"):
        variants.append((False, None, {}))
    if perf or args.fp8:
        variants.append((True, args.fp8, perf))
    for mode in masks:
        for fast, fp8, extra in variants:
            spec = BenchSpec(model=args.model, patch=patch, img=args.img, mask_mode=mode, fast=fast,
                             batch=args.batch or PUBLISHED_BATCH[args.model], pred_depth=args.pred_depth,
                             steps=args.steps, warmup=args.warmup, device=str(device), fp8=fp8, perf=extra)
            row = run(spec, peak)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0
