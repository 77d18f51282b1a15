"""``IJEPAModule``: I-JEPA pretraining as a PyTorch Lightning module (``pip install "ijepa-fast[lightning]"``).

    module = IJEPAModule(IJEPA.build("vit_base", patch_size=16), Schedules(len(loader), epochs=300))
    loader = DataLoader(images, batch_size=64, num_workers=8, collate_fn=module.collate_fn(), drop_last=True)
    lightning.Trainer(max_epochs=300).fit(module, loader)       # resume: fit(..., ckpt_path="last.ckpt")

Each training step is ``Engine.step`` (the engine is assembled when Lightning asks for the
optimiser, on the module's device, with the same perf switches as ``ijepa-fast train``: every
``perf`` switch 'auto' by default, fast on CUDA), run with manual optimisation: the schedules' LR
and weight decay set on the reference's four AdamW groups, forward, backward, the finiteness
check (a non-finite loss or gradient raises before the optimiser or the target encoder is
touched), optional clipping and micro-batches, AdamW, then the EMA update of the target encoder at
the step's momentum. Running our step instead of re-expressing it in Lightning's automatic
optimisation keeps the trajectory identical to ``train_step``'s and ``Engine``'s by construction;
so the Trainer's ``gradient_clip_val`` and ``accumulate_grad_batches`` do not apply (Lightning
refuses them under manual optimisation): pass ``grad_clip`` and ``accum_steps`` here.

Masks: batches from ``collate_fn()`` (a ``MaskCollator``, drawing in the loader's workers) carry
them; for plain image batches the module draws them itself. Either way the masks of optimiser
step ``global_step`` are ``MultiBlockSampler(model.grid, mask, seed).sample(B, global_step)``.
Lightning is imported only here, never by ``import ijepa_fast``.
"""
from __future__ import annotations

import copy

import torch

from .checkpoint.states import ENTRY, head_counts, lightning_entry, read_lightning_entry
from .config import MaskConfig, PerfConfig
from .errors import ConfigError
from .masks import MaskBatch, MaskCollator, MultiBlockSampler
from .model import IJEPA
from .training.engine import Engine
from .training.schedules import Schedules

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package name
    try:
        import pytorch_lightning as pl
    except ImportError:
        raise ImportError("ijepa_fast.lightning needs PyTorch Lightning: pip install \"ijepa-fast[lightning]\" "
                          "(or pip install lightning)") from None


class IJEPAModule(pl.LightningModule):
    """An ``IJEPA`` trained by Lightning exactly as ``train_step`` trains it.

    ``schedules``: LR, weight decay and EMA momentum by step (``Schedules(len(loader), epochs)``).
    ``mask``, ``seed``: the mask sampler's settings. ``precision``: 'auto' (bf16 autocast on CUDA,
    fp32 elsewhere), 'bf16' or 'fp32'. ``grad_clip``, ``accum_steps``: as in ``train_step``.
    ``lr``, ``weight_decay``, ``betas``, ``eps``: ``make_optimizer``'s. ``perf``: the speed-ups, as
    in ``Engine`` (``optimizer_impl``, when not 'auto', sets ``perf.optimizer``).
    """

    def __init__(self, model: IJEPA, schedules: Schedules, *, mask: MaskConfig | None = None, seed: int = 0,
                 precision: str = "auto", grad_clip: float | None = None, accum_steps: int = 1, lr: float = 1e-3,
                 weight_decay: float = 0.04, betas=(0.9, 0.999), eps: float = 1e-8, optimizer_impl: str = "auto",
                 perf: PerfConfig | None = None):
        super().__init__()
        self.automatic_optimization = False  # the step is train_step's (see the module docstring)
        self.model = model
        self.schedules = schedules
        self.mask_cfg, self.seed = mask or MaskConfig(), int(seed)
        self.sampler = MultiBlockSampler(model.grid, self.mask_cfg, seed=self.seed)
        self.precision_mode, self.grad_clip, self.accum_steps = precision, grad_clip, accum_steps
        self._optim = dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
        self.perf = copy.deepcopy(perf) if perf is not None else PerfConfig()
        if optimizer_impl != "auto":
            self.perf.optimizer = optimizer_impl
        self._engine: tuple[Engine, ...] = ()  # (the engine,) once built: not a child module (same checkpoint keys)
        self._collators: list[MaskCollator] = []
        self._resumed_step: int | None = None
        self.last_result = None  # the StepResult of the latest step

    def forward(self, images: torch.Tensor, masks: MaskBatch) -> torch.Tensor:
        """The plain I-JEPA loss of a batch."""
        return self.model.loss(images, masks)

    def collate_fn(self, **kw) -> MaskCollator:
        """A ``MaskCollator`` for this module's DataLoader: its batches carry the masks of the steps
        they are trained at, drawn in the workers (the module keeps its pass start in step with
        ``global_step``, resumes included). ``kw``: MaskCollator's ``collate``."""
        collator = MaskCollator(self.model.grid, self.mask_cfg, self.seed, rank=self.sampler.rank,
                                world=self.sampler.world, **kw)
        self._collators.append(collator)
        return collator

    @property
    def engine(self) -> Engine:
        """The run's ``Engine`` (built by ``configure_optimizers``)."""
        if not self._engine:
            raise RuntimeError("IJEPAModule.engine is built when Lightning configures the optimiser (fit)")
        return self._engine[0]

    def configure_optimizers(self):
        engine = Engine(self.model, self.schedules, perf=self.perf, precision=self.precision_mode,
                        grad_clip=self.grad_clip, accum_steps=self.accum_steps, device=self.device, strategy="none",
                        sampler=self.sampler, **self._optim)
        self._engine = (engine,)
        return engine.optimizer

    # -- keeping the collators' steps in line with global_step
    def setup(self, stage: str) -> None:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        if world > 1:  # the step's own backward bypasses Lightning's manual_backward, which DDP needs
            raise ConfigError(f"IJEPAModule runs on one process for now ({world} here): for several GPUs use "
                              f"ijepa_fast.Engine under DDP / FSDP, or `torchrun -m ijepa_fast train`")
        for s in [self.sampler] + [c.sampler for c in self._collators]:
            s.rank, s.world = rank, world  # a DistributedSampler gives rank r images r, r + world, ...

    def on_fit_start(self) -> None:
        if self.engine.master is not None:
            self.engine.master.sync_params()  # the bf16 copy from the (possibly restored) weights
        # the first pass's loader iterator starts before on_train_epoch_start, and the restored
        # global_step only appears after this hook: a resumed run's step comes from its checkpoint
        start = self._resumed_step if self._resumed_step is not None else self.global_step
        self._resumed_step = None
        for c in self._collators:
            c.set_step(start)

    def on_train_epoch_start(self) -> None:
        for c in self._collators:  # later passes: their iterators start after this hook
            if c.start != self.global_step:
                c.set_step(self.global_step)

    # -- the step
    def training_step(self, batch, batch_idx: int):
        images, masks = _split(batch)
        step = self.global_step
        if masks is None:
            masks = self.sampler.sample(len(images), step).to(images.device)
        optimizer = self.optimizers()
        result = self.engine.step(images, step, masks, optimizer=optimizer)
        if self.engine.tail is not None:  # the fused tail steps AdamW's state itself: count the step as Lightning does
            optimizer._on_before_step()
            optimizer._on_after_step()
        self.last_result = result
        self.log_dict({"loss": result.loss, "lr": result.lr}, prog_bar=True, on_step=True, on_epoch=False,
                      batch_size=len(images))
        return torch.tensor(result.loss)

    # -- checkpoints: Lightning saves weights (target encoder included), optimiser and loop state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[ENTRY] = lightning_entry(seed=self.seed, mode=self.mask_cfg.mode, heads=head_counts(self.model))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        read_lightning_entry(checkpoint, seed=self.seed, mode=self.mask_cfg.mode)
        self._resumed_step = int(checkpoint.get("global_step", 0))


def _split(batch) -> tuple[torch.Tensor, MaskBatch | None]:
    """(images, masks or None) of a batch: an image tensor, a MaskCollator's (images, masks), or a
    tuple or list whose first element is the images (a TensorDataset's or an ImageFolder's)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch:
        if len(batch) == 2 and isinstance(batch[1], MaskBatch):
            return batch[0], batch[1]
        return batch[0], None
    raise TypeError(f"a batch must be images, (images, masks) or (images, ...), got {type(batch).__name__}")
