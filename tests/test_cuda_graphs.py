"""perf.cuda_graphs: the graph-ready step (lr, weight decay and momentum in device tensors, persistent
gradients, deferred tail) gives the plain fused-tail step's losses and weights while the schedules
change every step, allocates no new gradient storage after warm-up and reads nothing back; on CUDA
the same step replayed from one captured graph per bucket (skipped elsewhere)."""
import pytest
import torch
from conftest import DEVICE
from kernel_checks import needs_triton

from ijepa_fast import IJEPA, Engine, MaskConfig, PerfConfig, Schedules
from ijepa_fast.bench.profiling import count_host_syncs
from ijepa_fast.errors import ConfigError
from ijepa_fast.kernels.adamw_tail import adamw_tail_
from ijepa_fast.perf.switches import resolve
from ijepa_fast.training.step import read_results, train_step

# lr warms up and decays, weight decay and momentum follow their cosine / linear schedules: every
# step has different values
SCHED = Schedules(steps_per_epoch=3, epochs=2, warmup=1, start_lr=1e-4, lr=1e-3, final_lr=1e-6,
                  weight_decay=0.04, final_weight_decay=0.4, ema=(0.9, 1.0))
MASKS = MaskConfig(min_keep=4)
STEPS = 4
# the tensor-held values round as the numbers do on a GPU; the interpreter and torch's CPU kernels keep
# launch arguments in float64 (and fuse alpha * x + y), so on the CPU the two agree to fp32 rounding; a
# bf16 compute copy that rounds the other way then moves the next gradients by a bf16 step
TOL = {"rtol": 2e-6, "atol": 1e-7}
BF16_TOL = {"rtol": 1e-5, "atol": 1e-6}
COPY_TOL = {"rtol": 2 ** -7, "atol": 1e-6}  # one bf16 rounding step


def _model():
    torch.manual_seed(0)
    return IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=1, pred_dim=24, embed_dim=48, depth=2,
                       num_heads=3, attn="math")


def _images(step):
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(100 + step)).to(DEVICE)


def _engine(graphs: bool, bf16: bool, buckets: int = 2):
    perf = PerfConfig(optimizer="fused_tail", cuda_graphs=graphs, bf16_weights=bf16, token_buckets=buckets,
                      compile=False)
    return Engine(_model(), SCHED, mask=MASKS, seed=3, precision="fp32", perf=perf, device=DEVICE, defer=True)


def _weights(engine):
    out = {f"p.{k}": v.detach().clone() for k, v in engine.model.state_dict().items()}
    for i, p in enumerate(engine.model.parameters()):
        for k, v in engine.optimizer.state.get(p, {}).items():
            out[f"{k}.{i}"] = v.detach().clone()
    if engine.master is not None:
        out.update({f"c.{k}": v.detach().clone() for k, v in engine.master.compute.state_dict().items()})
    return out


@pytest.mark.parametrize("bf16", [False, True])
def test_graph_ready_step_equals_the_plain_fused_tail_step(bf16):
    plain, ready = _engine(False, bf16), _engine(True, bf16)
    assert ready.tail.device_hyper and not plain.tail.device_hyper and ready.deferred
    got = [(s, ready.step(_images(s), s)) for s in range(STEPS)]
    want = [(s, plain.step(_images(s), s)) for s in range(STEPS)]
    lrs = {round(r.lr, 12) for _, r in got}
    moms = {r.momentum for _, r in got}
    assert len(lrs) == STEPS and len(moms) == STEPS  # the values changed at every step
    for a, b in zip(read_results(got), read_results(want)):
        torch.testing.assert_close(torch.tensor(a.loss), torch.tensor(b.loss), **TOL)
        torch.testing.assert_close(torch.tensor(a.grad_norm), torch.tensor(b.grad_norm), rtol=1e-5, atol=0)
    a, b = _weights(ready), _weights(plain)
    assert a.keys() == b.keys()
    for k in a:
        tol = COPY_TOL if k.startswith("c.") else BF16_TOL if bf16 else TOL
        torch.testing.assert_close(a[k].float(), b[k].float(), **tol, msg=k)
    if bf16:  # the graph-ready tail writes the compute copy as the rounded masters
        for p, c in zip(ready.model.parameters(), ready.master.compute.parameters()):
            assert torch.equal(c, p.to(c.dtype)) or c.dtype == torch.float32
    first = _weights(_engine(False, bf16))
    assert any(not torch.equal(first[k], a[k]) for k in a if k.startswith("p.target_encoder"))  # the EMA moved


@pytest.mark.parametrize("bf16", [False, True])
def test_graph_ready_step_keeps_its_gradient_storage_and_reads_nothing_back(bf16):
    engine = _engine(True, bf16)
    runner = engine.run_model
    engine.step(_images(0), 0)  # warm-up: the gradient buffers are made
    ptrs = [p.grad.data_ptr() for p in runner.parameters() if p.grad is not None]
    assert len(ptrs) == sum(1 for p in runner.parameters() if p.requires_grad)
    for s in range(1, 4):
        prepared = engine.prepare(engine.masks(4, s))  # on the host, before the step, as the trainer does
        images = _images(s)
        with count_host_syncs() as syncs:
            result = train_step(engine.model, engine.optimizer, images, prepared, s, SCHED, master=engine.master,
                                tail=engine.tail, sync=False, halt=engine.halt, graphs=engine.graphs)
        assert syncs.total == 0, syncs.report()
        assert result.deferred
        assert [p.grad.data_ptr() for p in runner.parameters() if p.grad is not None] == ptrs
        assert all(not p.grad.any() for p in runner.parameters() if p.grad is not None)  # zeroed in place


def test_device_hyper_values_are_staged_not_baked():
    engine = _engine(True, False)
    engine.step(_images(0), 0)
    engine.tail.stage(0.5)
    assert float(engine.tail._momentum) == 0.5
    for group, lr, wd in zip(engine.optimizer.param_groups, engine.tail._lr, engine.tail._wd):
        assert float(lr) == group["lr"] and float(wd) == group["weight_decay"]


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_adamw_tail_with_device_scalars_equals_numbers(backend):
    torch.manual_seed(1)
    shapes = [(33, 7), (5,), (300,)]

    def state():
        g = torch.Generator().manual_seed(2)
        ps = [torch.randn(s, generator=g).to(DEVICE) for s in shapes]
        return (ps, [torch.randn(s, generator=g).to(DEVICE) for s in shapes],
                [torch.zeros(s, device=DEVICE) for s in shapes], [torch.zeros(s, device=DEVICE) for s in shapes],
                [torch.zeros((), device=DEVICE) for _ in shapes], [p.clone() + 0.1 for p in ps])

    out = []
    for as_tensors in (False, True):
        ps, gs, ms, vs, steps, ts = state()
        for lr, wd, mom in [(1e-3, 0.05, 0.99), (3e-3, 0.2, 0.995)]:
            if as_tensors:
                lr, wd, mom = (torch.tensor(x, dtype=torch.float64, device=DEVICE) for x in (lr, wd, mom))
            adamw_tail_(ps, gs, ms, vs, steps, lr=lr, weight_decay=wd, betas=(0.9, 0.999), eps=1e-8, targets=ts,
                        momentum=mom, backend=backend)
        out.append(ps + ms + vs + ts + steps)
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, **TOL)


def test_cuda_graphs_switch_resolution_and_errors():
    assert resolve(PerfConfig(), torch.device("cpu")).cuda_graphs is False
    assert resolve(PerfConfig(optimizer="fused_tail"), torch.device("cuda")).cuda_graphs is False  # auto: off
    with pytest.raises(ConfigError, match="fused_tail"):
        resolve(PerfConfig(cuda_graphs=True), torch.device("cpu"))
    with pytest.raises(ConfigError, match="token_buckets"):
        resolve(PerfConfig(cuda_graphs=True, optimizer="fused_tail", compile=False, token_buckets=0),
                torch.device("cuda"))
    with pytest.raises(ConfigError, match="one process"):
        resolve(PerfConfig(cuda_graphs=True, optimizer="fused_tail"), torch.device("cpu"), "ddp")
    from ijepa_fast.config import load_config

    ok = ["perf.cuda_graphs=true", "perf.optimizer=fused_tail"]
    assert load_config(None, ok).perf.cuda_graphs is True
    for extra, what in (([], "perf.optimizer"), (["optim.accum_steps=2"], "accum_steps"),
                        (["optim.on_nonfinite=skip"], "on_nonfinite")):
        keys = (ok if extra else ok[:1]) + extra
        with pytest.raises(ConfigError, match=what):
            load_config(None, keys)
    with pytest.raises(ConfigError, match="accum_steps"):
        Engine(_model(), SCHED, mask=MASKS, perf=PerfConfig(optimizer="fused_tail", cuda_graphs=True),
               accum_steps=2, device="cpu")


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs are captured on a CUDA GPU only")
def test_captured_graphs_replay_the_plain_fused_tail_step():
    plain, ready = _engine(False, True), _engine(True, True)
    n = ready.warm_up(4)
    assert n >= 1 and len(ready.graphs.graphs) == n
    got = read_results([(s, ready.step(_images(s), s)) for s in range(STEPS)])
    want = read_results([(s, plain.step(_images(s), s)) for s in range(STEPS)])
    for a, b in zip(got, want):
        assert abs(a.loss - b.loss) <= 1e-3 * abs(b.loss)
    a, b = _weights(ready), _weights(plain)
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5, msg=k)


def test_graph_inputs_are_copied_into_the_captured_batch():
    """StepGraphs' input handling (the part a CPU can check): a prepared batch is cloned into the graph's
    own tensors, a batch of the same shapes is copied into them, and a batch of other shapes is refused."""
    from ijepa_fast.perf.buckets import shape_key
    from ijepa_fast.perf.graphs import _clone, _copy_into

    engine = _engine(True, False)
    batches = [engine.prepare(engine.masks(4, s)) for s in range(12)]
    a = batches[0]
    static = _clone(a)
    pairs = list(zip(_leaves(static), _leaves(a)))
    assert pairs and all(torch.equal(x, y) and x.data_ptr() != y.data_ptr() for x, y in pairs)
    for x, _ in pairs:
        x.zero_()
    _copy_into(static, a)
    assert all(torch.equal(x, y) for x, y in pairs)
    other = next(b for b in batches if shape_key(b) != shape_key(a))
    with pytest.raises(ValueError, match="captured shape"):
        _copy_into(static, other)


def _leaves(x):
    """The tensors of a prepared batch (NamedTuples and dataclasses of tensors)."""
    import dataclasses

    if isinstance(x, torch.Tensor):
        return [x]
    if dataclasses.is_dataclass(x):
        return [t for f in dataclasses.fields(x) for t in _leaves(getattr(x, f.name))]
    if isinstance(x, tuple):
        return [t for v in x for t in _leaves(v)]
    return []
