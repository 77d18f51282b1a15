"""The optimiser tail as one fused pass (``perf.optimizer=fused_tail``).

After the backward pass the plain lean step runs ``optimizer.step()`` (AdamW on the fp32
masters), ``model.update_target(momentum)`` (the EMA) and ``MasterWeights.sync_params()`` (the
bf16 compute copy from the masters). ``FusedTail.step`` does all three in one sweep per parameter
group (``kernels/adamw_tail.py``): it reads each gradient (the bf16 one of the compute copy, or
the fp32 master gradient), the master and its moments, and writes the master, the moments, the
compute copy and, for encoder parameters, the target encoder and its compute copy. Under
``perf.fp8=target`` it then writes the target encoder's FP8 weights and scales from the fp32 target
masters it has just updated (``fp8_target``; one launch of ``kernels/fp8_rows.py`` over every FP8
layer, skipped with the rest on ``found_inf``).

The optimiser state stays in the ``torch.optim.AdamW``'s own ``state`` (``exp_avg``,
``exp_avg_sq``, ``step``), so checkpoints keep their format and a run can resume with either
implementation. The step counts are kept on the parameters' device (as torch's fused AdamW keeps
them), so that a step skipped on the device (``found_inf``) needs no host synchronisation.

``FusedTail.zero_grad`` keeps the gradients the pass reads from step to step (zeroed in place, so
autograd adds into the same buffers): their addresses stay put, and the kernel's pointer table is
built once, not at every step. A parameter that once had a gradient is then stepped with a zero
gradient in a step that gives it none (the engine's models give every trainable parameter a
gradient in every step).

``device_hyper=True`` (``perf.cuda_graphs``): each group's learning rate and weight decay and the
EMA momentum live in device tensors (float64, one set per tail), written in place by ``stage``
before each step (``fill_``: no host synchronisation) and read by the kernels from device memory;
``step`` then launches the same kernels with the same arguments every step, so it can be captured
in a CUDA graph and replayed with new values.
"""
from __future__ import annotations

import torch

from ..kernels.adamw_tail import adamw_tail_
from ..kernels.fp8_rows import fp8_rows_
from ..model import IJEPA
from . import fp8_target


class FusedTail:
    """AdamW + EMA + compute-copy refresh for ``model``'s ``optimizer`` (a torch.optim.AdamW)."""

    def __init__(self, model: IJEPA, optimizer: torch.optim.Optimizer, master=None, backend: str | None = None,
                 device_hyper: bool = False):
        if not isinstance(optimizer, torch.optim.AdamW):
            raise TypeError(f"the fused tail steps a torch.optim.AdamW, not {type(optimizer).__name__}")
        for g in optimizer.param_groups:
            unsupported = [k for k in ("amsgrad", "maximize", "differentiable") if g.get(k)]
            if unsupported:
                raise ValueError(f"the fused tail does not implement AdamW's {', '.join(unsupported)}")
        self.model, self.optimizer, self.master = model, optimizer, master
        self.backend = backend or model.kernels
        pairs = list(zip(model.encoder.parameters(), model.target_encoder.parameters()))
        self._target = {id(p): t for p, t in pairs}
        self._compute = {id(m): c for m, c in zip(master.master.parameters(), master.compute.parameters())} \
            if master is not None else {}
        stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self._ema_only = [(p, t) for p, t in pairs if id(p) not in stepped]  # frozen encoder parameters
        # perf.fp8=target: the FP8 target layers of the module that runs the forward, recast from the
        # fp32 target masters after the EMA (their tensors are read at each step; while they stay put,
        # the kernel's table is the cached one)
        self._fp8_layers = fp8_target.layers((master.compute if master is not None else model).target_encoder)
        self.device_hyper = device_hyper
        if device_hyper:
            dev = next(model.parameters()).device
            self._lr = [torch.zeros((), dtype=torch.float64, device=dev) for _ in optimizer.param_groups]
            self._wd = [torch.zeros((), dtype=torch.float64, device=dev) for _ in optimizer.param_groups]
            self._momentum = torch.zeros((), dtype=torch.float64, device=dev)

    @torch.no_grad()
    def stage(self, momentum: float) -> None:
        """With ``device_hyper``: the groups' current lr and weight decay and ``momentum`` written
        into the device tensors the next ``step`` reads (in place, no host synchronisation)."""
        if not self.device_hyper:
            raise RuntimeError("FusedTail.stage needs device_hyper=True")
        for group, lr, wd in zip(self.optimizer.param_groups, self._lr, self._wd):
            lr.fill_(float(group["lr"]))
            wd.fill_(float(group["weight_decay"]))
        self._momentum.fill_(float(momentum))

    def _state(self, p: torch.Tensor) -> dict:
        """torch's AdamW state of ``p``, created as torch creates it; the step count on p's device."""
        st = self.optimizer.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif st["step"].device != p.device:  # from a CPU-kept count (torch's foreach AdamW), once
            st["step"] = st["step"].to(p.device, torch.float32)
        return st

    @torch.no_grad()
    def step(self, momentum: float, *, from_compute: bool = False, grad_scale: torch.Tensor | None = None,
             found_inf: torch.Tensor | None = None) -> None:
        """One AdamW step of every group at its current lr / weight decay / betas / eps, the EMA at
        ``momentum``, the compute copies and the target's FP8 weights (``perf.fp8=target``).
        ``from_compute``: take the gradients from the bf16 compute copy (no fp32 master gradients
        were made). ``grad_scale``: a device scalar multiplying every gradient (clipping).
        ``found_inf``: a device scalar; nonzero skips it all.
        With ``device_hyper`` the values ``stage`` wrote are used (``momentum`` is ignored)."""
        tc_of = self._compute.get
        if self.device_hyper:
            momentum = self._momentum
        for gi, group in enumerate(self.optimizer.param_groups):
            lr, wd = (self._lr[gi], self._wd[gi]) if self.device_hyper else \
                (float(group["lr"]), float(group["weight_decay"]))
            params = list(group["params"])
            grads = [self._grad(p, from_compute) for p in params]
            states = [self._state(p) if g is not None else {} for p, g in zip(params, grads)]
            targets = [self._target.get(id(p)) for p in params]
            adamw_tail_(params, grads, [s.get("exp_avg") for s in states], [s.get("exp_avg_sq") for s in states],
                        [s.get("step") for s in states], lr=lr,
                        weight_decay=wd, betas=group["betas"], eps=float(group["eps"]),
                        computes=[tc_of(id(p)) for p in params], targets=targets,
                        target_computes=[tc_of(id(t)) if t is not None else None for t in targets],
                        momentum=momentum, grad_scale=grad_scale, found_inf=found_inf, backend=self.backend)
        if self._ema_only:
            ps, ts = [p for p, _ in self._ema_only], [t for _, t in self._ema_only]
            n = len(ps)
            adamw_tail_(ps, [None] * n, [None] * n, [None] * n, [None] * n, lr=0.0, weight_decay=0.0,
                        betas=(0.9, 0.999), eps=1e-8, targets=ts, target_computes=[tc_of(id(t)) for t in ts],
                        momentum=momentum, found_inf=found_inf, backend=self.backend)
        if self._fp8_layers:
            layers = self._fp8_layers
            fp8_rows_([m.master_weight for m in layers], [m.weight_fp8 for m in layers],
                      [m.weight_scale for m in layers], found_inf=found_inf, backend=self.backend)

    @torch.no_grad()
    def zero_grad(self, runner: torch.nn.Module, from_compute: bool) -> None:
        """After ``step``: the gradients the pass read (``runner``'s, the module that ran the
        backward pass) zeroed in place and kept; any fp32 master gradients made from them dropped."""
        grads = [p.grad for p in runner.parameters() if p.grad is not None]
        if from_compute or self.master is None:
            if grads:
                torch._foreach_zero_(grads)
        else:
            runner.zero_grad(set_to_none=True)
        if self.master is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def _grad(self, p: torch.Tensor, from_compute: bool):
        if not from_compute:
            return p.grad
        c = self._compute.get(id(p))
        return c.grad if c is not None else p.grad
