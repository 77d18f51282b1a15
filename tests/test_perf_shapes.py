"""Static shapes with token buckets (no recompiles after warm-up) and selective activation
checkpointing (the same gradients, less memory kept than without, more than full recompute)."""
import pytest
import torch
import torch._dynamo.testing

from ijepa_fast.bench.saved_memory import kept_bytes, per_token_bytes
from ijepa_fast.config import MaskConfig
from ijepa_fast.masks import MultiBlockSampler
from ijepa_fast.model import IJEPA
from ijepa_fast.perf.buckets import shape_key
from ijepa_fast.perf.switches import MasterWeights, compile_blocks, set_activation_checkpointing, warm_up


def _model(depth=2, **kw):
    torch.manual_seed(0)
    model = IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=depth, pred_dim=24, embed_dim=48,
                        depth=depth, num_heads=3, **kw)
    return model.configure_kernels("reference")


def _sampler(seed=1):
    return MultiBlockSampler((8, 8), MaskConfig(min_keep=4), seed=seed)


def _grads(model, images, masks):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model.loss(images, masks)
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_token_buckets_compile_each_shape_once(layout):
    model = _model(depth=1).configure_layout(layout, "padded")
    model.token_buckets = 2
    eager = _model(depth=1).configure_layout(layout, "padded")  # the same weights, no buckets, not compiled
    counter = torch._dynamo.testing.CompileCounter()
    compile_blocks(model, dynamic=False, backend=counter)
    sampler = _sampler()
    images = torch.randn(4, 3, 32, 32)
    shapes = warm_up(model, images, [sampler.sample(4, 1000 + i) for i in range(300)])
    assert shapes >= 2 and counter.frame_count >= shapes  # each shape compiled (encoder, predictor, target)
    assert all(p.grad is None for p in model.parameters())
    before = counter.frame_count
    batches = [sampler.sample(4, i) for i in range(50)]
    for masks in batches:  # forward under autograd, as in training (an eager backward compiles nothing)
        model.loss(images, masks)
    assert counter.frame_count == before, "a batch after warm-up recompiled a block"
    raw = {shape_key(eager.prepare(m)) for m in batches}
    assert len(raw) > len({shape_key(model.prepare(m)) for m in batches})  # unbucketed: more shapes
    l0, g0 = _grads(eager, images, batches[0])
    l1, g1 = _grads(model, images, batches[0])
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_selective_checkpointing_changes_nothing(layout):
    model = _model().configure_layout(layout, "padded")
    images, masks = torch.randn(4, 3, 32, 32), _sampler().sample(4, 3)
    l0, g0 = _grads(model, images, masks)
    set_activation_checkpointing(model, "selective")
    assert all(b.checkpoint == "selective" for b in list(model.encoder.blocks) + list(model.predictor.predictor_blocks))
    assert not any(b.checkpoint for b in model.target_encoder.blocks)
    l1, g1 = _grads(model, images, masks)
    assert torch.equal(l0, l1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    set_activation_checkpointing(model, "selective", selective_blocks="predictor")
    assert all(b.checkpoint == "full" for b in model.encoder.blocks)
    assert all(b.checkpoint == "selective" for b in model.predictor.predictor_blocks)
    l2, g2 = _grads(model, images, masks)
    assert torch.equal(l0, l2) and all(torch.equal(a, b) for a, b in zip(g0, g2))
    set_activation_checkpointing(model, False)
    assert not any(b.checkpoint for b in model.encoder.blocks)
    with pytest.raises(ValueError, match="selective"):
        set_activation_checkpointing(model, "partial")


def test_kept_bytes_none_over_selective_over_full():
    """What a 2-block encoder keeps for backward: all intermediates > matmul and attention outputs
    > only each block's input; one block keeps what a hand count gives (in widths x 4 bytes per token)."""
    model = _model()
    enc = model.encoder
    x = torch.randn(4, 3, 32, 32)
    params = list(model.parameters())
    kept = {}
    for mode in (False, "selective", "full"):
        set_activation_checkpointing(model, mode)
        n, out = kept_bytes(lambda: enc(x), exclude=[x, *params])
        kept[mode] = n
        out.sum().backward()  # what was kept is enough for the backward pass
        model.zero_grad()
    assert kept[False] > kept["selective"] > kept["full"] > 0
    # one block, per token, in widths: none keeps its input's layer norm, qkv (3), attention output,
    # the reshaped copy, the residual, layer norm 2, fc1 (4) and GELU (4): ~16; selective keeps the
    # matmul and attention outputs (qkv 3, attention 1, proj 1, fc1 4, fc2 1) and the output: ~11
    assert per_token_bytes(48, 3, 4.0, False, dtype=torch.float32) / 192 == pytest.approx(16, abs=0.5)
    assert per_token_bytes(48, 3, 4.0, "selective", dtype=torch.float32) / 192 == pytest.approx(11, abs=0.5)
    assert per_token_bytes(48, 3, 4.0, "full", dtype=torch.float32) / 192 == pytest.approx(1, abs=0.01)


def test_selective_checkpointing_with_compile_and_bf16_copy():
    model = _model()
    images, masks = torch.randn(4, 3, 32, 32), _sampler().sample(4, 5)
    l0, g0 = _grads(model, images, masks)
    set_activation_checkpointing(model, "selective")
    compile_blocks(model, backend="eager")
    l1, g1 = _grads(model, images, masks)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch._dynamo.reset()
    plain = MasterWeights(_model()).compute
    lean = MasterWeights(_model()).compute
    set_activation_checkpointing(lean, "selective")
    lb, gb = _grads(plain, images.bfloat16(), masks)
    ls, gs = _grads(lean, images.bfloat16(), masks)
    assert torch.equal(lb, ls) and all(torch.equal(a, b) for a, b in zip(gb, gs))
    assert all(g.dtype == torch.bfloat16 for g, p in zip(gs, lean.parameters()) if p.dtype == torch.bfloat16)


def test_trainer_warm_up_runs_each_bucket_and_changes_nothing(tiny_cfg, tmp_path):
    """The engine's warm-up before training (token buckets with compile), which the trainer runs,
    makes one pass per distinct bucket among the coming steps' masks and leaves weights, gradients
    and random state alone."""
    import dataclasses

    from ijepa_fast.perf.buckets import shape_key
    from ijepa_fast.training.trainer import Trainer

    cfg = dataclasses.replace(tiny_cfg)
    cfg.perf.token_buckets = 4
    cfg.run.dir = str(tmp_path / "run")
    trainer = Trainer(cfg)
    engine = trainer.engine
    assert not engine.perf.compile and engine.warm_up(cfg.data.batch_size) == 0  # compile off (CPU): nothing to do
    before = {n: p.detach().clone() for n, p in trainer.model.state_dict().items()}
    rng = torch.get_rng_state()
    b = cfg.data.batch_size
    want = {shape_key(trainer.run_model.prepare(trainer.sampler.sample(b, s))) for s in range(32)}
    assert engine.warm_up(b, steps=32, force=True) == len(want) >= 1
    # with micro-batches: the shapes of the slices the step runs (each keeps its batch's padded length)
    engine.accum_steps = 2
    want = {shape_key(trainer.run_model.prepare(trainer.sampler.sample(b, s).slice(i, i + b // 2)))
            for s in range(32) for i in (0, b // 2)}
    assert engine.warm_up(b, steps=32, force=True) == len(want)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in trainer.run_model.parameters())
    for n, p in trainer.model.state_dict().items():
        assert torch.equal(p, before[n]), n
