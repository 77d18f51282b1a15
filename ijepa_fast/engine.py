"""``Engine``: one I-JEPA training run as a module, for someone else's training loop.

    engine = Engine(IJEPA.build("vit_base", patch_size=16), Schedules(len(loader), epochs=300),
                    mask=MaskConfig(), perf=PerfConfig(bf16_weights=True))
    for step, images in enumerate(loader, start=engine.next_step):
        result = engine.step(images.cuda(), step)          # masks, LR/WD, forward, backward, AdamW, EMA
    torch.save(engine.state_dict(), "run.pt")              # everything a bit-exact resume needs
    engine.load_state_dict(torch.load("run.pt", weights_only=True))

``engine(images, masks)`` is the plain loss (for trainers that run backward and the optimiser
themselves, such as Hugging Face's Trainer or accelerate; then call ``update_target`` after each
optimiser step).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import distributed
from .checkpoint import rng_state, set_rng_state
from .config import MaskConfig, PerfConfig
from .masks import MaskBatch, MultiBlockSampler
from .model import IJEPA
from .perf import apply as apply_perf
from .perf import fused_tail, optimizer_impl
from .schedules import Schedules
from .step import StepResult, make_optimizer, train_step

STATE_VERSION = 1


class Engine(nn.Module):
    """The model, its optimiser, schedules, mask sampler and the lean step's bf16 copy, stepped as one.

    ``model``: an IJEPA (fp32; moved to ``device`` if given). ``schedules``: LR, weight decay and
    EMA momentum by step. ``mask``: the sampler's settings (``seed``, and ``rank``/``world`` under
    several processes: the sampler draws this process's images of the global batch). ``perf``: the
    speed-ups (``bf16_weights``, ``activation_checkpointing``, ``compile``, ``optimizer``), applied
    as the trainer applies them. Under an initialised process group the module runs under DDP, or
    reduces fp32 master gradients itself with ``bf16_weights``. ``optimizer``: defaults to the
    reference's four AdamW groups with ``lr``, ``weight_decay``, ``betas``, ``eps``."""

    def __init__(self, model: IJEPA, schedules: Schedules, *, mask: MaskConfig | None = None, seed: int = 0,
                 perf: PerfConfig | None = None, precision: str = "auto", grad_clip: float | None = None,
                 accum_steps: int = 1, device: str | torch.device | None = None, optimizer=None,
                 lr: float = 1e-3, weight_decay: float = 0.04, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        self.schedules = schedules
        self.precision, self.grad_clip, self.accum_steps = precision, grad_clip, accum_steps
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed.active() \
            else (0, 1)
        self.sampler = MultiBlockSampler(model.grid, mask or MaskConfig(), seed=seed, rank=rank, world=world)
        p = perf or PerfConfig()
        run_model, self.master = apply_perf(self.model, p, self.device)
        forward, self.grad_reduce = distributed.data_parallel(run_model, self.master, "ddp" if world > 1 else "none",
                                                              self.device, accum_steps == 1)
        self._wrapped = (forward,)  # a tuple: the wrapper (or bf16 copy) is not a second child module
        self.optimizer = optimizer or make_optimizer(self.model, lr=lr, weight_decay=weight_decay, betas=betas,
                                                     eps=eps, impl=optimizer_impl(p, self.device))
        self.tail = fused_tail(self.model, self.optimizer, self.master, p, self.device)
        self.next_step = 0  # the step the next call trains (the schedules' and the sampler's index)

    def forward(self, images: torch.Tensor, masks: MaskBatch) -> torch.Tensor:
        """The plain I-JEPA loss of a batch (no optimiser, no EMA)."""
        return self.model.loss(images, masks)

    def update_target(self, step: int) -> None:
        """The EMA update of the target encoder at ``step``'s momentum (for loops that run the optimiser
        themselves, after each optimiser step)."""
        self.model.update_target(self.schedules.momentum_at(step))

    def masks(self, batch_size: int, step: int) -> MaskBatch:
        """This process's masks of ``step`` (the same on any number of processes in default mode)."""
        return self.sampler.sample(batch_size, step)

    def step(self, images: torch.Tensor, step: int | None = None, masks: MaskBatch | None = None) -> StepResult:
        """One whole training step on ``images`` [B, 3, H, W]: masks (drawn for ``step`` unless given),
        scheduled LR and weight decay, forward, backward, AdamW and the EMA update."""
        step = self.next_step if step is None else int(step)
        masks = masks if masks is not None else self.masks(len(images), step)
        if self.accum_steps == 1:
            masks = self._forward_model().prepare(masks)
        masks = masks.to(self.device, non_blocking=True)
        agree = (lambda flag: distributed.all_agree(flag, self.device)) if distributed.active() else None
        result = train_step(self.model, self.optimizer, images.to(self.device, non_blocking=True), masks, step,
                            self.schedules, precision=self.precision, grad_clip=self.grad_clip, master=self.master,
                            forward=self._wrapped[0], accum_steps=self.accum_steps, agree=agree,
                            grad_reduce=self.grad_reduce, tail=self.tail)
        self.next_step = step + 1
        return result

    def _forward_model(self) -> IJEPA:
        return self.master.compute if self.master is not None else self.model

    # -- checkpointing inside someone else's loop
    def state_dict(self, *args, **kwargs) -> dict:
        """Everything a bit-exact resume needs: weights (fp32), optimiser, sampler, next step, RNG states.
        Tensors and plain containers only (loads with ``torch.load(weights_only=True)``)."""
        return {"version": STATE_VERSION, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "sampler": self.sampler.state_dict(), "next_step": self.next_step, "rng": rng_state()}

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False) -> None:
        """Restore ``state_dict()``'s output; the next ``step()`` continues the run exactly."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"not an Engine state (version {state.get('version')!r}, expected {STATE_VERSION})")
        self.model.load_state_dict(state["model"], strict=strict)
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.next_step = int(state["next_step"])
        set_rng_state(state["rng"])
        if self.master is not None:
            self.master.sync_params()
