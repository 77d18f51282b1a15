"""perf.optimizer=fused_tail: the lean step's AdamW + EMA + bf16 copy as one fused pass equals
torch's AdamW, update_target and sync_params; checkpoints move between the two; the deferred step
skips a non-finite step on the device."""
import copy
import math

import pytest
import torch
from test_perf import _batch, _model

from ijepa_fast.perf import MasterWeights
from ijepa_fast.schedules import Schedules
from ijepa_fast.step import make_optimizer, read_results, train_step
from ijepa_fast.tail import FusedTail

SCHED = Schedules(steps_per_epoch=4, epochs=2, warmup=0.5)


def _lean(tail_backend=None):
    """(model, bf16 copy, torch AdamW, fused tail or None), the same weights every time."""
    model = _model()
    mw = MasterWeights(model)
    opt = make_optimizer(model, impl="foreach")
    return model, mw, opt, FusedTail(model, opt, mw, backend=tail_backend) if tail_backend else None


def _run(lean, steps, **kw):
    model, mw, opt, tail = lean
    out = []
    for s in steps:
        torch.manual_seed(100 + s)  # the same images for every run
        images, masks = _batch(model, seed=s, step=s)
        out.append(train_step(model, opt, images, masks, s, SCHED, master=mw, tail=tail, **kw))
    return out


def _state(lean):
    """Every tensor the tail writes: masters (target encoder included), moments, the bf16 copy."""
    model, mw, opt, _ = lean
    out = {f"p.{n}": p for n, p in model.named_parameters()}
    out.update({f"c.{n}": p for n, p in mw.compute.named_parameters()})
    for n, p in model.named_parameters():
        for k, v in opt.state.get(p, {}).items():
            out[f"{k}.{n}"] = v
    return out


def _assert_same(a, b, rtol=0.0, atol=0.0):
    a, b = _state(a), _state(b)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float().cpu(), b[k].float().cpu(), rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_fused_tail_lean_steps_equal_torch_adamw(clip):
    ref, tail = _lean(), _lean("reference")
    r = _run(ref, range(3), grad_clip=clip)
    t = _run(tail, range(3), grad_clip=clip)
    assert [x.loss for x in r] == [x.loss for x in t]
    for x, y in zip(r, t):
        assert math.isclose(x.grad_norm, y.grad_norm, rel_tol=1e-6)
    _assert_same(ref, tail)  # the plain torch tail, bit for bit: same arithmetic, bf16 gradients read directly
    model, mw = tail[0], tail[1]
    for p, c in zip(model.parameters(), mw.compute.parameters()):
        assert torch.equal(c, p.to(c.dtype))


def test_fused_tail_triton_lean_steps_equal_torch_adamw():
    ref, tail = _lean(), _lean("triton")
    _run(ref, range(2), grad_clip=0.5)
    _run(tail, range(2), grad_clip=0.5)
    _assert_same(ref, tail, rtol=1e-5, atol=1e-6)  # measured: within a few fp32 roundings
    for p, c in zip(tail[0].parameters(), tail[1].compute.parameters()):
        assert torch.equal(c, p.to(c.dtype))


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
    _run(b, [2, 3])
    _run(cont, [2, 3])
    _assert_same(b, cont)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fused_tail_deferred_nan_step_changes_nothing(backend):
    lean = _lean(backend)
    halt = torch.zeros(())
    res = _run(lean, range(2), sync=False, halt=halt)
    assert all(r.deferred for r in res)
    good = {k: v.clone() for k, v in _state(lean).items()}
    model, mw, opt, tail = lean
    torch.manual_seed(102)
    images, masks = _batch(model, seed=2, step=2)
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
    from ijepa_fast.train import Trainer, TrainingStopped

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
    fused tail and ``sync=False`` reads nothing back; the synchronous step reads once."""
    from ijepa_fast.profiling import count_host_syncs

    lean = _lean("reference")
    model, mw, opt, tail = lean
    for m in (model, mw.compute):
        m.configure_layout(layout, "padded")
    _run(lean, [0])  # first use builds the tail's tables
    images, masks = _batch(model, seed=1, step=1)
    masks = mw.compute.prepare(masks)  # on the host, before the batch goes to the device (as the trainer does)
    with count_host_syncs() as syncs:
        res = train_step(model, opt, images, masks, 1, SCHED, master=mw, tail=tail, sync=False, halt=None)
    assert res.deferred and syncs.total == 0, syncs.report()
    images, masks = _batch(model, seed=2, step=2)
    masks = mw.compute.prepare(masks)
    with count_host_syncs() as syncs:
        train_step(model, opt, images, masks, 2, SCHED, master=mw, tail=tail)
    assert syncs.counts() == {"tolist": 1}, syncs.report()
