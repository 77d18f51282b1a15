"""The target encoder's FP8 linear layers with weights cast once per step (``perf.fp8=target`` with
``perf.optimizer=fused_tail``).

``Float8TargetLinear`` replaces an ``nn.Linear`` of the target encoder that runs the forward pass
(the bf16 compute copy's under ``bf16_weights``, else the model's own). It keeps the layer's
``weight`` and ``bias`` parameters (the state dict's keys, shapes and dtypes are unchanged) and holds
two non-persistent buffers: ``weight_fp8`` [N, K] (float8_e4m3fn) and ``weight_scale`` [N] (fp32,
one scale per output row), the rowwise cast (``kernels/fp8_rows.py``) of the fp32 target master
weight. The fused tail writes them right after the EMA, from the master it has just updated, in one
launch over every such layer (``FusedTail``); the forward never casts the weight. It casts the
activation rowwise (one scale per token row) and runs

    torch._scaled_mm(x_fp8, weight_fp8.t(), scale_a=[M, 1], scale_b=[1, N], bias, out_dtype)

(``perf.fp8_emulate``: the same casts, then a dequantised fp32 matmul, on any device). The buffers
are cast at conversion and again whenever the master weights are loaded (a ``load_state_dict``
post-hook on the module holding the master), so they are never stale; ``refresh`` recasts them by
hand (``Engine.update_target`` calls it for loops that run the EMA outside the fused tail).

The layers are forward only: the target encoder runs without gradients. Without the fused tail,
``perf.fp8=target`` converts to torchao's ``Float8Linear`` instead (``fp8``), which casts the weight
in every forward.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.fp8_rows import FP8, fp8_rows_reference, rows_to_fp8
from . import fp8


class Float8TargetLinear(nn.Linear):
    """A forward-only linear layer whose weight is read from its float8 buffers. ``source``: the
    ``nn.Linear`` holding the fp32 master weight when that is another module (the fp32 model's,
    behind a bf16 compute copy); None when it is this layer's own weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 emulate: bool = False, source: nn.Linear | None = None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.emulate = emulate
        self._source = (source,)  # a tuple: the master's module is not a child of this one
        self.register_buffer("weight_fp8", torch.zeros(out_features, in_features, dtype=FP8, device=device),
                             persistent=False)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device),
                             persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, emulate: bool = False, source: nn.Linear | None = None):
        """The FP8 layer over ``linear``'s own parameters (the same tensors), its buffers cast from the
        master (``source``'s weight, or ``linear``'s) and recast whenever the master is loaded."""
        dev = linear.weight.device
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                    emulate=emulate, source=source)
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.weight_fp8 = torch.zeros(layer.weight_fp8.shape, dtype=FP8, device=dev)
        layer.weight_scale = torch.ones(layer.weight_scale.shape, dtype=torch.float32, device=dev)
        layer.train(linear.training)
        if source is None:
            layer.register_load_state_dict_post_hook(_refresh_on_load)
        else:
            source.register_load_state_dict_post_hook(lambda module, keys: layer.refresh())
        layer.refresh()
        return layer

    @property
    def master_weight(self) -> torch.Tensor:
        """The fp32 weight the buffers are cast from (the target master)."""
        source = self._source[0]
        return (source if source is not None else self).weight

    @torch.no_grad()
    def refresh(self) -> None:
        """``weight_fp8`` and ``weight_scale`` recast from the master weight (the reference path)."""
        fp8_rows_reference([self.master_weight.detach().float()], [self.weight_fp8], [self.weight_scale])

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the forward uses, in fp32: ``weight_fp8 * weight_scale`` per row."""
        return self.weight_fp8.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            raise RuntimeError("Float8TargetLinear is forward only (the target encoder's layers under "
                               "perf.fp8=target): run it under torch.no_grad(), or set perf.fp8=false")
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        lead, k = x.shape[:-1], x.shape[-1]
        x_fp8, x_scale = rows_to_fp8(x.reshape(-1, k))
        if self.emulate:
            bias = self.bias.float() if self.bias is not None else None
            y = F.linear(x_fp8.float() * x_scale, self.dequantized_weight(), bias).to(out_dtype)
        else:
            # CUDA's rowwise-scaled matmul writes bf16 (with a bf16 bias): other outputs are cast from it
            mm_dtype = torch.bfloat16 if dev == "cuda" else out_dtype
            bias = self.bias.to(mm_dtype) if self.bias is not None else None
            y = torch._scaled_mm(x_fp8, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale.view(1, -1),
                                 bias=bias, out_dtype=mm_dtype).to(out_dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8=e4m3 rowwise{', emulated' if self.emulate else ''}"


def _refresh_on_load(layer: Float8TargetLinear, incompatible_keys) -> None:
    layer.refresh()


def convert(run, master_model, *, min_features: int, emulate: bool = False) -> int:
    """Swap the linear layers of ``run.target_encoder`` whose both dimensions are multiples of 16 and
    >= ``min_features`` for ``Float8TargetLinear``, their buffers cast from ``master_model``'s
    target encoder (the fp32 weights of record; ``run`` itself when it is the fp32 model). Returns
    how many were swapped."""
    target, masters = run.target_encoder, master_model.target_encoder
    names = [n for n, m in target.named_modules() if type(m) is nn.Linear and fp8.fp8_ok(m, min_features)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = target.get_submodule(parent_name)
        source = masters.get_submodule(name) if master_model is not run else None
        setattr(parent, child, Float8TargetLinear.from_linear(getattr(parent, child), emulate=emulate, source=source))
    return len(names)


def layers(module: nn.Module) -> list[Float8TargetLinear]:
    """Every ``Float8TargetLinear`` in ``module``, in module order."""
    return [m for m in module.modules() if isinstance(m, Float8TargetLinear)]


def refresh(module: nn.Module) -> None:
    """Every FP8 target layer's buffers recast from its master weight."""
    for layer in layers(module):
        layer.refresh()


def describe(count: int, emulate: bool, min_features: int) -> str:
    size = f", both dimensions >= {min_features}" if min_features > fp8.ELIGIBLE_MIN_DIM else ""
    how = "a dequantised fp32 matmul, emulated for testing" if emulate else "torch._scaled_mm"
    return (f"fp8 target (rowwise e4m3 weights written by the fused tail after the EMA, on {count} target-encoder "
            f"linear layers{size}; activations cast per token row; {how}; context encoder and predictor unchanged)")
