"""kernels/adamw_tail.py: the fused AdamW + EMA + compute-copy pass against its reference and
against torch.optim.AdamW followed by the EMA and a copy. Every tensor (step counts and the
``found_inf`` flag included) lives on the test's device: the CPU under Triton's interpreter, or CUDA."""
import pytest
import torch
from conftest import DEVICE
from kernel_checks import needs_triton, rand

from ijepa_fast.kernels.adamw_tail import adamw_tail_, adamw_tail_reference
from ijepa_fast.kernels.ema import ema_reference

pytestmark = needs_triton

SIZES = [(1,), (80,), (1281,), (70001,), (3, 1408), (0,)]


def _model():
    """Four groups as the engine has them: decayed with EMA targets ('encoder'), decayed without
    ('predictor'), not decayed with targets, not decayed without; one parameter gets no gradient,
    one frozen parameter only takes the EMA."""
    shapes = [[SIZES[0], SIZES[3], SIZES[4]], [SIZES[2], SIZES[5]], [SIZES[1], SIZES[2]], [SIZES[1]]]
    groups = [[rand(*s) for s in g] for g in shapes]
    targets = {0: [rand(*s) for s in shapes[0]], 2: [rand(*s) for s in shapes[2]]}
    frozen = (rand(7, 9), rand(7, 9))  # (source, target)
    return groups, targets, frozen


def _clone(state):
    groups, targets, frozen = state
    return ([[p.clone() for p in g] for g in groups], {k: [t.clone() for t in v] for k, v in targets.items()},
            tuple(x.clone() for x in frozen))


HYPER = [dict(weight_decay=0.04), dict(weight_decay=0.05), dict(weight_decay=0.0), dict(weight_decay=0.0)]


def _grads(groups):
    """bf16 gradients (the lean step's), None for the predictor's last-but-one parameter."""
    out = [[rand(*p.shape, dtype=torch.bfloat16, scale=0.1) for p in g] for g in groups]
    out[1][0] = None
    return out


class Tail:
    """The state the tail keeps for a set of groups: moments, step counts, compute copies."""

    def __init__(self, state, backend):
        self.groups, self.targets, self.frozen = state
        self.backend = backend
        self.m = [[torch.zeros_like(p) for p in g] for g in self.groups]
        self.v = [[torch.zeros_like(p) for p in g] for g in self.groups]
        self.steps = [[torch.zeros((), device=DEVICE) for _ in g] for g in self.groups]
        self.c = [[p.bfloat16() for p in g] for g in self.groups]
        self.tc = {k: [t.bfloat16() for t in v] for k, v in self.targets.items()}
        self.frozen_tc = self.frozen[1].bfloat16()

    def step(self, grads, lr, wd, momentum, **kw):
        fn = adamw_tail_reference if self.backend == "torch" else adamw_tail_
        extra = {} if self.backend == "torch" else {"backend": self.backend}
        for i, g in enumerate(self.groups):
            decay = wd if HYPER[i]["weight_decay"] > 0 else 0.0
            fn(g, grads[i], self.m[i], self.v[i], self.steps[i], lr=lr, weight_decay=decay,
               betas=(0.9, 0.999), eps=1e-8, computes=self.c[i], targets=self.targets.get(i),
               target_computes=self.tc.get(i), momentum=momentum, **kw, **extra)
        fn([self.frozen[0]], [None], [None], [None], [None], lr=lr, weight_decay=wd, betas=(0.9, 0.999), eps=1e-8,
           targets=[self.frozen[1]], target_computes=[self.frozen_tc], momentum=momentum, **kw, **extra)

    def tensors(self):
        return [x for g in self.groups + self.m + self.v + list(self.targets.values()) for x in g] + [self.frozen[1]]


def _torch_adamw(state):
    groups, targets, frozen = state
    opt = torch.optim.AdamW([{"params": g, **h} for g, h in zip(groups, HYPER)], lr=1e-3, foreach=True)
    return opt


def _torch_step(opt, state, grads, lr, wd, momentum, clip=None):
    groups, targets, frozen = state
    for g, gg in zip(groups, grads):
        for p, grad in zip(g, gg):
            p.grad = None if grad is None else grad.float()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g if p.grad is not None], clip)
    for group, h in zip(opt.param_groups, HYPER):
        group["lr"] = lr
        group["weight_decay"] = wd if h["weight_decay"] > 0 else 0.0
    opt.step()
    opt.zero_grad(set_to_none=True)
    for i, ts in targets.items():
        ema_reference(ts, groups[i], momentum)
    ema_reference([frozen[1]], [frozen[0]], momentum)


# Under the interpreter the kernel's fp32 arithmetic is torch's on the CPU; compiled for a GPU it
# contracts multiply-adds and torch's CUDA kernels round in their own order: a few fp32 roundings per
# update (the tolerance of the five-step device test in test_fused_tail.py).
TOL = {"rtol": 1e-6, "atol": 1e-7} if DEVICE == "cpu" else {"rtol": 1e-5, "atol": 1e-6}


def _close(a, b, what):
    torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what}: {m}")


SCHEDULE = [(1e-3, 0.04, 0.996), (2e-3, 0.1, 0.997), (5e-4, 0.2, 0.999), (1e-3, 0.3, 0.9995)]


@pytest.mark.parametrize("clip", [None, 0.05])
def test_kernel_adamw_tail_matches_torch_adamw_and_ema(clip):
    state = _model()
    init = _clone(state)
    kernel, ref = Tail(_clone(state), "triton"), Tail(_clone(state), "torch")
    opt = _torch_adamw(state)
    for lr, wd, mom in SCHEDULE:
        grads = _grads(state[0])
        kw = {}
        if clip is not None:  # clip_grad_norm_'s coefficient, a device scalar, folded into the pass
            norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for gg in grads for g in gg
                                                         if g is not None]))
            kw["grad_scale"] = torch.clamp(clip / (norm + 1e-6), max=1.0)
            assert kw["grad_scale"] < 1  # the clipping is active
        kernel.step(grads, lr, wd, mom, **kw)
        ref.step(grads, lr, wd, mom, **kw)
        _torch_step(opt, state, grads, lr, wd, mom, clip)
    want = [x for g in state[0] for x in g]
    want += [opt.state[p].get("exp_avg", torch.zeros_like(p)) for g in state[0] for p in g]
    want += [opt.state[p].get("exp_avg_sq", torch.zeros_like(p)) for g in state[0] for p in g]
    want += [t for v in state[1].values() for t in v] + [state[2][1]]
    for i, (k, r, w) in enumerate(zip(kernel.tensors(), ref.tensors(), want)):
        _close(k, w, f"kernel tensor {i}")
        _close(r, w, f"reference tensor {i}")
    for tail in (kernel, ref):
        for g, steps in zip(state[0], tail.steps):  # step counts as torch keeps them (none without a gradient)
            for p, s in zip(g, steps):
                want = float(opt.state[p].get("step", torch.tensor(0.0)))
                assert s.device == p.device and float(s) == want, "step count"
        # the compute copies are the rounded masters and targets, exactly
        for g, cs in zip(tail.groups, tail.c):
            for p, c in zip(g, cs):
                assert torch.equal(c, p.bfloat16())
        for k, tcs in tail.tc.items():
            for t, tc in zip(tail.targets[k], tcs):
                assert torch.equal(tc, t.bfloat16())
        assert torch.equal(tail.frozen_tc, tail.frozen[1].bfloat16())
    assert not torch.equal(kernel.groups[0][1], init[0][0][1])  # the masters moved


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_kernel_adamw_tail_found_inf_skips_everything(backend):
    state = _model()
    tail = Tail(state, backend)
    grads = _grads(state[0])
    tail.step(grads, 1e-3, 0.04, 0.996)  # one real step first: moments and counts nonzero
    before = [x.clone() for x in tail.tensors()]
    before += [x.clone() for g in tail.c for x in g] + [x.clone() for v in tail.tc.values() for x in v]
    steps = [float(s) for g in tail.steps for s in g]
    nan_grads = _grads(state[0])
    nan_grads[0][1][5] = float("nan")
    tail.step(nan_grads, 1e-3, 0.04, 0.996, found_inf=torch.ones((), device=DEVICE))
    after = tail.tensors() + [x for g in tail.c for x in g] + [x for v in tail.tc.values() for x in v]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert [float(s) for g in tail.steps for s in g] == steps
    # a zero flag changes nothing about the step
    twin = Tail(_clone((tail.groups, tail.targets, tail.frozen)), backend)
    twin.m, twin.v = [[x.clone() for x in g] for g in tail.m], [[x.clone() for x in g] for g in tail.v]
    twin.steps = [[s.clone() for s in g] for g in tail.steps]
    tail.step(grads, 1e-3, 0.04, 0.996, found_inf=torch.zeros((), device=DEVICE))
    twin.step(grads, 1e-3, 0.04, 0.996)
    assert all(torch.equal(a, b) for a, b in zip(tail.tensors(), twin.tensors()))
    assert [float(s) for g in tail.steps for s in g] == [s + 1 for s in steps[:3]] + [steps[3]] + \
        [s + 1 for s in steps[4:]]


def test_kernel_adamw_tail_checks_its_inputs():
    p, zeros, step = rand(5), torch.zeros(5, device=DEVICE), torch.zeros((), device=DEVICE)
    with pytest.raises(ValueError, match="paired with"):
        adamw_tail_([p], [rand(6)], [zeros], [zeros.clone()], [step], lr=1e-3,
                    weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, backend="triton")
    with pytest.raises(TypeError, match="fp32"):
        adamw_tail_([p.bfloat16()], [rand(5)], [zeros], [zeros.clone()], [step], lr=1e-3,
                    weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, backend="triton")
