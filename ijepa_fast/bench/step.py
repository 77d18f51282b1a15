"""Timing the training step (``ijepa-fast bench`` and ``benchmarks/bench_step.py``).

One measurement = the step ``ijepa-fast train`` runs for one run config (``measure``), built by the
same assembler (``Engine.from_config``), on synthetic images (the data pipeline is measured
separately). What a row's batch is: one optimiser step on one device of ``data.batch_size`` images
(split into ``optim.accum_steps`` micro-batches when set). With ``data.global_batch`` the timed step
is one device's share of the recipe as published: ``global_batch / batch_size`` devices each running
``data.batch_size`` images a step without accumulation (the recipes: 2048 = 16 x 128 for ViT-H/14),
so images/s is per device and GPU-hours follow from it; the cross-device gradient reduction is not
timed. The row records ``global_batch`` and ``devices_at_global_batch``.

A row reports images/s (the median of ``repeats`` timed windows of ``steps`` steps each, with their
spread in ``windows``), tokens/s, model TFLOP/s and MFU against a matmul peak measured on the same
device (and against the card's spec peak, see ``bench_report``), peak memory, GPU-hours projected
for each published recipe that uses this model, and ``row_metadata`` (card, driver, torch, CUDA,
Triton, commit, a hash of the config). ``BenchSpec`` + ``run`` is the older form (one model at one
batch, with reference-mode or default masks, the fast paths on or off), turned into a config by
``bench_config``.

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
from ..perf import fp8 as fp8_switch
from ..training.engine import Engine
from ..training.schedules import Schedules
from ..training.step import autocast_dtype, read_results
from .report import RECIPES, add_spec_mfu, gpu_hours  # noqa: F401  (RECIPES: re-exported)
from .suite import row_metadata, window_stats

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
    repeats: int = 1  # timed windows of ``steps`` steps each (the row: their median and spread)
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
    """The step ``ijepa-fast train`` would run with ``bench_config(spec, mask, base)`` (see
    ``build_from_config``). Shared by ``run``, benchmarks/profile_step.py and the tests that prove
    the steps equal."""
    return build_from_config(bench_config(spec, mask, base), batches, spec.device, steps_per_epoch=steps_per_epoch)


def timed_config(cfg: Config) -> Config:
    """The config in the terms one device's step runs (the module docstring): ``data.global_batch``
    dropped, so that the step is ``data.batch_size`` images (with ``optim.accum_steps`` as set)."""
    if cfg.data.global_batch is None:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, global_batch=None))


def build_from_config(cfg: Config, batches: int, device, *, steps_per_epoch: int = 1000) -> StepSetup:
    """The step ``ijepa-fast train`` would run with ``cfg`` on ``device``, built by the same
    constructor (``Engine.from_config``), ``batches`` mask batches of its sampler and synthetic
    images of ``data.batch_size`` x ``data.crop_size``."""
    device = torch.device(device)
    cfg = timed_config(cfg)
    batch, img = cfg.data.batch_size, cfg.data.crop_size
    engine = Engine.from_config(cfg, device=device, schedules=Schedules.from_config(cfg.optim, steps_per_epoch))
    pool = [engine.masks(batch, s) for s in range(batches)]
    images = torch.randn(batch, 3, img, img, device=device)

    def step(i):
        return engine.step(images, i, pool[i])

    return StepSetup(engine, cfg, pool, images, step)


def run(spec: BenchSpec, peak_tflops: float | None = None) -> dict:
    """Time ``spec.repeats`` windows of ``spec.steps`` training steps after ``spec.warmup``; one row."""
    return measure(bench_config(spec), device=spec.device, steps=spec.steps, warmup=spec.warmup,
                   repeats=spec.repeats, peak_tflops=peak_tflops)


def _timed_window(step, first: int, steps: int, device: torch.device) -> tuple[list[float], object]:
    """Seconds of each of steps ``first`` .. ``first + steps - 1``, and the last step's result."""
    times, res = [], None
    for i in range(first, first + steps):
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
    return times, res


def measure(cfg: Config, *, device, steps: int = 10, warmup: int = 3, repeats: int = 1,
            peak_tflops: float | None = None) -> dict:
    """Time the step ``ijepa-fast train`` runs with ``cfg`` (``build_from_config``): ``warmup``
    untimed steps, then ``repeats`` windows of ``steps`` timed steps. A window's figure is the
    batch over its median step time; the row's ``images_per_s`` is the median of the windows, and
    ``windows`` their ``window_stats`` (median, min, max, spread). One result row (see the module
    docstring), with ``row_metadata``."""
    if steps < 1 or warmup < 0 or repeats < 1:
        raise ConfigError(f"bench: steps ({steps}) and repeats ({repeats}) must be at least 1, warmup ({warmup}) "
                          f"at least 0")
    device = torch.device(device)
    setup = build_from_config(cfg, warmup + steps * repeats, device)
    engine, pool, step, batch = setup.engine, setup.pool, setup.step, setup.cfg.data.batch_size
    model, perf = engine.model, engine.perf
    grid = model.grid
    ctx = statistics.mean(m.mean_tokens()[0] for m in pool)
    tgt = statistics.mean(m.mean_tokens()[1] for m in pool)
    k = pool[0].targets.shape[0]

    t0 = time.time()
    engine.warm_up(batch)
    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm_s = time.time() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    figures = []
    for w in range(repeats):
        times, res = _timed_window(step, warmup + w * steps, steps, device)
        figures.append(batch / statistics.median(times))
    if res.deferred:
        (res,) = read_results([(warmup + steps * repeats - 1, res)])
    windows = window_stats(figures)
    sec = batch / windows["median"]
    n = grid[0] * grid[1]
    flops = model_flops_per_image(model, n, ctx, tgt / k, k)
    m = cfg.model
    g = cfg.data.global_batch
    row = {"bench": "step", "model": m.name, "patch": m.patch_size, "img": cfg.data.crop_size, "batch": batch,
           "pred_depth": m.pred_depth, "masks": cfg.mask.mode, "fast": perf.preset != "plain",
           "fp8": fp8_name(perf.fp8), "device": str(device), "accum_steps": setup.cfg.optim.accum_steps,
           "global_batch": g, "devices_at_global_batch": g / batch if g else None,
           "step_ms": round(sec * 1e3, 2), "images_per_s": round(windows["median"], 1), "windows": windows,
           "ctx_tokens_per_img": round(ctx, 1), "ctx_tokens_per_s": round(batch * ctx / sec),
           "tokens_per_s": round(batch * (n + ctx + k * (ctx + tgt / k)) / sec),
           "gflop_per_img": round(flops / 1e9, 1), "tflops": round(flops * batch / sec / 1e12, 2),
           "loss": round(res.loss, 4), "warmup_s": round(warm_s, 1), "layout": _layout(engine.prepare(pool[0])),
           "kernels": model.kernels, "perf": config_perf_name(cfg), "perf_resolved": dataclasses.asdict(perf),
           "optimizer": "fused_tail" if engine.tail is not None else perf.optimizer,
           "precision": "bf16 weights" if engine.master is not None else
           "bf16 autocast" if autocast_dtype(device, engine.precision) is not None else "fp32"}
    if peak_tflops:
        row["matmul_peak_tflops"] = round(peak_tflops, 1)
        row["mfu"] = round(row["tflops"] / peak_tflops, 3)
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
        if perf.cuda_graphs is True:  # a captured graph's pool is reserved, but not counted as allocated on replay
            row["peak_mem_gib"], row["peak_mem_kind"] = row["peak_reserved_gib"], "reserved (CUDA graph pool)"
        row["gpu"] = torch.cuda.get_device_name(device)
        add_spec_mfu(row)
    row["gpu_hours"] = gpu_hours(row["images_per_s"], m.name, m.patch_size, cfg.data.crop_size)
    row.update(row_metadata(cfg.to_dict(), str(device)))
    return row


def fp8_name(value) -> str | None:
    """``perf.fp8`` as a row names it: None (off), 'target' (the target encoder only) or the recipe."""
    recipe = fp8_switch.recipe(value)
    return "target" if recipe and value == "target" else recipe


def config_perf_name(cfg: Config):
    """A config's name for its switches: 'plain' (``perf.preset=plain``), 'defaults' (no perf key
    set: what ``ijepa-fast train`` runs with the recipe as shipped, every switch 'auto'), else the
    switches set by hand, fp8 first (``['fp8=rowwise', 'compile=false']``)."""
    if cfg.perf.preset == "plain":
        return "plain"
    base = PerfConfig()
    keys = sorted((f.name for f in dataclasses.fields(base)), key=lambda name: name != "fp8")
    return [f"{name}={str(v).lower() if isinstance(v, bool) else v}" for name in keys
            if (v := getattr(cfg.perf, name)) != getattr(base, name)] or "defaults"


def _layout(masks) -> str:
    from ..perf.packing import PackedMasks

    return "packed" if isinstance(masks, PackedMasks) else "padded" if masks.context_lens is not None else "dense"


def check_model(name: str) -> None:
    if name not in VIT_SIZES:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(VIT_SIZES)}")
