"""The I-JEPA model: context encoder and predictor (trained), target encoder (their EMA), and the loss.

``IJEPA`` holds the three networks and computes the loss of a batch::

    model = IJEPA.build("vit_huge", img_size=224, patch_size=14, pred_depth=12)
    loss = model.loss(images, masks)      # target encoder -> layer norm -> gather; context encoder; predictor
    model.update_target(momentum)         # after the optimiser step

The optimiser and the whole training step (schedules, autocast, micro-batches) are ``step``'s.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ._compat import keyword_only
from .kernels.dispatch import BACKENDS
from .kernels.ema import ema_update_
from .kernels.gather_layernorm import gather_layernorm
from .kernels.jepa_loss import KINDS as LOSSES
from .kernels.jepa_loss import jepa_loss as _jepa_loss
from .masks import MaskBatch
from .models import VisionTransformer, VisionTransformerPredictor, build_encoder, build_predictor
from .models.layers import Attention, reinit_linear_and_norm
from .models.varlen import BACKENDS as VARLEN_BACKENDS
from .models.varlen import available as varlen_available
from .perf import buckets
from .perf.packing import PackedMasks, pack

LAYOUTS = ("auto", "padded", "packed")


def jepa_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "smooth_l1",
              valid: torch.Tensor | None = None, backend: str = "reference") -> torch.Tensor:
    """Mean smooth-L1 (beta 1) or squared error over every element of the real target rows.

    pred, target: [R, L, D]; valid: optional bool [R, L], False at padding rows.
    """
    return _jepa_loss(pred, target, kind, valid, backend=backend)


class IJEPA(nn.Module):
    """Context encoder + predictor (trained) and target encoder (EMA of the encoder)."""

    def __init__(self, encoder: VisionTransformer, predictor: VisionTransformerPredictor,
                 target_encoder: VisionTransformer | None = None, *, loss_type: str = "smooth_l1"):
        super().__init__()
        if loss_type not in LOSSES:
            raise ValueError(f"unknown loss {loss_type!r}; choose one of {LOSSES}")
        self.encoder = encoder
        self.predictor = predictor
        self.target_encoder = target_encoder if target_encoder is not None else copy.deepcopy(encoder)
        self.target_encoder.requires_grad_(False)
        self.loss_type = loss_type
        self.configure_kernels("auto")
        self.configure_layout("auto", "auto")
        self.token_buckets = 0  # token counts rounded up to this many sizes per doubling (0: as they are)

    def configure_layout(self, layout: str = "auto", varlen_attn: str = "auto") -> IJEPA:
        """How context sequences of different lengths run: 'packed' (concatenated, no padding,
        variable-length attention by ``varlen_attn``), 'padded' (to the longest, with key masks),
        or 'auto' (packed whenever lengths differ and a fused variable-length attention kernel can
        run: on CUDA with flash-attn, PyTorch's varlen_attn or xformers; padded otherwise, since
        nested-tensor attention on the CPU is slower than the padding it saves)."""
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
        if varlen_attn not in VARLEN_BACKENDS:
            raise ValueError(f"unknown varlen attention backend {varlen_attn!r}; choose one of {VARLEN_BACKENDS}")
        self.layout = layout
        for mod in self.modules():
            if isinstance(mod, Attention):
                mod.varlen_impl = varlen_attn
        return self

    def configure_kernels(self, backend: str = "auto", deterministic: bool = False) -> IJEPA:
        """Choose the fused ops' implementation: 'auto' (Triton on CUDA), 'triton' or 'reference'.

        ``deterministic`` makes the token gather's backward bit-reproducible (sorted, no atomics).
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
        self.kernels = backend
        for enc in (self.encoder, self.target_encoder):
            enc.kernels, enc.deterministic = backend, deterministic
        self.predictor.kernels = backend
        return self

    @classmethod
    @keyword_only(2, ("img_size", "patch_size", "pred_depth", "pred_dim", "pred_heads", "init", "loss", "attn"))
    def build(cls, name: str = "vit_huge", *, img_size=224, patch_size: int = 14, pred_depth: int = 12,
              pred_dim: int = 384, pred_heads: int | None = None, init: str = "released", loss: str = "smooth_l1",
              attn: str = "sdpa", init_std: float = 0.02, **encoder_kw) -> IJEPA:
        """Fresh models, initialised as the released training script does (``init='released'``).

        ``name``: a standard size (``vit_tiny`` .. ``vit_giant``) or ``custom`` (then pass
        ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``)."""
        if name == "custom":
            encoder = VisionTransformer(img_size=img_size, patch_size=patch_size, attn_impl=attn, init_std=init_std,
                                        **encoder_kw)
        else:
            encoder = build_encoder(name, img_size, patch_size, attn_impl=attn, init_std=init_std, **encoder_kw)
        predictor = build_predictor(encoder.grid, encoder.embed_dim, pred_heads or encoder.num_heads,
                                    pred_dim, pred_depth, attn_impl=attn, init_std=init_std)
        if init == "released":
            reinit_linear_and_norm(encoder, init_std)
            reinit_linear_and_norm(predictor, init_std)
        elif init != "rescaled":
            raise ValueError(f"unknown init {init!r}; use 'released' or 'rescaled'")
        return cls(encoder, predictor, loss_type=loss)

    @classmethod
    def from_config(cls, cfg) -> IJEPA:
        m = cfg.model
        extra = {}
        if m.name == "custom":
            extra = dict(embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio)
        model = cls.build(m.name, img_size=cfg.data.crop_size, patch_size=m.patch_size, pred_depth=m.pred_depth,
                          pred_dim=m.pred_dim, pred_heads=m.pred_heads, init=m.init, loss=cfg.optim.loss, attn=m.attn,
                          init_std=m.init_std, **extra)
        model.configure_layout(m.layout, m.varlen_attn)
        return model.configure_kernels(m.kernels, cfg.run.deterministic)

    @property
    def grid(self) -> tuple[int, int]:
        return self.encoder.grid

    # -- the three forward passes
    def prepare(self, masks: MaskBatch | PackedMasks) -> MaskBatch | PackedMasks:
        """The masks in the layout this model runs them in (packing them if it should), their
        token counts rounded up to buckets when ``token_buckets`` is set (see ``buckets``)."""
        if isinstance(masks, PackedMasks):
            return masks
        if self.layout == "packed" or (self.layout == "auto" and masks.context_lens is not None
                                        and masks.target_lens is None and self._fused_varlen()):
            masks = pack(masks)
        return buckets.apply(masks, self.token_buckets)

    def _fused_varlen(self) -> bool:
        dev = next(self.parameters()).device
        probe = torch.empty(0, device=dev, dtype=torch.bfloat16)
        return any(varlen_available(b, probe) for b in ("flash_attn", "torch_varlen", "xformers"))

    @staticmethod
    def _dims(masks) -> tuple[int, int, int, int]:
        """(K target blocks, M context blocks, B images, Lt target positions)."""
        k, b, lt = masks.targets.shape
        m = masks.num_context if isinstance(masks, PackedMasks) else masks.context.shape[0]
        return k, m, b, lt

    @torch.no_grad()
    def targets(self, images: torch.Tensor, masks, repeat: bool = True) -> torch.Tensor:
        """layer_norm(target_encoder(images)) at every target block, in fp32 whatever the encoder
        ran in: [K * M * B, Lt, D] (with ``repeat=False``, [K * B, Lt, D]: one copy for the M
        context blocks)."""
        h = self.target_encoder(images)
        k, m, b, lt = self._dims(masks)
        h = gather_layernorm(h, masks.targets.reshape(k * b, lt), out_dtype=torch.float32, backend=self.kernels)
        return self._repeat(h, k, m) if repeat else h

    @staticmethod
    def _repeat(h: torch.Tensor, k: int, m: int) -> torch.Tensor:
        """[K * B, Lt, D] -> [K * M * B, Lt, D]: the targets of each context block, block-major."""
        if m == 1:
            return h
        kb, lt, d = h.shape
        b = kb // k
        return h.reshape(k, 1, b, lt, d).expand(k, m, b, lt, d).reshape(k * m * b, lt, d)

    def predict(self, images: torch.Tensor, masks) -> torch.Tensor:
        """Predictor output for every (target block, context block, image): [K * M * B, Lt, D]."""
        masks = self.prepare(masks)
        p = self.encoder.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        if isinstance(masks, PackedMasks):
            z = self.encoder.forward_packed(images, masks.ctx_idx, masks.ctx_meta)
            return self.predictor.forward_packed(z, masks, grid)
        z = self.encoder(images, masks.context, masks.context_lens)
        return self.predictor(z, masks.context, masks.targets, masks.context_lens, masks.target_lens, grid)

    def loss(self, images: torch.Tensor, masks, return_outputs: bool = False):
        """The I-JEPA loss of a batch (a scalar), and optionally {'pred', 'target'}.

        ``masks``: a MaskBatch (packed here when the layout says so) or an already PackedMasks.
        """
        masks = self.prepare(masks)
        target = self.targets(images, masks, repeat=False)
        pred = self.predict(images, masks)
        k, m, _, _ = self._dims(masks)
        valid = None if isinstance(masks, PackedMasks) else self._row_valid(masks)
        loss = _jepa_loss(pred, target, self.loss_type, valid, repeat=m, num_targets=k, backend=self.kernels)
        if not return_outputs:
            return loss
        return loss, {"pred": pred, "target": self._repeat(target, k, m)}

    @staticmethod
    def _row_valid(masks: MaskBatch):
        tv = masks.target_valid()
        if tv is None:
            return None
        k, b, lt = tv.shape
        m = masks.context.shape[0]
        return tv.reshape(k, 1, b, lt).expand(k, m, b, lt).reshape(k * m * b, lt)

    def forward(self, images: torch.Tensor, masks) -> torch.Tensor:
        """The loss (so that DDP or FSDP can wrap the whole module)."""
        return self.loss(images, masks)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * encoder, over every parameter (fp32
        arithmetic; one fused kernel launch on CUDA). Under FSDP each process updates its own
        shards: the target encoder is sharded exactly like the encoder."""
        def local(t):
            return t.to_local() if hasattr(t, "to_local") else t

        for part in (self.encoder, self.target_encoder):  # FSDP: back to the sharded parameters
            for mod in part.modules():
                if callable(getattr(mod, "reshard", None)):
                    mod.reshard()
        ema_update_([local(p) for p in self.target_encoder.parameters()],
                    [local(p) for p in self.encoder.parameters()], momentum, backend=self.kernels)
