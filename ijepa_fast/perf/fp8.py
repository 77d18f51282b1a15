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

torchao is optional (``pip install 'ijepa-fast[fp8]'``) and imported only when ``perf.fp8`` is on.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError

RECIPES = ("rowwise", "tensorwise")
MIN_CAPABILITY = (8, 9)


def recipe(value) -> str | None:
    """``perf.fp8`` as a recipe name, or None when off (``true`` means rowwise)."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("false", "off", "none")):
        return None
    if value is True or (isinstance(value, str) and value.lower() in ("true", "on")):
        return "rowwise"
    if value in RECIPES:
        return value
    raise ConfigError(f"perf.fp8: {value!r} is not one of false, rowwise, tensorwise (true = rowwise)")


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


def fp8_ok(module: torch.nn.Module) -> bool:
    """FP8 GEMMs need both sides of the weight to be multiples of 16."""
    return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert(model, name: str, *, emulate: bool = False) -> int:
    """Swap the linear layers of ``model.encoder`` and ``model.target_encoder`` for torchao
    ``Float8Linear`` (recipe ``name``); returns how many were swapped. The predictor is untouched."""
    import dataclasses

    config_cls, convert_fn = _torchao()
    config = dataclasses.replace(config_cls.from_recipe_name(name), pad_inner_dim=True, emulate=emulate)
    before = sum(1 for m in model.modules() if type(m).__name__ == "Float8Linear")
    for part in (model.encoder, model.target_encoder):
        convert_fn(part, config=config, module_filter_fn=lambda mod, fqn: fp8_ok(mod))
    return sum(1 for m in model.modules() if type(m).__name__ == "Float8Linear") - before


def describe(name: str, count: int, emulate: bool) -> str:
    return (f"fp8 {name} (torchao Float8Linear on {count} encoder and target-encoder linear layers; predictor "
            f"unchanged{'; emulated, for testing' if emulate else ''})")
