"""Layer norm whose statistics and parameter gradients are fp32 whatever the activations' dtype.

On a bf16 path (the bf16 compute copy, FSDP's bf16 parameters) the input, the weight and the bias
are upcast, the normalisation runs in fp32 and the output is rounded once to the input's dtype.
Autograd then sums the weight and bias gradients over every row in fp32 and rounds them once; a
bf16 layer norm's backward (torch's CPU kernel) sums them in bf16, which loses most of the bias
gradient at tens of thousands of rows (docs/numerics.md). fp32 inputs take ``F.layer_norm`` as is.
"""
import torch
import torch.nn.functional as F
from torch import nn

LOW_PRECISION = (torch.bfloat16, torch.float16)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``F.layer_norm`` over the last dimension, computed in fp32 when ``x`` is bf16 or fp16."""
    shape = (x.shape[-1],)
    if x.dtype not in LOW_PRECISION:
        return F.layer_norm(x, shape, weight, bias, eps)
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), shape, w, b, eps).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and state-dict keys) computed by :func:`layer_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1:
            return super().forward(x)
        return layer_norm(x, self.weight, self.bias, self.eps)
