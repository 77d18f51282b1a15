"""FP8 training of the encoders' linear layers (``perf.fp8``), through torchao's float8 training.

The context encoder's and the target encoder's ``nn.Linear`` layers (qkv, attention projection,
MLP) become torchao ``Float8Linear`` modules: each matmul of the forward and backward passes casts
its operands to float8 (e4m3) with dynamic scales (``tensorwise``: one scale per tensor;
``rowwise``: one per row, the more accurate recipe) and runs on the FP8 tensor cores. The
patch embedding (a convolution), the layer norms, attention itself and the whole predictor keep
their precision. The weights stay the same ``nn.Parameter`` objects, fp32 masters or the bf16
compute copy, so the optimiser, the EMA and the checkpoints are unchanged (the state dict has
the same keys, shapes and dtypes).

The token count of a batch (the inner dimension of each weight-gradient matmul) is rarely a multiple
of 16 (masks make it vary from step to step), which ``torch._scaled_mm`` requires: the layers are
converted with torchao's ``pad_inner_dim``, which pads the inner dimension of each FP8 matmul with
zeros up to the next multiple of 16 (an exact result; a copy only of the operands that need it).

FP8 matmuls need a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell).
``perf.fp8_emulate`` runs the same casts with high-precision matmuls on any device: for testing
the numerics, with no speed-up.

``perf.fp8=target`` converts only the target encoder (rowwise scaling): its forward pass, which
runs without gradients on every image at full resolution, is about half of the encoders' linear
FLOPs that a step spends without a backward pass, so FP8 there changes no gradient arithmetic, only
the regression targets (to FP8 precision). With the fused tail (``perf.optimizer=fused_tail``) its
layers become ``fp8_target.Float8TargetLinear``: float8 weights with one scale per output row, which
the tail writes right after the EMA from the fp32 target master (one launch of
``kernels/fp8_rows.py`` over every layer), so no forward casts a weight; torchao is not needed.
Without the fused tail they are torchao ``Float8Linear`` layers, which cast the target's weights in
each forward (dynamic scaling). The log line names the path that runs.

Size threshold (``perf.fp8_min_dim``; auto = ``TARGET_MIN_DIM`` = 1024 under ``fp8=target``, every
eligible layer otherwise): FP8 pays only when the matmul's time saved exceeds the casts it adds.
Casting an [M, K] activation reads it (bf16, plus its amax) and writes it in float8, ~6 bytes per
element, while the matmul's time per element of that activation is 2N flops; FP8 halves that time
on Hopper. At ~990 dense bf16 TFLOP/s and ~4.8 TB/s (H100 / H200) the half saved, N / 990e12 s,
beats 6 / 4.8e12 s of casting when N >~ 1200, and the same holds for K and the weight's cast.
Layers whose both dimensions are >= 1024 therefore qualify: all of ViT-H's (1280, 3840, 5120) and
ViT-L's (1024 ...), none of ViT-B's (768). The figure is an estimate from the card's ratio of compute
to bandwidth, not yet a measured one.

torchao is optional (``pip install 'ijepa-fast[fp8]'``) and imported only when ``perf.fp8`` converts through it
(not by ``perf.fp8=target`` with the fused tail).
"""
from __future__ import annotations

import torch

from ..errors import ConfigError

RECIPES = ("rowwise", "tensorwise")
MIN_CAPABILITY = (8, 9)
TARGET_MIN_DIM = 1024  # perf.fp8_min_dim=auto under fp8=target (see the module's text)
ELIGIBLE_MIN_DIM = 16  # FP8 GEMMs need multiples of 16


def recipe(value) -> str | None:
    """``perf.fp8`` as a recipe name, or None when off (``true`` and ``target`` mean rowwise)."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("false", "off", "none")):
        return None
    if value is True or (isinstance(value, str) and value.lower() in ("true", "on", "target")):
        return "rowwise"
    if value in RECIPES:
        return value
    raise ConfigError(f"perf.fp8: {value!r} is not one of false, rowwise, tensorwise, target (true = rowwise)")


def parts(value) -> tuple[str, ...]:
    """The model parts whose linear layers ``perf.fp8`` converts."""
    return ("target_encoder",) if value == "target" else ("encoder", "target_encoder")


def min_dim(value, setting="auto") -> int:
    """``perf.fp8_min_dim`` resolved: a layer converts when both its dimensions reach it."""
    if setting in ("auto", None):
        return TARGET_MIN_DIM if value == "target" else ELIGIBLE_MIN_DIM
    try:
        n = int(setting)
    except (TypeError, ValueError):
        n = -1
    if n < 0:
        raise ConfigError(f"perf.fp8_min_dim: {setting!r} is not 'auto' or a whole number >= 0")
    return n


def check_device(device: torch.device, emulate: bool) -> None:
    """FP8 matmuls need CUDA compute capability >= 8.9, unless emulated."""
    if emulate:
        return
    if device.type != "cuda":
        raise ConfigError(f"perf.fp8: FP8 training needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper or "
                          f"newer); this run is on {device.type}. Set perf.fp8=false (perf.fp8_emulate=true emulates "
                          "the FP8 casts for testing, without a speed-up)")
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        raise ConfigError(f"perf.fp8: FP8 training needs compute capability >= 8.9 (Ada, Hopper or newer); "
                          f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}. Set perf.fp8=false")


def _torchao():
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ConfigError(f"perf.fp8 needs torchao, which is not installed ({e}): "
                          "pip install 'ijepa-fast[fp8]'") from None
    return Float8LinearConfig, convert_to_float8_training


def fp8_ok(module: torch.nn.Module, min_features: int = ELIGIBLE_MIN_DIM) -> bool:
    """FP8 GEMMs need both sides of the weight to be multiples of 16; and both at least ``min_features``."""
    return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0 \
        and min(module.in_features, module.out_features) >= min_features


def convert(model, name: str, *, emulate: bool = False, parts: tuple[str, ...] = ("encoder", "target_encoder"),
            min_features: int = ELIGIBLE_MIN_DIM) -> int:
    """Swap the linear layers of ``model``'s ``parts`` (default the encoder and the target encoder)
    whose both dimensions are multiples of 16 and >= ``min_features`` for torchao ``Float8Linear``
    (recipe ``name``); returns how many were swapped. The predictor is untouched."""
    import dataclasses

    config_cls, convert_fn = _torchao()
    config = dataclasses.replace(config_cls.from_recipe_name(name), pad_inner_dim=True, emulate=emulate)
    before = sum(1 for m in model.modules() if type(m).__name__ == "Float8Linear")
    for part in parts:
        convert_fn(getattr(model, part), config=config, module_filter_fn=lambda mod, fqn: fp8_ok(mod, min_features))
    return sum(1 for m in model.modules() if type(m).__name__ == "Float8Linear") - before


def describe(name: str, count: int, emulate: bool, value=None, min_features: int = ELIGIBLE_MIN_DIM) -> str:
    where = "target-encoder (forward only)" if value == "target" else "encoder and target-encoder"
    size = f", both dimensions >= {min_features}" if min_features > ELIGIBLE_MIN_DIM else ""
    recast = "; weights cast in every forward (perf.optimizer=fused_tail writes them once per step instead)" \
        if value == "target" else ""
    return (f"fp8 {name} (torchao Float8Linear on {count} {where} linear layers{size}; predictor "
            f"unchanged{recast}{'; emulated, for testing' if emulate else ''})")
