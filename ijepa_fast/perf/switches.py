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
through torchao (see ``fp8``), on the compute copy when there is one, so the masters stay plain;
``fp8=target``: only the target encoder's (its forward), and only layers of both dimensions >=
``fp8_min_dim`` (auto: 1024); with the fused tail (``optimizer=fused_tail``) those layers hold float8
weights that the tail writes after the EMA (``fp8_target``), otherwise torchao casts them in each forward.

``activation_checkpointing``: each context-encoder and predictor block recomputes its activations
in the backward pass: ``full`` (or ``true``) the whole block (about a third more compute, only the
block's input kept), ``selective`` only the cheap elementwise ops (layer norms, GELU, adds, casts)
while the matmul and attention outputs are kept (little extra compute, part of the memory saved).

``compile``: each transformer block is compiled on its own, always with static shapes: compile
implies token buckets (every layout, dense, padded or packed, runs at a few fixed token counts),
one compilation per bucket (``warm_up`` compiles them all before training) and none after.
Dynamic-shape graphs are not used: on an H200 they ran the same step at about half the MFU.

Every switch defaults to ``auto``; ``resolve`` turns a config's switches into values for one
device, in this module only. On CUDA ``auto`` is the fastest step measured there (bf16 weights,
compile with 4 token buckets per doubling, the fused AdamW + EMA tail; torch's fused AdamW where the
tail does not apply: FSDP, or bf16 weights set off); on the CPU the plain step (bf16 arithmetic and
compiled blocks do not pay there). On an H200 (2026-12-04, ViT-H/14 b128 and ViT-B/16 b256 at
reference masks, same run) the tail gave 578.9 and 2246 images/s against torch's fused AdamW's
557.1 and 2202, the same loss after 14 steps, and its five steps on the card equal torch's AdamW +
EMA to fp32 rounding (``tests/test_fused_tail.py``). ``cuda_graphs`` (the graph-ready step over the
fused tail, captured per token bucket on CUDA; see ``graphs``) stays opt-in: it has run on a GPU
(582.7 images/s, ViT-H, same card) but no GPU test has yet compared its weights with the plain step's.
``preset=plain`` resolves every ``auto`` to the plain step, for debugging.
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from ..model import IJEPA
from ..runlog.output import log
from . import fp8


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
    from ..models.layers import Attention

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
        from ..models.layers import create_selective_checkpoint_contexts

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


COMPILE_BACKEND = "inductor"  # torch.compile's backend for the blocks (tests record graphs with their own)


def compile_blocks(model: IJEPA, *, dynamic: bool = False, backend=None) -> None:
    """torch.compile each transformer block in place, with static shapes (token buckets: one graph
    per bucket, up to RECOMPILE_LIMIT of them per block); ``dynamic=True`` only for experiments."""
    if not dynamic:
        import torch._dynamo

        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    backend = backend or COMPILE_BACKEND
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


AUTO_BUCKETS = 4  # token buckets per doubling with compile: the H200's fastest measured setting (ViT-H/14, b128)


def resolve(perf, device: torch.device, strategy: str = "none"):
    """``perf`` (a ``PerfConfig``) with every 'auto' switch replaced by its value on ``device``
    under the data-parallel ``strategy`` ('none', 'ddp' or 'fsdp'); switches set by hand are kept.
    The one place where defaults depend on the device. Raises ConfigError for compile without buckets."""
    from ..errors import ConfigError

    fast = perf.preset != "plain" and device.type == "cuda"
    values = {"bf16_weights": fast and strategy != "fsdp", "compile": fast, "activation_checkpointing": False,
              "fp8": "false", "cuda_graphs": False}
    out = dataclasses.replace(perf, **{k: v for k, v in values.items() if getattr(perf, k) == "auto"})
    if out.optimizer == "auto":  # the fused tail over the bf16 compute copy: the fastest measured on CUDA
        out.optimizer = "fused_tail" if fast and strategy != "fsdp" and out.bf16_weights is True else \
            "fused" if device.type == "cuda" and perf.preset != "plain" else "foreach"
    out.preset = "plain" if perf.preset == "plain" else "fast"
    out.fp8_min_dim = fp8.min_dim(out.fp8, out.fp8_min_dim)
    if out.token_buckets == "auto":
        out.token_buckets = AUTO_BUCKETS if out.compile else 0
    if out.cuda_graphs is True:
        if out.optimizer != "fused_tail":
            raise ConfigError("perf.cuda_graphs=true needs perf.optimizer=fused_tail (its lr, weight decay and "
                              "momentum live in device tensors): set both, or perf.cuda_graphs=false")
        if strategy != "none":
            raise ConfigError("perf.cuda_graphs=true runs on one process: set perf.cuda_graphs=false under "
                              f"dist.strategy={strategy}")
        if device.type == "cuda" and not out.token_buckets:
            raise ConfigError("perf.cuda_graphs=true on CUDA needs static shapes: set perf.token_buckets to 1-16 "
                              "(or perf.compile=true, which sets it)")
    if out.compile and not out.token_buckets:
        raise ConfigError("perf.token_buckets=0 with perf.compile=true would compile dynamic shapes (the slow path): "
                          "leave perf.token_buckets=auto or set 1-16, or set perf.compile=false")
    return out


def describe(perf) -> str:
    """The resolved switches as one line: ``key=value, ...``."""
    return ", ".join(f"{f.name}={getattr(perf, f.name)}" for f in dataclasses.fields(perf))


def apply(model: IJEPA, perf, device: torch.device) -> tuple[IJEPA, MasterWeights | None]:
    """Apply the ``perf`` switches (resolved for ``device`` by ``resolve`` when any is 'auto') in
    their fixed order; returns (model to run, master weights or None). In the package, the engine's
    assembler is its only caller."""
    perf = resolve(perf, device)  # resolved switches pass unchanged
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
        size = fp8.min_dim(perf.fp8, getattr(perf, "fp8_min_dim", "auto"))
        if not fp8_through_torchao(perf, device):  # fp8=target over the fused tail: FP8 weights it writes
            from . import fp8_target

            count = fp8_target.convert(run, model, min_features=size, emulate=perf.fp8_emulate)
            fp8_note = "; " + fp8_target.describe(count, perf.fp8_emulate, size)
        else:
            count = fp8.convert(run, fp8_recipe, emulate=perf.fp8_emulate, parts=fp8.parts(perf.fp8),
                                min_features=size)
            fp8_note = "; " + fp8.describe(fp8_recipe, count, perf.fp8_emulate, perf.fp8, size)
    ckpt = checkpoint_mode(perf.activation_checkpointing)
    if ckpt:
        set_activation_checkpointing(run, ckpt, selective_blocks=getattr(perf, "selective_blocks", "all"))
    if perf.compile:
        compile_blocks(run, dynamic=False)
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


def fp8_through_torchao(perf, device: torch.device) -> bool:
    """Whether ``perf.fp8`` converts through torchao's Float8Linear (which needs torchao installed):
    every FP8 setting except ``fp8=target`` over the fused tail, whose FP8 weights the tail writes."""
    perf = resolve(perf, device)
    return fp8.recipe(perf.fp8) is not None and not (perf.fp8 == "target" and uses_fused_tail(perf, device))


def uses_fused_tail(perf, device: torch.device) -> bool:
    """``perf.optimizer='fused_tail'`` (what 'auto' resolves to on CUDA with ``bf16_weights``)."""
    return perf.optimizer == "fused_tail"


def optimizer_impl(perf, device: torch.device) -> str:
    """The torch AdamW implementation: 'fused', 'foreach' or 'single' (``perf.optimizer='auto'``:
    fused on CUDA). Under the fused tail, the AdamW that holds the state (never stepped itself)."""
    if perf.optimizer not in ("auto", "fused_tail"):
        return perf.optimizer
    return "fused" if device.type == "cuda" else "foreach"


def fused_tail(model: IJEPA, optimizer, master: MasterWeights | None, perf, device: torch.device):
    """The ``tail.FusedTail`` that ``train_step`` runs instead of optimizer.step + update_target +
    sync_params, or None when ``perf`` does not choose it (with ``perf.cuda_graphs``: its values in
    device tensors)."""
    if not uses_fused_tail(perf, device):
        return None
    if type(optimizer) is not torch.optim.AdamW:
        raise TypeError(f"perf.optimizer=fused_tail steps a torch.optim.AdamW's state; got {type(optimizer).__name__}")
    from .tail import FusedTail

    return FusedTail(model, optimizer, master, device_hyper=getattr(perf, "cuda_graphs", False) is True)
