"""The step's speed-ups, each a config switch (``perf.*``), applied in one place in a fixed order:

    build (fp32) -> bf16 compute copy (``bf16_weights``) -> token buckets -> FP8 linear layers
    (``fp8``) -> activation checkpointing -> per-block torch.compile -> (DDP / FSDP, in the
    distributed wrapper)

``bf16_weights``: the optimiser, the EMA and the checkpoints keep working on the fp32 model (the
master weights); forward and backward run on a bf16 copy without autocast, so no weight or
activation is cast on the way (the residual stream, layer-norm outputs and attention are bf16;
statistics inside the fused kernels and the loss stay fp32, as do the frozen sin-cos tables,
added in fp32 and rounded once, and the regression targets; see docs/numerics.md). After each backward the bf16
gradients are copied into fp32 master gradients; after each optimiser step the masters are
copied back into the bf16 copy (one multi-tensor copy each way).

``token_buckets``: the batch's token counts are rounded up to a few fixed sizes (``buckets``), the
padding masked out: the same loss and gradients, a small fixed set of block shapes.

``fp8``: the encoder's and the target encoder's linear layers run their matmuls in float8
through torchao (see ``fp8``), on the compute copy when there is one, so the masters stay plain.

``activation_checkpointing``: each context-encoder and predictor block recomputes its activations
in the backward pass: ``full`` (or ``true``) the whole block (about a third more compute, only the
block's input kept), ``selective`` only the cheap elementwise ops (layer norms, GELU, adds, casts)
while the matmul and attention outputs are kept (little extra compute, part of the memory saved).

``compile``: each transformer block is compiled on its own: with dynamic shapes, so changing
sequence lengths do not trigger recompilation; with token buckets, with static shapes, one
compilation per bucket (``warm_up`` compiles them all before training; otherwise the first step
of each bucket compiles) and none after.
"""
from __future__ import annotations

import copy

import torch

from . import fp8
from .model import IJEPA
from .runlog import log


class MasterWeights:
    """A bf16 compute copy of an fp32 IJEPA model; ``master`` stays the model of record."""

    def __init__(self, master: IJEPA, dtype: torch.dtype = torch.bfloat16):
        self.master = master
        self.dtype = dtype
        self.compute = copy.deepcopy(master).to(dtype)
        for (name, param), source in zip(self.compute.named_parameters(), master.parameters()):
            if name.endswith("pos_embed"):  # the frozen sin-cos tables stay fp32, exact
                param.data = source.detach().clone()
        self.compute.configure_kernels(master.kernels, master.encoder.deterministic)
        self.compute.configure_layout(master.layout, _varlen_impl(master))
        self._train = [(m, c) for part in ("encoder", "predictor")
                       for m, c in zip(getattr(master, part).parameters(), getattr(self.compute, part).parameters())
                       if m.requires_grad]
        self._all = list(zip(master.parameters(), self.compute.parameters()))

    def sync_grads(self, accumulate: bool = False) -> None:
        """fp32 master gradients from the compute copy's bf16 gradients (which are then cleared);
        ``accumulate`` adds them to the masters' gradients instead (micro-batches sum in fp32)."""
        copy_to, copy_from, add_to, add_from = [], [], [], []
        for m, c in self._train:
            if c.grad is None:
                if not accumulate:
                    m.grad = None
                continue
            if accumulate and m.grad is not None:
                add_to.append(m.grad)
                add_from.append(c.grad)
            else:
                m.grad = torch.empty_like(m)
                copy_to.append(m.grad)
                copy_from.append(c.grad)
        if copy_to:
            torch._foreach_copy_(copy_to, copy_from)
        if add_to:
            torch._foreach_add_(add_to, add_from)  # fp32 += bf16, in fp32
        for _, c in self._train:
            c.grad = None

    @torch.no_grad()
    def sync_params(self) -> None:
        """The compute copy <- the masters (encoder, predictor and target encoder)."""
        torch._foreach_copy_([c for _, c in self._all], [m for m, _ in self._all])


def _varlen_impl(model: IJEPA) -> str:
    from .models.layers import Attention

    return next((m.varlen_impl for m in model.modules() if isinstance(m, Attention)), "auto")


CHECKPOINTING = {False: False, True: "full", "false": False, "none": False, "true": "full", "full": "full",
                 "selective": "selective"}
RECOMPILE_LIMIT = 64  # compiled shapes kept per block with token buckets (torch's default is 8)


def checkpoint_mode(setting) -> str | bool:
    """``perf.activation_checkpointing`` as False, 'full' or 'selective'."""
    if setting not in CHECKPOINTING:
        raise ValueError(f"activation checkpointing {setting!r}: choose false, true (= full), full or selective")
    return CHECKPOINTING[setting]


SELECTIVE_BLOCKS = ("all", "predictor", "encoder")


def set_activation_checkpointing(model: IJEPA, enabled=True, *, selective_blocks: str = "all") -> None:
    """Recompute every encoder and predictor block in the backward pass (the target encoder runs
    without gradients and needs none). ``enabled``: False, True or 'full' (the whole block), or
    'selective' (keep matmul and attention outputs; see models.layers.save_in_selective) in the
    ``selective_blocks`` ('all', or only the 'predictor' or 'encoder' ones; the others: full)."""
    mode = checkpoint_mode(enabled)
    if selective_blocks not in SELECTIVE_BLOCKS:
        raise ValueError(f"selective_blocks {selective_blocks!r}: choose one of {SELECTIVE_BLOCKS}")
    if mode == "selective":
        from .models.layers import create_selective_checkpoint_contexts

        create_selective_checkpoint_contexts()  # a clear error on a torch without it
    parts = {"encoder": list(model.encoder.blocks), "predictor": list(model.predictor.predictor_blocks)}
    for part, blocks in parts.items():
        per_part = "full" if mode == "selective" and selective_blocks not in ("all", part) else mode
        for blk in blocks:
            blk.checkpoint = per_part
    for blk in parts["encoder"] + parts["predictor"]:
        if mode and blk.attn.varlen_impl == "nested":
            raise ValueError("activation checkpointing cannot recompute nested-tensor attention: use "
                             "model.varlen_attn=auto (or padded, flash_attn, torch_varlen, xformers)")
        blk.attn.nested_ok = not mode


def compile_blocks(model: IJEPA, *, dynamic: bool = True, backend="inductor") -> None:
    """torch.compile each transformer block in place: with dynamic shapes, or static ones (token
    buckets: one graph per bucket, up to RECOMPILE_LIMIT of them per block)."""
    if not dynamic:
        import torch._dynamo

        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    for blocks in (model.encoder.blocks, model.target_encoder.blocks, model.predictor.predictor_blocks):
        for blk in blocks:
            blk.compile(dynamic=dynamic, backend=backend)


def warm_up(model: IJEPA, images: torch.Tensor, mask_batches) -> int:
    """One forward and backward pass for each distinct bucketed shape among ``mask_batches`` (raw
    MaskBatches, drawn from the run's sampler), so that compiled blocks see every bucket before
    training; gradients are cleared after. Returns the number of shapes run."""
    from .buckets import shape_key

    seen = set()
    for masks in mask_batches:
        prepared = model.prepare(masks.to(images.device))
        key = shape_key(prepared)
        if key in seen:
            continue
        seen.add(key)
        model.loss(images[:masks.batch_size], prepared).backward()
    model.zero_grad(set_to_none=True)
    return len(seen)


def apply(model: IJEPA, perf, device: torch.device) -> tuple[IJEPA, MasterWeights | None]:
    """Apply the ``perf`` switches in their fixed order; returns (model to run, master weights or None)."""
    master = None
    run = model
    if perf.bf16_weights:
        master = MasterWeights(model)
        run = master.compute
    buckets = getattr(perf, "token_buckets", 0)
    for m in {id(model): model, id(run): run}.values():
        m.token_buckets = buckets
    fp8_note = ""
    fp8_recipe = fp8.recipe(perf.fp8)
    if fp8_recipe:
        fp8.check_device(device, perf.fp8_emulate)
        fp8_note = "; " + fp8.describe(fp8_recipe, fp8.convert(run, fp8_recipe, emulate=perf.fp8_emulate),
                                       perf.fp8_emulate)
    ckpt = checkpoint_mode(perf.activation_checkpointing)
    if ckpt:
        set_activation_checkpointing(run, ckpt, selective_blocks=getattr(perf, "selective_blocks", "all"))
    if perf.compile:
        compile_blocks(run, dynamic=not buckets)
    switches = {"bf16_weights": perf.bf16_weights, f"fp8={fp8_recipe}": fp8_recipe,
                "activation_checkpointing": ckpt, "compile": perf.compile}
    enabled = [k for k, on in switches.items() if on]
    if ckpt == "selective":
        enabled[enabled.index("activation_checkpointing")] = (f"activation_checkpointing=selective "
                                                              f"({perf.selective_blocks} blocks; the others full)")
    if buckets:
        enabled.append(f"token_buckets={buckets}" + (" (static shapes)" if perf.compile else ""))
    tail = " (AdamW, the target EMA and the bf16 copy in one fused pass per group)" if perf.bf16_weights \
        else " (AdamW and the target EMA in one fused pass per group)"
    log.info(f"performance switches: {', '.join(enabled) if enabled else 'none (the plain step)'}; optimiser "
             + (f"fused_tail{tail}" if uses_fused_tail(perf, device) else optimizer_impl(perf, device)) + fp8_note)
    return run, master


def uses_fused_tail(perf, device: torch.device) -> bool:
    """``perf.optimizer='fused_tail'``. 'auto' does not choose it yet: the kernel is checked against
    torch's AdamW under Triton's interpreter and compiled for sm_90, but has not run on a GPU; once
    ``benchmarks/run_gpu.sh`` has checked and timed it on a card, 'auto' is meant to pick it on CUDA
    with ``bf16_weights``."""
    return perf.optimizer == "fused_tail"


def optimizer_impl(perf, device: torch.device) -> str:
    """The torch AdamW implementation: 'fused', 'foreach' or 'single' (``perf.optimizer='auto'``:
    fused on CUDA). Under the fused tail, the AdamW that holds the state (never stepped itself)."""
    if perf.optimizer not in ("auto", "fused_tail"):
        return perf.optimizer
    return "fused" if device.type == "cuda" else "foreach"


def fused_tail(model: IJEPA, optimizer, master: MasterWeights | None, perf, device: torch.device):
    """The ``tail.FusedTail`` that ``train_step`` runs instead of optimizer.step + update_target +
    sync_params, or None when ``perf`` does not choose it."""
    if not uses_fused_tail(perf, device):
        return None
    if type(optimizer) is not torch.optim.AdamW:
        raise TypeError(f"perf.optimizer=fused_tail steps a torch.optim.AdamW's state; got {type(optimizer).__name__}")
    from .tail import FusedTail

    return FusedTail(model, optimizer, master)
