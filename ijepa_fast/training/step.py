"""One I-JEPA training step, as a library: the optimiser and ``train_step``.

    model = IJEPA.build("vit_huge", img_size=224, patch_size=14, pred_depth=12)   # ijepa_fast.model
    sampler = MultiBlockSampler(model.grid, MaskConfig())
    optimizer = make_optimizer(model)
    for step, images in enumerate(loader):
        train_step(model, optimizer, images, sampler(len(images)), step, schedules)

``train_step`` sets the scheduled LR and weight decay, runs forward and backward (autocast or a
bf16 compute copy, micro-batches), clips, steps AdamW and updates the target encoder.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from .._compat import keyword_only, moved
from ..masks import MaskBatch
from ..model import IJEPA
from ..perf.packing import PackedMasks

# the loss and its names lived here before the model had a module of its own
__getattr__ = moved(__name__, {"jepa_loss": "ijepa_fast.model", "LOSSES": "ijepa_fast.model",
                               "LAYOUTS": "ijepa_fast.model"})


def param_groups(model: IJEPA) -> list[dict]:
    """The reference's four AdamW groups, in its order: encoder and predictor weights (decayed),
    then their biases and 1-D parameters (never decayed, flagged WD_exclude)."""
    def pick(module, decay):
        return [p for n, p in module.named_parameters() if (("bias" not in n) and p.ndim != 1) == decay]

    return [
        {"params": pick(model.encoder, True)},
        {"params": pick(model.predictor, True)},
        {"params": pick(model.encoder, False), "WD_exclude": True, "weight_decay": 0.0},
        {"params": pick(model.predictor, False), "WD_exclude": True, "weight_decay": 0.0},
    ]


@keyword_only(1, ("lr", "weight_decay", "betas", "eps", "impl"))
def make_optimizer(model: IJEPA, *, lr: float = 1e-3, weight_decay: float = 0.04, betas=(0.9, 0.999),
                   eps: float = 1e-8, impl: str = "auto") -> torch.optim.AdamW:
    """AdamW over the reference's parameter groups (the schedules set lr and weight decay each step).

    impl: 'fused' (one kernel, CUDA), 'foreach', 'single' (a loop), or 'auto' (torch's choice).
    """
    groups = param_groups(model)
    for g in groups:
        g.setdefault("weight_decay", weight_decay)
    kw = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"} if impl != "auto" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kw)


@dataclass
class StepResult:
    """The step's values; with ``train_step(sync=False)`` and the fused tail, ``loss`` and
    ``grad_norm`` are device tensors and ``skipped`` a device flag (nonzero: the step was not
    finite and changed nothing), read later with ``read_results``."""

    loss: float | torch.Tensor
    lr: float
    wd: float
    momentum: float
    grad_norm: float | torch.Tensor | None
    skipped: torch.Tensor | None = None

    @property
    def deferred(self) -> bool:
        return isinstance(self.loss, torch.Tensor)


def read_results(results: list[tuple[int, StepResult]]) -> list[StepResult]:
    """Deferred step results ``[(step, result)]`` read in one host synchronisation, as plain numbers.
    Raises FloatingPointError naming the first skipped (non-finite) step."""
    if not results:
        return []
    nan = torch.full((), float("nan"), device=results[0][1].loss.device)
    rows = torch.stack([torch.stack([r.loss.float(), (r.grad_norm if r.grad_norm is not None else nan).float(),
                                     r.skipped.float()]) for _, r in results]).tolist()
    out = []
    for (step, r), (value, norm, skipped) in zip(results, rows):
        if skipped:
            err = FloatingPointError(_nonfinite_message(value, norm, step))
            err.step = step  # the first step that changed nothing: the state is that of the step before
            raise err
        out.append(StepResult(value, r.lr, r.wd, r.momentum, norm if r.grad_norm is not None else None))
    return out


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 autocast on CUDA under 'auto' or 'bf16'; fp32 (no autocast) otherwise."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def micro_batches(images: torch.Tensor, masks, n: int):
    """Split a batch (and its masks) into ``n`` equal parts, for gradient accumulation."""
    if n == 1:
        return [(images, masks)]
    b = images.shape[0]
    if b % n or isinstance(masks, PackedMasks):
        raise ValueError(f"optim.accum_steps={n} must divide the per-process batch of {b} (unpacked masks)")
    size = b // n
    return [(images[i:i + size], masks.slice(i, i + size)) for i in range(0, b, size)]


def _loss(runner, images: torch.Tensor, masks, master, precision: str) -> torch.Tensor:
    """One forward: the bf16 compute copy's (inputs cast to its dtype), or under autocast at ``precision``."""
    if master is not None:
        return runner(images.to(master.dtype), masks)
    dtype = autocast_dtype(images.device, precision)
    with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return runner(images, masks)


@keyword_only(6, ("precision", "grad_clip", "master", "forward", "accum_steps", "agree"))
def train_step(model: IJEPA, optimizer: torch.optim.Optimizer, images: torch.Tensor, masks: MaskBatch | PackedMasks,
               step: int, schedules, *, precision: str = "auto", grad_clip: float | None = None,
               master=None, forward=None, accum_steps: int = 1, agree=None, grad_reduce=None, tail=None,
               sync: bool = True, halt: torch.Tensor | None = None, graphs=None) -> StepResult:
    """One step: set LR/WD, forward, backward, (clip), AdamW, EMA update of the target encoder.

    ``master``: a ``perf.MasterWeights`` whose fp32 ``master`` is ``model`` (the optimiser's): the
    forward and backward then run on its bf16 compute copy without autocast, and each
    micro-batch's gradients are added into fp32 master gradients. ``forward``: the module to call
    for the loss (a DDP / FSDP wrapper; default the model itself). ``accum_steps``: the batch runs
    as that many micro-batches whose gradients add up (a DDP wrapper reduces on the last).
    ``grad_reduce(params)``: averages the fp32 gradients over processes after the last micro-batch
    (the distributed trainer's data parallelism for bf16 compute weights). ``agree(flag)``: makes
    every process reach the same verdict on finiteness (the distributed trainer passes an
    all-reduce).

    ``tail``: a ``tail.FusedTail``: AdamW, the EMA and the compute-copy refresh run as one fused
    pass (clipping folded in as a gradient scale); with one micro-batch and no ``grad_reduce`` it
    reads the compute copy's bf16 gradients directly (no fp32 master gradients are made).

    Raises FloatingPointError, before the optimiser or the target encoder is touched (gradients
    cleared), when the loss or any gradient is not finite. One host synchronisation per step reads
    the loss and the gradient norm together. ``sync=False`` (with ``tail`` and no ``agree`` only;
    otherwise ignored): no host synchronisation; finiteness is decided on the device, a non-finite
    step is skipped there (neither AdamW nor the EMA writes anything) and the result holds device
    tensors (``read_results`` reads them). ``halt``: a device flag that a non-finite step sets and
    that skips every later step while set (so the state stays that of the last good step).

    A ``tail`` with ``device_hyper`` (``perf.cuda_graphs``) takes the graph-ready step: the
    scheduled values are staged into the tail's device tensors, then forward, backward and the
    deferred tail run as one device-only function of (images, masks), which ``graphs`` (a
    ``perf.graphs.StepGraphs``) replays from a CUDA graph per bucketed shape; always deferred.
    """
    lr, wd = schedules.apply(optimizer, step)
    if tail is not None and tail.device_hyper:
        tail.stage(schedules.momentum_at(step))
        fn = graph_step_fn(model, optimizer, master=master, forward=forward, grad_clip=grad_clip, tail=tail,
                           halt=halt, precision=precision, accum_steps=accum_steps, agree=agree,
                           grad_reduce=grad_reduce)
        if graphs is None:
            value, norm, bad = fn(images, masks)
        else:
            from ..perf.buckets import shape_key

            value, norm, bad = graphs.run(shape_key(masks), images, masks, fn)
        return StepResult(value, lr, wd, schedules.momentum_at(step), norm, skipped=bad)
    runner = forward or (master.compute if master is not None else model)
    parts = micro_batches(images, masks, accum_steps)
    direct = tail is not None and master is not None and len(parts) == 1 and grad_reduce is None
    losses = []
    for i, (x, m) in enumerate(parts):
        last = i == len(parts) - 1
        quiet = runner.no_sync() if not last and hasattr(runner, "no_sync") else contextlib.nullcontext()
        with quiet:
            loss = _loss(runner, x, m, master, precision) / len(parts)
            loss.backward()
        losses.append(loss.detach().float())
        if master is not None and not direct:
            master.sync_grads(accumulate=i > 0)  # micro-batches add up in fp32, never in bf16
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if grad_reduce is not None:
        grad_reduce(params)
    momentum = schedules.momentum_at(step)
    if tail is not None and not sync and agree is None:
        return _deferred_tail(tail, losses, params, grad_clip, momentum, direct, halt, runner, (lr, wd))
    value_t, norm_t, sharded = _loss_and_norm_tensors(losses, _grad_tensors(params, tail, direct))
    value, norm = torch.stack([value_t, norm_t]).tolist()  # the step's one host synchronisation
    finite = math.isfinite(value) and math.isfinite(norm)
    if agree is not None:
        finite = agree(finite)
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        runner.zero_grad(set_to_none=True)
        raise FloatingPointError(_nonfinite_message(value, norm, step))
    grad_norm = None if sharded else norm  # of sharded gradients, only clipping computes the global norm
    if tail is not None:
        scale = _clip_scale(norm_t, grad_clip) if grad_clip else None
        tail.step(momentum, from_compute=direct, grad_scale=scale)
        tail.zero_grad(runner, direct)
        return StepResult(value, lr, wd, momentum, grad_norm)
    if grad_clip:
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], grad_clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.update_target(momentum)
    if master is not None:
        master.sync_params()
    return StepResult(value, lr, wd, momentum, grad_norm)


def graph_step_fn(model: IJEPA, optimizer, *, master=None, forward=None, grad_clip=None, tail=None, halt=None,
                  precision: str = "auto", accum_steps: int = 1, agree=None, grad_reduce=None):
    """The graph-ready step's device part, ``fn(images, masks) -> (loss, gradient norm, skipped)``:
    forward, backward, the deferred fused tail (its values staged by ``tail.stage``); it launches
    the same work every call and reads nothing back. Needs a tail with ``device_hyper``, one
    micro-batch, one process."""
    if tail is None or not tail.device_hyper:
        raise ValueError("the graph-ready step needs the fused tail with device_hyper=True (perf.optimizer=fused_tail)")
    if accum_steps != 1 or agree is not None or grad_reduce is not None:
        raise ValueError("the graph-ready step runs one micro-batch on one process (optim.accum_steps=1, no "
                         "distributed run)")
    runner = forward or (master.compute if master is not None else model)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    direct = master is not None

    def fn(images, masks):
        loss = _loss(runner, images, masks, master, precision)
        loss.backward()
        result = _deferred_tail(tail, [loss.detach().float()], params, grad_clip, 0.0, direct, halt, runner,
                                (0.0, 0.0))
        return result.loss, result.grad_norm, result.skipped

    return fn


def _clip_scale(norm: torch.Tensor, grad_clip: float) -> torch.Tensor:
    """clip_grad_norm_'s coefficient, on the device: min(1, max_norm / (norm + 1e-6))."""
    return torch.clamp(grad_clip / (norm + 1e-6), max=1.0)


def _grad_tensors(params, tail, direct: bool) -> list[torch.Tensor]:
    """The gradients the optimiser will read: the bf16 compute copy's (``direct``) or the params'."""
    return [g for g in (tail._grad(p, direct) if tail is not None else p.grad for p in params) if g is not None]


def _deferred_tail(tail, losses, params, grad_clip, momentum, direct, halt, runner, lr_wd) -> StepResult:
    """The fused tail with finiteness decided on the device: no host synchronisation."""
    value, norm, _ = _loss_and_norm_tensors(losses, _grad_tensors(params, tail, direct))
    bad = (~(torch.isfinite(value) & torch.isfinite(norm))).float()
    if halt is not None:
        bad = torch.maximum(bad, halt.float())
        halt.copy_(bad)
    scale = _clip_scale(norm, grad_clip) if grad_clip else None
    tail.step(momentum, from_compute=direct, grad_scale=scale, found_inf=bad)
    tail.zero_grad(runner, direct)
    return StepResult(value, lr_wd[0], lr_wd[1], momentum, norm, skipped=bad)


def _loss_and_norm_tensors(losses: list[torch.Tensor], grads) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(the summed loss, the gradients' L2 norm in fp32, whether the gradients are sharded), on the
    device. Sharded (FSDP) gradients are measured on this process's shards: enough to tell finite
    from not, but not their global norm."""
    sharded = any(hasattr(g, "to_local") for g in grads)
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    device = losses[0].device
    norms = torch._foreach_norm(local, dtype=torch.float32) if local else []
    norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms])) if local \
        else torch.zeros((), device=device)
    return torch.stack(losses).sum(), norm, sharded



def _nonfinite_message(value: float, norm: float, step: int) -> str:
    if not math.isfinite(value):
        return f"loss is {value} at step {step}"
    if not math.isfinite(norm):
        return f"a gradient is not finite at step {step} (loss {value:.6g}, gradient norm {norm})"
    return f"the loss or a gradient is not finite on another process at step {step}"
