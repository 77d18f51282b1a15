"""The step's speed-ups keep the step's meaning: bf16 compute weights with fp32 masters,
activation checkpointing, per-block compile."""
import torch

from ijepa_fast.config import MaskConfig
from ijepa_fast.masks import MultiBlockSampler
from ijepa_fast.model import IJEPA
from ijepa_fast.perf.switches import MasterWeights, compile_blocks, set_activation_checkpointing
from ijepa_fast.training.schedules import Schedules
from ijepa_fast.training.step import make_optimizer, train_step


def _model(**kw):
    torch.manual_seed(0)
    return IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=2, pred_dim=24, embed_dim=48, depth=2,
                       num_heads=3, **kw)


def _batch(model, seed=1, step=3):
    masks = MultiBlockSampler(model.grid, MaskConfig(min_keep=4), seed=seed).sample(4, step)
    return torch.randn(4, 3, 32, 32), masks


def rel_err(a, b) -> float:
    """||a - b|| / ||b||: a relative error that a wrong scale cannot hide (a cosine would)."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _grads(model, images, masks):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model.loss(images, masks)
    return loss, torch.autograd.grad(loss, params)


def test_perf_activation_checkpointing_changes_nothing():
    model = _model().configure_layout("packed", "padded")  # the same attention with and without recompute
    images, masks = _batch(model)
    l0, g0 = _grads(model, images, masks)
    set_activation_checkpointing(model)
    assert all(b.checkpoint for b in model.encoder.blocks)
    assert not any(b.checkpoint for b in model.target_encoder.blocks)
    l1, g1 = _grads(model, images, masks)
    assert torch.equal(l0, l1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    model.configure_layout("packed", "auto")  # on the CPU auto would pick nested: recompute avoids it
    l2, g2 = _grads(model, images, masks)
    torch.testing.assert_close(l2, l0, rtol=1e-6, atol=0)


def test_perf_master_weights_gradients_and_step():
    model = _model()
    images, masks = _batch(model)
    ref = _model()  # the same fp32 model, for comparison
    mw = MasterWeights(model)
    for name, p in mw.compute.named_parameters():  # bf16 weights; the frozen sin-cos tables stay exact
        assert p.dtype == (torch.float32 if name.endswith("pos_embed") else torch.bfloat16), name
    assert torch.equal(mw.compute.encoder.pos_embed, model.encoder.pos_embed)
    # gradients: bf16 forward/backward, copied into fp32 master gradients, agree with fp32 ones
    mw.compute.loss(images.bfloat16(), masks).backward()
    mw.sync_grads()
    ref.loss(images, masks).backward()
    assert all(p.grad is None for p in mw.compute.parameters())
    ours, want = [], []
    for (name, m), r in zip(model.named_parameters(), ref.parameters()):
        if r.grad is None:
            continue
        assert m.grad.dtype == torch.float32
        # measured 0.18-0.69 % per tensor (layer norms in fp32; with bf16 layer norms the predictor's
        # layer-norm biases were 44 % off); a wrong scale or a missing term is far outside
        assert rel_err(m.grad, r.grad) < 0.02, f"{name}: relative error {rel_err(m.grad, r.grad):.3f}"
        ours.append(m.grad.flatten())
        want.append(r.grad.flatten())
    assert rel_err(torch.cat(ours), torch.cat(want)) < 0.01  # measured 0.39 % (bf16 autocast: 0.21 %)
    model.zero_grad(set_to_none=True)
    # a whole step: the optimiser and the EMA act on the fp32 masters, the compute copy follows
    sched = Schedules(steps_per_epoch=10, epochs=1, warmup=0.2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model)
    train_step(model, opt, images, masks, 0, sched, precision="fp32", master=mw)
    m = sched.momentum_at(0)
    for (name, p), c in zip(model.named_parameters(), mw.compute.parameters()):
        assert p.dtype == torch.float32 and torch.equal(c, p.to(c.dtype)), name
        if name.startswith("encoder.blocks"):
            assert not torch.equal(p, before[name]), f"{name} was not updated"
        if name.startswith("target_encoder.") and p.ndim > 1:
            src = dict(model.named_parameters())["encoder." + name[len("target_encoder."):]]
            torch.testing.assert_close(p, m * before[name] + (1 - m) * src)


def test_perf_compiled_blocks_match_eager():
    model = _model(attn="sdpa")
    images, masks = _batch(model)
    l0, g0 = _grads(model, images, masks)
    compile_blocks(model)
    l1, g1 = _grads(model, images, masks)
    images2, masks2 = _batch(model, step=7)  # other lengths: dynamic shapes, no recompile failure
    l2, _ = _grads(model, images2, masks2)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    eager = _model(attn="sdpa")  # the same weights, not compiled
    torch.testing.assert_close(l2, _grads(eager, images2, masks2)[0], rtol=1e-5, atol=1e-6)


def test_perf_trainer_runs_and_checkpoints_fp32_masters(tmp_path):
    from conftest import run_cli

    args = ["train", "--run-dir", tmp_path / "run", "--steps", "3", "run.progress=false", "run.plot=false",
            "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.pred_depth=1", "model.pred_dim=16",
            "data.demo_images=64", "data.batch_size=8", "perf.bf16_weights=true",
            "perf.activation_checkpointing=true"]
    p = run_cli(*args)
    assert "performance switches: bf16_weights, activation_checkpointing" in p.stderr
    assert "contexts of different lengths padded, with key masks (model.layout=auto: packing needs" in p.stderr
    ckpt = torch.load(tmp_path / "run" / "jepa-latest.pth.tar", weights_only=True)
    assert all(v.dtype == torch.float32 for v in ckpt["encoder"].values())
    args[args.index("3")] = "5"
    p = run_cli(*args)  # resumes: the bf16 copy starts from the loaded masters
    assert "at step 3" in p.stderr


def test_perf_lean_step_keeps_targets_and_positional_rows_fp32():
    """bf16 weights: the sin-cos rows are added in fp32 and the sum rounded once to bf16 (not a bf16
    table added in bf16), and the regression targets are fp32, as under the reference's autocast."""
    model = _model()
    images, masks = _batch(model)
    mw = MasterWeights(model)
    enc = mw.compute.encoder
    seen = []
    enc.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    x = images.bfloat16()
    enc(x)
    want = (enc.patch_embed(x).float() + model.encoder.pos_embed).to(torch.bfloat16)
    assert seen[0].dtype == torch.bfloat16 and torch.equal(seen[0], want)
    twice_rounded = enc.patch_embed(x) + model.encoder.pos_embed.to(torch.bfloat16)
    assert not torch.equal(twice_rounded, want)  # the check can tell the two apart
    targets = mw.compute.targets(x, masks)
    assert targets.dtype == torch.float32
    assert rel_err(targets, model.targets(images, masks)) < 0.02  # measured 0.5 %: the bf16 encoder's rounding
