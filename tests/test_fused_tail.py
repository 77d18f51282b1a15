"""perf.optimizer=fused_tail: the lean step's AdamW + EMA + bf16 copy as one fused pass equals
torch's AdamW, update_target and sync_params; checkpoints move between the two; the deferred step
skips a non-finite step on the device. Every tensor lives on the test's device: the CPU (the Triton
kernels under the interpreter) or a CUDA GPU (the kernels compiled for the card)."""
import copy
import math

import pytest
import torch
from conftest import DEVICE
from test_perf import _batch, _model

from ijepa_fast.perf.switches import MasterWeights
from ijepa_fast.perf.tail import FusedTail
from ijepa_fast.training.schedules import Schedules
from ijepa_fast.training.step import make_optimizer, read_results, train_step

SCHED = Schedules(steps_per_epoch=4, epochs=2, warmup=0.5)
# On the CPU the plain tail and torch's AdamW agree bit for bit, so runs of several steps compare
# exactly. On CUDA they round differently (torch's CUDA kernels, Triton's compiled arithmetic): after
# one step from equal weights the masters and moments agree to fp32 rounding, but a bf16 compute copy
# of a master that moved by one fp32 rounding can land on the neighbouring bf16 value, and the next
# forward pass then differs by more than rounding; so on CUDA the runs take one step from equal weights.
EXACT = DEVICE == "cpu"
STEPS = 3 if EXACT else 1
FP32_TOL = {"rtol": 1e-5, "atol": 1e-6}  # a few fp32 roundings of each update
BF16_TOL = {"rtol": 2**-7, "atol": 1e-6}  # one bf16 rounding of masters that agree to fp32 rounding


def _lean(tail_backend=None):
    """(model, bf16 copy, torch AdamW, fused tail or None) on the test's device, the same weights every time."""
    model = _model().to(DEVICE)
    mw = MasterWeights(model)
    opt = make_optimizer(model, impl="foreach")
    return model, mw, opt, FusedTail(model, opt, mw, backend=tail_backend) if tail_backend else None


def _run(lean, steps, **kw):
    model, mw, opt, tail = lean
    out = []
    for s in steps:
        torch.manual_seed(100 + s)  # the same images for every run
        images, masks = _on_device(mw, *_batch(model, seed=s, step=s))
        out.append(train_step(model, opt, images, masks, s, SCHED, master=mw, tail=tail, **kw))
    return out


def _on_device(mw, images, masks):
    """The batch as the trainer hands it over: masks prepared on the host, then both on the device."""
    return images.to(DEVICE), mw.compute.prepare(masks).to(DEVICE)


def _state(lean):
    """Every tensor the tail writes: masters (target encoder included), moments, the bf16 copy."""
    model, mw, opt, _ = lean
    out = {f"p.{n}": p for n, p in model.named_parameters()}
    out.update({f"c.{n}": p for n, p in mw.compute.named_parameters()})
    for n, p in model.named_parameters():
        for k, v in opt.state.get(p, {}).items():
            out[f"{k}.{n}"] = v
    return out


def _assert_same(a, b, exact=EXACT):
    """Every tensor the tail writes equal (``exact``), else within ``FP32_TOL`` (the bf16 copies
    within ``BF16_TOL``); step counts always exactly."""
    a, b = _state(a), _state(b)
    assert a.keys() == b.keys()
    for k in a:
        tol = {"rtol": 0.0, "atol": 0.0} if exact or k.startswith("step.") else \
            BF16_TOL if k.startswith("c.") and not EXACT else FP32_TOL
        torch.testing.assert_close(a[k].float().cpu(), b[k].float().cpu(), **tol, msg=k)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_fused_tail_lean_steps_equal_torch_adamw(clip):
    ref, tail = _lean(), _lean("reference")
    r = _run(ref, range(STEPS), grad_clip=clip)
    t = _run(tail, range(STEPS), grad_clip=clip)
    for x, y in zip(r, t):
        assert x.loss == y.loss if EXACT else math.isclose(x.loss, y.loss, rel_tol=1e-6)
        assert math.isclose(x.grad_norm, y.grad_norm, rel_tol=1e-6)
    _assert_same(ref, tail)  # the plain torch tail (on the CPU bit for bit: same arithmetic)
    model, mw = tail[0], tail[1]
    for p, c in zip(model.parameters(), mw.compute.parameters()):
        assert torch.equal(c, p.to(c.dtype))


def test_fused_tail_triton_lean_steps_equal_torch_adamw():
    ref, tail = _lean(), _lean("triton")
    _run(ref, range(2 if EXACT else 1), grad_clip=0.5)
    _run(tail, range(2 if EXACT else 1), grad_clip=0.5)
    _assert_same(ref, tail, exact=False)  # the kernel's arithmetic: within a few fp32 roundings
    for p, c in zip(tail[0].parameters(), tail[1].compute.parameters()):
        assert torch.equal(c, p.to(c.dtype))


def _tail_state(model, mw, opt):
    """Masters, targets, bf16 copies, moments and step counts, on the CPU for comparison."""
    out = {f"p.{n}": p for n, p in model.named_parameters()}
    out.update({f"c.{n}": p for n, p in mw.compute.named_parameters()})
    for n, p in model.named_parameters():
        out.update({f"{k}.{n}": v for k, v in opt.state.get(p, {}).items()})
    return {k: v.detach().float().cpu() for k, v in out.items()}


def test_fused_tail_five_steps_equal_torch_adamw_and_ema_on_the_device():
    """The Triton tail's masters, moments, step counts, EMA targets and bf16 copies after five steps
    of the same gradients equal torch's AdamW, then update_target, then sync_params (on a GPU: the
    kernels as compiled for the card, against torch's CUDA AdamW)."""
    ref, tail = _lean(), _lean("triton")
    schedule = [(1e-3, 0.04, 0.996), (2e-3, 0.1, 0.997), (5e-4, 0.2, 0.999), (1e-3, 0.3, 0.9995), (3e-3, 0.0, 0.99)]
    for lr, wd, momentum in schedule:
        for lean in (ref, tail):
            for g in lean[2].param_groups:
                g["lr"], g["weight_decay"] = lr, 0.0 if g.get("WD_exclude") else wd
        for p, q in zip(ref[1].compute.parameters(), tail[1].compute.parameters()):  # the same bf16 gradients
            if p.requires_grad:
                p.grad = (torch.randn_like(p, dtype=torch.float32) * 0.1).to(p.dtype)
                q.grad = p.grad.clone()
        model, mw, opt, _ = ref
        mw.sync_grads()
        opt.step()
        model.update_target(momentum)
        mw.sync_params()
        tail[3].step(momentum, from_compute=True)
    a, b = _tail_state(ref[0], ref[1], ref[2]), _tail_state(tail[0], tail[1], tail[2])
    assert a.keys() == b.keys() and any(k.startswith("exp_avg_sq.") for k in a)
    assert any(k.startswith("p.target_encoder.") for k in a)
    for k in a:
        tol = {"rtol": 0.0, "atol": 0.0} if k.startswith("step.") else {"rtol": 1e-5, "atol": 1e-6}
        if k.startswith("c."):  # one bf16 rounding of masters that agree to fp32 rounding
            tol = {"rtol": 2**-7, "atol": 1e-6}
        torch.testing.assert_close(a[k], b[k], **tol, msg=k)
    moved = _lean()[0]
    assert not torch.equal(moved.target_encoder.blocks[0].mlp.fc1.weight.cpu(),
                           tail[0].target_encoder.blocks[0].mlp.fc1.weight.cpu())  # the EMA moved the targets


@pytest.mark.parametrize("first,second", [("torch", "tail"), ("tail", "torch")])
def test_fused_tail_checkpoint_resumes_in_the_other(first, second):
    def make(kind):
        return _lean("reference" if kind == "tail" else None)

    a = make(first)
    _run(a, range(2))
    saved = {"model": a[0].state_dict(), "optimizer": a[2].state_dict()}
    assert all(set(st) == {"step", "exp_avg", "exp_avg_sq"} for st in saved["optimizer"]["state"].values())
    b, cont = make(second), make(first)
    for lean in (b, cont):  # each its own copy, as from a file
        lean[0].load_state_dict(copy.deepcopy(saved["model"]))
        lean[2].load_state_dict(copy.deepcopy(saved["optimizer"]))
        lean[1].sync_params()
    _run(b, [2, 3] if EXACT else [2])
    _run(cont, [2, 3] if EXACT else [2])
    _assert_same(b, cont)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fused_tail_deferred_nan_step_changes_nothing(backend):
    lean = _lean(backend)
    halt = torch.zeros((), device=DEVICE)
    res = _run(lean, range(2), sync=False, halt=halt)
    assert all(r.deferred for r in res)
    good = {k: v.clone() for k, v in _state(lean).items()}
    model, mw, opt, tail = lean
    torch.manual_seed(102)
    images, masks = _on_device(mw, *_batch(model, seed=2, step=2))
    images[1, 0, 3, 3] = float("nan")
    res.append(train_step(model, opt, images, masks, 2, SCHED, master=mw, tail=tail, sync=False, halt=halt))
    res += _run(lean, [3], sync=False, halt=halt)  # a finite step after it: held by the halt flag
    after = _state(lean)
    assert all(torch.equal(good[k], after[k]) for k in good), "a skipped step changed something"
    assert float(halt) == 1.0
    assert len(read_results(list(enumerate(res[:2])))) == 2
    with pytest.raises(FloatingPointError, match="loss is nan at step 2"):
        read_results(list(enumerate(res)))


def test_fused_tail_deferred_steps_equal_synchronous_ones():
    a, b = _lean("reference"), _lean("reference")
    ra = _run(a, range(3), grad_clip=0.5)
    rb = read_results(list(enumerate(_run(b, range(3), grad_clip=0.5, sync=False))))
    assert [(x.loss, x.grad_norm) for x in ra] == [(x.loss, x.grad_norm) for x in rb]
    _assert_same(a, b)


def test_fused_tail_trainer_deferred_nan_stops_with_the_last_good_checkpoint(tmp_path):
    from test_distributed import TINY

    from ijepa_fast.config import load_config
    from ijepa_fast.training.trainer import Trainer, TrainingStopped

    cfg = load_config("demo_cpu", TINY + ["data.batch_size=8", "run.checkpoint_every=4", "run.log_every=3",
                                          f"run.dir={tmp_path}", "run.max_steps=12", "perf.bf16_weights=true",
                                          "perf.optimizer=fused_tail"])
    trainer = Trainer(cfg)
    assert trainer.deferred and trainer.tail is not None
    real = trainer.master.compute.loss

    def loss(images, masks, return_outputs=False):
        out = real(images, masks)
        return out * float("nan") if trainer.step == 4 and torch.is_grad_enabled() else out

    trainer.master.compute.loss = loss
    with pytest.raises(TrainingStopped, match="loss is nan at step 4"):
        trainer.run()  # read at step 6 (run.log_every=3): steps 4 and 5 were skipped on the device
    assert trainer.step == 4 and not trainer._halt  # read at 6; the trainer is back at the last good state
    ckpt = torch.load(tmp_path / "jepa-latest.pth.tar", weights_only=True)
    assert ckpt["ijepa_fast"]["step"] == 4  # the last good one, intact
    for name, v in ckpt["encoder"].items():  # and the model is still that state
        assert torch.equal(trainer.model.encoder.state_dict()[name.removeprefix("module.")], v), name
    for name, v in ckpt["target_encoder"].items():
        assert torch.equal(trainer.model.target_encoder.state_dict()[name.removeprefix("module.")], v), name
    log = (tmp_path / "train.log").read_text()
    assert "optimiser fused_tail" in log and "Nothing was updated by this step or the ones after it" in log


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_fused_tail_deferred_step_has_no_host_sync(layout):
    """The whole lean step (forward, backward, norm, finiteness, AdamW, EMA, bf16 refresh) with the
    fused tail and ``sync=False`` reads nothing back; the synchronous step reads once (its loss and
    gradient norm: a ``tolist`` of device tensors, counted on the CPU as on a GPU)."""
    from ijepa_fast.bench.profiling import count_host_syncs

    lean = _lean("reference")
    model, mw, opt, tail = lean
    for m in (model, mw.compute):
        m.configure_layout(layout, "padded")
    _run(lean, [0])  # first use builds the tail's tables
    images, masks = _on_device(mw, *_batch(model, seed=1, step=1))  # masks prepared on the host first
    with count_host_syncs() as syncs:
        res = train_step(model, opt, images, masks, 1, SCHED, master=mw, tail=tail, sync=False, halt=None)
    assert res.deferred and syncs.total == 0, syncs.report()
    images, masks = _on_device(mw, *_batch(model, seed=2, step=2))
    with count_host_syncs() as syncs:
        train_step(model, opt, images, masks, 2, SCHED, master=mw, tail=tail)
    assert syncs.counts() == {"tolist": 1}, syncs.report()


def test_fused_tail_tables_built_once_over_fifty_steps():
    """The kernel's tables are built at the first step only: 50 steps, each with its own masks (so
    activations come and go between steps), reuse them; the gradient buffers stay where they were."""
    from ijepa_fast.kernels import adamw_tail

    model, mw, opt, tail = _lean("triton")
    sched = Schedules(steps_per_epoch=50, epochs=1, warmup=0.2)
    lengths, first, where = set(), None, None
    for s in range(50):
        images, raw = _batch(model, seed=s, step=s)
        lengths.add(tuple(raw.context.shape))
        images, masks = _on_device(mw, images, raw)
        res = train_step(model, opt, images, masks, s, sched, master=mw, tail=tail, sync=False)
        grads = [p.grad.data_ptr() for p in mw.compute.parameters() if p.grad is not None]
        if s == 0:
            first, where = dict(adamw_tail.BUILDS), grads
            assert first["pointers"] > 0 and first["blocks"] > 0
        assert grads == where and not any(p.grad.any() for p in mw.compute.parameters() if p.grad is not None)
    assert len(lengths) > 5  # the masks (and so the activations' sizes) changed from step to step
    assert adamw_tail.BUILDS == first, f"tables rebuilt after the first step: {first} -> {adamw_tail.BUILDS}"
    (last,) = read_results([(49, res)])
    assert math.isfinite(last.loss)
