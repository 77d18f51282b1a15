"""FP8 linear layers (``perf.fp8``): the config key, the device gate, and, in torchao's emulation
on the CPU, the loss and gradients against the fp32 step, the weights of record and the
checkpoint format."""
import pytest
import torch

from ijepa_fast.checkpoint.format import load_training_checkpoint, save_atomic, training_checkpoint
from ijepa_fast.config import MaskConfig, PerfConfig, load_config
from ijepa_fast.errors import ConfigError
from ijepa_fast.masks import MultiBlockSampler
from ijepa_fast.model import IJEPA
from ijepa_fast.perf import fp8
from ijepa_fast.perf.switches import apply
from ijepa_fast.training.schedules import Schedules
from ijepa_fast.training.step import make_optimizer, train_step

CPU = torch.device("cpu")


def _model():
    torch.manual_seed(0)  # widths multiples of 16: every encoder linear layer is FP8-eligible
    return IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=2, pred_dim=24, embed_dim=48, depth=2,
                       num_heads=3)


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _cat(grads: dict, prefix: str) -> torch.Tensor:
    return torch.cat([g.flatten() for n, g in grads.items() if n.startswith(prefix)])


def test_fp8_config_key():
    assert load_config(None, []).perf.fp8 == "auto"  # resolved to off (perf.resolve)
    assert load_config(None, ["perf.fp8=true"]).perf.fp8 == "rowwise"  # true means rowwise
    assert load_config(None, ["perf.fp8=tensorwise"]).perf.fp8 == "tensorwise"
    assert load_config(None, ["perf.fp8=false"]).perf.fp8 == "false"
    assert fp8.recipe(load_config(None, ["perf.fp8=off"]).perf.fp8) is None
    assert [fp8.recipe(v) for v in (True, False, "rowwise", "false")] == ["rowwise", None, "rowwise", None]
    with pytest.raises(ConfigError, match="perf.fp8"):
        load_config(None, ["perf.fp8=e5m2"])
    with pytest.raises(ConfigError, match="perf.fp8.*fsdp"):
        load_config(None, ["perf.fp8=rowwise", "dist.strategy=fsdp"])


def test_fp8_needs_a_recent_gpu_unless_emulated(monkeypatch):
    model = _model()
    with pytest.raises(ConfigError, match=r"perf\.fp8.*compute capability >= 8\.9.*this run is on cpu"):
        apply(model, PerfConfig(fp8="rowwise"), CPU)
    assert not any(type(m).__name__ == "Float8Linear" for m in model.modules())  # refused before any change
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "A100")
    with pytest.raises(ConfigError, match="A100 has 8.0"):
        fp8.check_device(torch.device("cuda"), emulate=False)
    fp8.check_device(torch.device("cuda"), emulate=True)
    for cap in ((8, 9), (9, 0), (10, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        fp8.check_device(torch.device("cuda"), emulate=False)


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
@pytest.mark.parametrize("bf16_weights", [False, True])
def test_fp8_emulated_loss_and_gradients(recipe, bf16_weights):
    pytest.importorskip("torchao.float8")
    ref = _model()
    images = torch.randn(4, 3, 32, 32)
    masks = MultiBlockSampler(ref.grid, MaskConfig(min_keep=4), seed=1).sample(4, 3)
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    loss0 = ref.loss(images, masks)
    want = dict(zip(names, torch.autograd.grad(loss0, [p for p in ref.parameters() if p.requires_grad])))

    model = _model()
    run, master = apply(model, PerfConfig(fp8=recipe, fp8_emulate=True, bf16_weights=bf16_weights), CPU)
    kinds = {n: type(m).__name__ for n, m in run.named_modules() if isinstance(m, torch.nn.Linear)}
    for n, kind in kinds.items():  # every encoder and target-encoder linear layer, no predictor one
        assert kind == ("Linear" if n.startswith("predictor.") else "Float8Linear"), n
    assert sum(k == "Float8Linear" for k in kinds.values()) == 2 * 2 * 4
    # the weights of record: the fp32 model's own parameters, plain modules behind the bf16 copy
    assert all(p.dtype == torch.float32 for p in model.parameters())
    if bf16_weights:
        assert run is master.compute and not any(type(m).__name__ == "Float8Linear" for m in model.modules())
    loss = run.loss(images.bfloat16() if bf16_weights else images, masks)
    loss.backward()
    if master is not None:
        master.sync_grads()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g.dtype == torch.float32 for g in got.values())
    # Measured on 6 seeds (rowwise / tensorwise, fp32 or bf16 weights): loss 0.00-0.023 %; all
    # encoder gradients 1.8-2.3 % (bf16 weights without FP8: 0.45-0.48 %, fp32: ~1e-7); the worst
    # encoder linear weight 3.0-4.9 %; the predictor's 0.22-0.46 %. Bounds: twice the worst or more,
    # and a floor that fails if the FP8 casts did not happen.
    assert _rel(loss.detach().float(), loss0.detach()) < 2e-3
    enc = _rel(_cat(got, "encoder."), _cat(want, "encoder."))
    assert 0.01 < enc < 0.05, f"encoder gradients: relative error {enc:.4f}"
    worst = max(_rel(got[n], want[n]) for n in names if n.startswith("encoder.") and n.endswith(".weight")
                and any(k in n for k in ("qkv", "proj", "fc")))
    assert worst < 0.1, f"worst encoder linear weight gradient: relative error {worst:.4f}"
    assert _rel(_cat(got, "predictor."), _cat(want, "predictor.")) < 0.02


def test_fp8_step_and_checkpoint_format(tmp_path):
    pytest.importorskip("torchao.float8")
    plain = _model()
    model = _model()
    opt = make_optimizer(model)
    run, master = apply(model, PerfConfig(fp8="rowwise", fp8_emulate=True), CPU)  # in place: no bf16 copy
    assert run is model and master is None
    images = torch.randn(4, 3, 32, 32)
    masks = MultiBlockSampler(model.grid, MaskConfig(min_keep=4), seed=2).sample(4, 0)
    before = [p.detach().clone() for p in model.parameters()]
    res = train_step(model, opt, images, masks, 0, Schedules(steps_per_epoch=10, epochs=1), precision="fp32")
    assert torch.isfinite(torch.tensor(res.loss))
    # the optimiser moved the same fp32 parameters the FP8 layers read
    changed = [not torch.equal(a, p) for a, p in zip(before, model.parameters()) if p.requires_grad]
    assert any(changed) and all(p.dtype == torch.float32 for p in model.parameters())
    state = training_checkpoint(model, opt, epoch=0, loss=res.loss, batch_size=4, world_size=1, lr=1e-3, extra={})
    ref_state = training_checkpoint(plain, make_optimizer(plain), epoch=0, loss=0.0, batch_size=4, world_size=1,
                                    lr=1e-3, extra={})
    for part in ("encoder", "predictor", "target_encoder"):
        assert list(state[part]) == list(ref_state[part])
        for k, v in state[part].items():
            want = ref_state[part][k]
            assert type(v) is torch.Tensor and v.dtype == want.dtype and v.shape == want.shape, k
    save_atomic(state, tmp_path / "fp8.pth.tar")
    load_training_checkpoint(tmp_path / "fp8.pth.tar", plain, make_optimizer(plain))  # strict, into a plain model
    for (n, a), b in zip(plain.named_parameters(), model.parameters()):
        assert torch.equal(a, b), n


def test_fp8_without_torchao_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # import fails as if torchao were absent
    with pytest.raises(ConfigError, match=r"perf\.fp8 needs torchao.*ijepa-fast\[fp8\]"):
        apply(_model(), PerfConfig(fp8="rowwise", fp8_emulate=True), CPU)


def _odd_batch(model, batch=3):
    """A batch whose context token count (the inner dimension of the weight-gradient matmuls) is not
    a multiple of 16."""
    for seed in range(50):
        masks = MultiBlockSampler(model.grid, MaskConfig(min_keep=4), seed=seed).sample(batch, 0)
        if (batch * masks.context.shape[2]) % 16:
            return torch.randn(batch, 3, 32, 32), masks
    raise AssertionError("no mask batch with a token count off the multiples of 16")


def test_fp8_pads_token_counts_off_the_multiples_of_16(monkeypatch):
    """torch._scaled_mm needs inner dimensions that are multiples of 16; the weight gradient's is the
    token count. Every FP8 layer pads it (torchao's pad_inner_dim): in emulation the padding runs
    (seen through torchao's pad function) and the loss and gradients stay those of the fp32 step."""
    pytest.importorskip("torchao.float8")
    import torchao.float8.float8_ops as ops

    ref = _model()
    images, masks = _odd_batch(ref)
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    loss0 = ref.loss(images, masks)
    want = dict(zip(names, torch.autograd.grad(loss0, [p for p in ref.parameters() if p.requires_grad])))
    model = _model()
    run, _ = apply(model, PerfConfig(fp8="rowwise", fp8_emulate=True), CPU)
    layers = [m for m in run.modules() if type(m).__name__ == "Float8Linear"]
    assert layers and all(m.config.pad_inner_dim for m in layers)
    padded = []
    real = ops.pad_tensor_for_matmul

    def spy(tensor, dims):
        out = real(tensor, dims)
        padded.append((tensor.shape[dims], out.shape[dims]))
        return out

    monkeypatch.setattr(ops, "pad_tensor_for_matmul", spy)
    loss = run.loss(images, masks)
    loss.backward()
    odd = [(a, b) for a, b in padded if a % 16]
    assert odd, f"no inner dimension off the multiples of 16 was padded: {sorted(set(padded))}"
    assert all(b % 16 == 0 and 0 <= b - a < 16 for a, b in padded)
    assert _rel(loss.detach(), loss0.detach()) < 2e-3  # bounds of test_fp8_emulated_loss_and_gradients
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert 0.01 < _rel(_cat(got, "encoder."), _cat(want, "encoder.")) < 0.05


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < fp8.MIN_CAPABILITY,
                    reason="real FP8 matmuls need a CUDA GPU of compute capability >= 8.9")
def test_fp8_on_the_gpu_at_a_token_count_off_the_multiples_of_16():
    pytest.importorskip("torchao.float8")
    cuda = torch.device("cuda")
    ref, model = _model().to(cuda), _model().to(cuda)
    images, masks = _odd_batch(ref)
    images, masks = images.to(cuda), masks.to(cuda)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss0 = ref.loss(images, masks)
    run, _ = apply(model, PerfConfig(fp8="rowwise"), cuda)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = run.loss(images, masks)
    loss.backward()
    assert torch.isfinite(loss) and _rel(loss.detach().float(), loss0.detach().float()) < 2e-2
    grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
