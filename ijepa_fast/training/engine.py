"""``Engine``: one I-JEPA training run as a module, and the one place where a run's step is assembled.

    engine = Engine(IJEPA.build("vit_base", patch_size=16), Schedules(len(loader), epochs=300),
                    mask=MaskConfig())                     # perf: every switch 'auto' (fast on CUDA)
    for step, images in enumerate(loader, start=engine.next_step):
        result = engine.step(images.cuda(), step)          # masks, LR/WD, forward, backward, AdamW, EMA
    torch.save(engine.state_dict(), "run.pt")              # everything a bit-exact resume needs
    engine.load_state_dict(torch.load("run.pt", weights_only=True))

``engine(images, masks)`` is the plain loss (for trainers that run backward and the optimiser
themselves, such as Hugging Face's Trainer or accelerate; then call ``update_target`` after each
optimiser step).

The assembly, in this order and nowhere else (``ijepa-fast train``, ``ijepa-fast bench``,
``benchmarks/profile_step.py``, the Lightning module and the examples all build their step here;
``Engine.from_config`` builds it from a run config):

    1. the fp32 model (the weights of record), on the device
    2. the perf switches, resolved for the device (``perf.resolve``) and applied (``perf.apply``):
       bf16 compute copy -> token buckets -> FP8 linear layers -> activation checkpointing ->
       per-block torch.compile (static shapes)
    3. data parallelism (``distributed.data_parallel``): DDP or FSDP2 around the run model, or the
       fp32 master gradients averaged after the last micro-batch (bf16 compute copy under DDP)
    4. the optimiser over the fp32 model (AdamW in the reference's four groups; ``perf.optimizer``
       picks torch's implementation)
    5. the fused optimiser tail (``perf.optimizer=fused_tail``), over that optimiser's state
    6. the token-bucket warm-up (``warm_up``): with compile, every bucketed shape of the coming steps
       compiled before the first step (the first ``step`` runs it when nobody did); with
       ``perf.cuda_graphs`` on CUDA, each bucket's whole step captured as a CUDA graph
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from ..checkpoint.states import engine_state, load_engine_state
from ..config import MaskConfig, PerfConfig
from ..masks import MaskBatch, MultiBlockSampler
from ..model import IJEPA
from ..perf import fp8_target
from ..perf.graphs import StepGraphs
from ..perf.switches import apply as apply_perf
from ..perf.switches import describe as describe_perf
from ..perf.switches import fused_tail, optimizer_impl, resolve
from ..perf.switches import warm_up as warm_up_shapes
from ..runlog.output import log
from . import distributed
from .schedules import Schedules
from .step import StepResult, autocast_dtype, make_optimizer, micro_batches, train_step

WARM_UP_STEPS = 128  # steps whose masks the warm-up looks at: drawing them is cheap, only new shapes compile


class Engine(nn.Module):
    """The model, its optimiser, schedules, mask sampler and the perf switches, stepped as one.

    ``model``: an IJEPA (fp32; moved to ``device`` if given). ``schedules``: LR, weight decay and
    EMA momentum by step. ``mask``: the sampler's settings (``seed``, and ``rank``/``world`` under
    several processes: the sampler draws this process's images of the global batch); ``sampler``:
    a ``MultiBlockSampler`` to use instead (the trainer's, shared with its data loader). ``perf``:
    the speed-ups (``PerfConfig``; every switch 'auto' by default, resolved for the device by
    ``perf.resolve``: the resolved values are ``engine.perf``). ``strategy``: 'auto' (DDP), 'ddp',
    'fsdp' or 'none' under an initialised process group (with ``bf16_weights`` under DDP, fp32
    master gradients reduced by the engine). ``optimizer``: defaults to the reference's four AdamW
    groups with ``lr``, ``weight_decay``, ``betas``, ``eps``. ``defer``: with the fused tail on one
    process, steps make no host synchronisation: their results hold device tensors
    (``step.read_results`` reads them) and a non-finite step sets ``engine.halt``, which skips every
    later step until cleared."""

    def __init__(self, model: IJEPA, schedules: Schedules, *, mask: MaskConfig | None = None, seed: int = 0,
                 perf: PerfConfig | None = None, precision: str = "auto", grad_clip: float | None = None,
                 accum_steps: int = 1, device: str | torch.device | None = None, optimizer=None,
                 lr: float = 1e-3, weight_decay: float = 0.04, betas=(0.9, 0.999), eps: float = 1e-8,
                 strategy: str = "auto", sampler: MultiBlockSampler | None = None, defer: bool = False):
        super().__init__()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)  # 1. the fp32 model
        self.schedules = schedules
        self.precision, self.grad_clip, self.accum_steps = precision, grad_clip, accum_steps
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed.active() \
            else (0, 1)
        self.sampler = sampler or MultiBlockSampler(model.grid, mask or MaskConfig(), seed=seed, rank=rank,
                                                    world=world)
        self.strategy = ("ddp" if strategy == "auto" else strategy) if world > 1 else "none"
        self.perf = resolve(perf or PerfConfig(), self.device, self.strategy)
        log.info(f"perf (resolved for {self.device.type}): {describe_perf(self.perf)}")
        run_model, self.master = apply_perf(self.model, self.perf, self.device)  # 2. the perf switches
        forward, self.grad_reduce = distributed.data_parallel(run_model, self.master, self.strategy,  # 3.
                                                              self.device, accum_steps == 1)
        self._wrapped = (forward, run_model)  # a tuple: the wrapper and the bf16 copy are not child modules
        self.optimizer = optimizer or make_optimizer(self.model, lr=lr, weight_decay=weight_decay,  # 4.
                                                     betas=betas, eps=eps, impl=optimizer_impl(self.perf, self.device))
        self.tail = fused_tail(self.model, self.optimizer, self.master, self.perf, self.device)  # 5.
        graph_ready = self.tail is not None and self.tail.device_hyper  # perf.cuda_graphs: always deferred
        if graph_ready and accum_steps != 1:
            from ..errors import ConfigError

            raise ConfigError("perf.cuda_graphs=true runs one micro-batch: set optim.accum_steps=1 or "
                              "perf.cuda_graphs=false")
        self.deferred = (bool(defer) or graph_ready) and self.tail is not None and not distributed.active()
        self.halt = torch.zeros((), device=self.device) if self.deferred else None
        self.graphs = StepGraphs(self.device, self.halt) if graph_ready else None
        self.warmed_up = not (self.perf.compile or (graph_ready and self.graphs.capturing))  # 6. on the first step
        self.next_step = 0  # the step the next call trains (the schedules' and the sampler's index)

    @classmethod
    def from_config(cls, cfg, *, device: str | torch.device, schedules: Schedules, optim=None,
                    sampler: MultiBlockSampler | None = None) -> Engine:
        """The run a ``Config`` describes: its model (seeded by ``run.seed``), mask sampler, perf
        switches, precision, data parallelism and optimiser settings (``optim``: the optimiser
        settings to use instead of ``cfg.optim``, e.g. with learning rates scaled to the global
        batch). ``ijepa-fast train``, ``ijepa-fast bench`` and ``benchmarks/profile_step.py`` build
        their step here."""
        o = optim or cfg.optim
        torch.manual_seed(cfg.run.seed)
        model = IJEPA.from_config(cfg).to(device)
        return cls(model, schedules, mask=cfg.mask, seed=cfg.run.seed, perf=cfg.perf, precision=cfg.run.precision,
                   grad_clip=o.grad_clip, accum_steps=o.accum_steps, device=device, lr=o.lr,
                   weight_decay=o.weight_decay, betas=o.betas, eps=o.eps, strategy=cfg.dist.strategy, sampler=sampler,
                   defer=o.on_nonfinite == "stop")

    @property
    def run_model(self) -> IJEPA:
        """The model forward and backward run on: the bf16 compute copy, or the model itself (compiled,
        FP8 or checkpointed as the switches say; not the DDP wrapper)."""
        return self._wrapped[1]

    def warm_up(self, batch_size: int, start: int | None = None, steps: int = WARM_UP_STEPS,
                force: bool = False) -> int:
        """With compile (static shapes, token buckets): one forward and backward per distinct bucketed
        shape among the masks of steps ``start`` .. ``start + steps - 1`` (default: from the next
        step), each micro-batch as the step slices it, so the blocks compile before training and
        not on the first step of each bucket. Zero images, the step's precision; weights, gradients,
        optimiser and random state untouched. With ``perf.cuda_graphs`` on CUDA each shape's whole
        step is then captured as a CUDA graph (with the halt flag set: no weight changes). Returns
        the number of shapes run (0 when neither compile nor graph capture is on and ``force`` is
        not set)."""
        self.warmed_up = True
        capture = self.graphs is not None and self.graphs.capturing
        if not (force or self.perf.compile or capture):
            return 0
        start = self.next_step if start is None else start
        p = self.model.encoder.patch_size
        gh, gw = self.model.grid
        dtype = self.master.dtype if self.master is not None else torch.float32
        images = torch.zeros(batch_size, 3, gh * p, gw * p, device=self.device, dtype=dtype)
        masks = [m for i in range(steps)
                 for _, m in micro_batches(images, self.sampler.sample(batch_size, start + i), self.accum_steps)]
        half = None if self.master is not None else autocast_dtype(self.device, self.precision)
        t0 = time.time()
        with torch.autocast(self.device.type, dtype=half or torch.float32, enabled=half is not None):
            n = warm_up_shapes(self.run_model, images, masks)
        if capture:
            n = self._capture_graphs(images, masks)
        log.info(f"token buckets: {n} block shapes compiled before training in {time.time() - t0:.1f} s "
                 f"(the masks of the next {steps} steps)")
        return n

    def _capture_graphs(self, images: torch.Tensor, masks) -> int:
        """One CUDA graph of the whole step per distinct bucketed shape among ``masks``."""
        from ..perf.buckets import shape_key
        from .step import graph_step_fn

        fn = graph_step_fn(self.model, self.optimizer, master=self.master, forward=self._wrapped[0],
                           grad_clip=self.grad_clip, tail=self.tail, halt=self.halt, precision=self.precision)
        self.tail.stage(self.schedules.momentum_at(self.next_step))
        for m in masks:
            prepared = self.prepare(m)
            self.graphs.capture(shape_key(prepared), images[:m.batch_size], prepared, fn)
        log.info(f"cuda graphs: {len(self.graphs.graphs)} step graphs captured (one per token bucket)")
        return len(self.graphs.graphs)

    def forward(self, images: torch.Tensor, masks: MaskBatch) -> torch.Tensor:
        """The plain I-JEPA loss of a batch (no optimiser, no EMA)."""
        return self.model.loss(images, masks)

    def update_target(self, step: int) -> None:
        """The EMA update of the target encoder at ``step``'s momentum (for loops that run the optimiser
        themselves, after each optimiser step)."""
        self.model.update_target(self.schedules.momentum_at(step))
        fp8_target.refresh(self.run_model)  # perf.fp8=target: the FP8 weights follow the EMA

    def masks(self, batch_size: int, step: int) -> MaskBatch:
        """This process's masks of ``step`` (the same on any number of processes in default mode)."""
        return self.sampler.sample(batch_size, step)

    def prepare(self, masks: MaskBatch):
        """``masks`` in the layout the run model takes (packed, bucketed), on the device; with
        micro-batches, the step slices the raw masks and each slice is prepared in the model."""
        if self.accum_steps == 1:
            masks = self.run_model.prepare(masks)
        return masks.to(self.device, non_blocking=True)

    def step(self, images: torch.Tensor, step: int | None = None, masks: MaskBatch | None = None, *,
             optimizer=None) -> StepResult:
        """One whole training step on ``images`` [B, 3, H, W]: masks (drawn for ``step`` unless given),
        scheduled LR and weight decay, forward, backward, AdamW and the EMA update. ``optimizer``: a
        wrapper of ``self.optimizer`` to step through (Lightning's, which counts the steps)."""
        step = self.next_step if step is None else int(step)
        if not self.warmed_up:
            self.warm_up(len(images), step)
        masks = self.prepare(masks if masks is not None else self.masks(len(images), step))
        agree = (lambda flag: distributed.all_agree(flag, self.device)) if distributed.active() else None
        result = train_step(self.model, optimizer or self.optimizer, images.to(self.device, non_blocking=True), masks,
                            step, self.schedules, precision=self.precision, grad_clip=self.grad_clip,
                            master=self.master, forward=self._wrapped[0], accum_steps=self.accum_steps, agree=agree,
                            grad_reduce=self.grad_reduce, tail=self.tail, sync=not self.deferred, halt=self.halt,
                            graphs=self.graphs)
        self.next_step = step + 1
        return result

    # -- checkpointing inside someone else's loop
    def state_dict(self, *args, **kwargs) -> dict:
        """Everything a bit-exact resume needs: weights (fp32), optimiser, sampler, next step, RNG states.
        Tensors and plain containers only (loads with ``torch.load(weights_only=True)``)."""
        return engine_state(model_state=self.model.state_dict(), optimizer_state=self.optimizer.state_dict(),
                            sampler_state=self.sampler.state_dict(), next_step=self.next_step)

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False) -> None:
        """Restore ``state_dict()``'s output; the next ``step()`` continues the run exactly."""
        self.next_step = load_engine_state(state, model=self.model, optimizer=self.optimizer, sampler=self.sampler,
                                           strict=strict)
        if self.graphs is not None and self.graphs.graphs:  # the captured steps point at the old optimiser state
            self.graphs = StepGraphs(self.device, self.halt)
            self.warmed_up = False
        if self.master is not None:
            self.master.sync_params()
