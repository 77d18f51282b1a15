import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ijepa_fast.config import MaskConfig
from ijepa_fast.masks import MaskBatch, MultiBlockSampler
from ijepa_fast.model import IJEPA, jepa_loss
from ijepa_fast.models.pos_embed import interpolate_pos_embed
from ijepa_fast.training.schedules import Schedules
from ijepa_fast.training.step import make_optimizer, param_groups, train_step


def small_model(attn="sdpa", **kw):
    return IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=2, pred_dim=24, embed_dim=48, depth=2,
                       num_heads=3, attn=attn, **kw)


def test_step_padded_batch_equals_each_image_alone():
    """Default-mode masks: a padded batch gives exactly the per-image results (loss and gradients)."""
    torch.manual_seed(0)
    model = small_model(attn="math")
    sampler = MultiBlockSampler(model.grid, MaskConfig(min_keep=4), seed=3)
    masks = next(m for m in (sampler.sample(4, s) for s in range(50)) if m.context_lens is not None)
    assert masks.context_lens.min() < masks.context_lens.max()
    images = torch.randn(4, 3, 32, 32)
    loss, out = model.loss(images, masks, return_outputs=True)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    # each image alone, unpadded, weighted by its share of the target tokens
    total = 0.0
    for b in range(4):
        n = int(masks.context_lens[0, b])
        one = MaskBatch(masks.context[:, b:b + 1, :n], masks.targets[:, b:b + 1])
        lb = model.loss(images[b:b + 1], one)
        total = total + lb / 4  # every image has the same number of target tokens
    assert torch.allclose(loss, total, rtol=1e-6, atol=0)
    grads_ref = torch.autograd.grad(total, params)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-8)


def test_step_loss_matches_functional_losses():
    pred, tgt = torch.randn(6, 5, 8), torch.randn(6, 5, 8)
    assert torch.allclose(jepa_loss(pred, tgt, "smooth_l1"), F.smooth_l1_loss(pred, tgt))
    assert torch.allclose(jepa_loss(pred, tgt, "mse"), F.mse_loss(pred, tgt))
    valid = torch.ones(6, 5, dtype=torch.bool)
    valid[2, 3:] = False
    expected = F.mse_loss(pred[valid], tgt[valid])
    assert torch.allclose(jepa_loss(pred, tgt, "mse", valid), expected)
    with pytest.raises(ValueError, match="unknown loss"):
        jepa_loss(pred, tgt, "l3")


def test_step_param_groups_reference_layout():
    model = small_model()
    groups = param_groups(model)
    assert [g.get("WD_exclude", False) for g in groups] == [False, False, True, True]
    enc_decay = {id(p) for p in groups[0]["params"]}
    assert id(model.encoder.blocks[0].attn.qkv.weight) in enc_decay
    assert id(model.encoder.pos_embed) in enc_decay  # as the reference (frozen, never stepped)
    no_decay = {id(p) for p in groups[2]["params"]}
    assert id(model.encoder.blocks[0].norm1.weight) in no_decay
    assert id(model.encoder.blocks[0].attn.qkv.bias) in no_decay
    assert id(model.predictor.mask_token) in {id(p) for p in groups[1]["params"]}
    n_all = sum(1 for _ in model.encoder.parameters()) + sum(1 for _ in model.predictor.parameters())
    assert sum(len(g["params"]) for g in groups) == n_all


def test_step_update_target_is_the_ema_formula():
    model = small_model()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.target_encoder.parameters()]
    src = [p.clone() for p in model.encoder.parameters()]
    model.update_target(0.9)
    for t0, s, t1 in zip(before, src, model.target_encoder.parameters()):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s, rtol=1e-6, atol=1e-7)


def _sched():
    return Schedules(steps_per_epoch=10, epochs=2, warmup=1, start_lr=1e-4, lr=1e-3, final_lr=1e-6)


def test_step_train_step_updates_models_and_applies_schedules():
    model = small_model()
    opt = make_optimizer(model)
    sampler = MultiBlockSampler(model.grid, MaskConfig(min_keep=4))
    images = torch.randn(4, 3, 32, 32)
    enc0 = model.encoder.blocks[0].attn.qkv.weight.clone()
    tgt0 = model.target_encoder.blocks[0].attn.qkv.weight.clone()
    res = train_step(model, opt, images, sampler(4), 3, _sched(), precision="fp32", grad_clip=1.0)
    assert res.lr == pytest.approx(_sched().lr_at(3)) and opt.param_groups[0]["lr"] == res.lr
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(_sched().wd_at(3))
    assert opt.param_groups[2]["weight_decay"] == 0.0
    assert res.grad_norm is not None and res.grad_norm > 0
    enc1 = model.encoder.blocks[0].attn.qkv.weight
    assert not torch.equal(enc0, enc1)
    m = _sched().momentum_at(3)
    torch.testing.assert_close(model.target_encoder.blocks[0].attn.qkv.weight, m * tgt0 + (1 - m) * enc1)


def test_step_nonfinite_loss_raises_and_changes_nothing():
    model = small_model()
    opt = make_optimizer(model)
    masks = MultiBlockSampler(model.grid, MaskConfig(min_keep=4))(2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, 32, 32)
    images[0, 0, 0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="loss is nan at step 5"):
        train_step(model, opt, images, masks, 5, _sched(), precision="fp32")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not opt.state


def test_step_api_reference_list_masks_round_trip():
    cfg = SimpleNamespace(**{**MaskConfig().__dict__, "mode": "reference", "min_keep": 4})
    masks = MultiBlockSampler((8, 8), cfg)(3)
    enc, pred = masks.to_lists()
    assert len(enc) == 1 and len(pred) == 4 and enc[0].shape[0] == 3
    again = MaskBatch.from_lists(enc, pred)
    assert torch.equal(again.context, masks.context) and torch.equal(again.targets, masks.targets)


def test_step_bf16_autocast_keeps_fp32_targets_and_loss():
    """Under bf16 autocast the targets stay fp32 and the loss is computed in fp32 (as the reference)."""
    model = small_model()
    masks = MultiBlockSampler(model.grid, MaskConfig(min_keep=4))(2)
    images = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, out = model.loss(images, masks, return_outputs=True)
    assert out["pred"].dtype == torch.bfloat16 and out["target"].dtype == torch.float32
    expected = F.smooth_l1_loss(out["pred"].float(), out["target"])
    assert loss.dtype == torch.float32 and torch.allclose(loss, expected, rtol=1e-6)


def test_step_other_resolution_uses_the_predictor_table_of_that_grid():
    model = small_model(attn="math")  # native 8x8 grid
    masks = MultiBlockSampler((12, 12), MaskConfig(min_keep=4))(2)
    images = torch.randn(2, 3, 48, 48)
    loss = model.loss(images, masks)
    assert int(masks.targets.max()) >= 64  # indices only the 12x12 table has
    # the same weights with both tables interpolated to 12x12 by hand, as the model must do
    big = small_model(attn="math")
    state = model.state_dict()
    for key in ("encoder.pos_embed", "target_encoder.pos_embed", "predictor.predictor_pos_embed"):
        state[key] = interpolate_pos_embed(state[key], (8, 8), (12, 12))
    big.encoder.grid = big.target_encoder.grid = big.predictor.grid = (12, 12)
    for part, key in (("encoder", "pos_embed"), ("target_encoder", "pos_embed"), ("predictor", "predictor_pos_embed")):
        setattr(getattr(big, part), key, torch.nn.Parameter(state[f"{part}.{key}"], requires_grad=False))
    big.load_state_dict(state)
    torch.testing.assert_close(loss, big.loss(images, masks), rtol=1e-6, atol=0)


def test_step_init_std_reaches_every_module():
    m = IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=1, pred_dim=48, embed_dim=96, depth=1,
                    num_heads=3, init_std=0.1)
    for w in (m.encoder.blocks[0].attn.qkv.weight, m.predictor.predictor_blocks[0].mlp.fc1.weight,
              m.predictor.predictor_embed.weight, m.encoder.patch_embed.proj.weight):
        assert w.std().item() == pytest.approx(0.1, rel=0.1)


def test_step_old_call_forms_still_work_with_a_deprecation_warning():
    """The Python API kept its names: positional options and the old import place of the loss still
    work, each with a DeprecationWarning that says what to write instead."""
    import ijepa_fast
    import ijepa_fast.training.step

    with pytest.warns(DeprecationWarning, match="img_size=.*by keyword"):
        old = IJEPA.build("custom", 32, 4, 1, 24, embed_dim=48, depth=1, num_heads=3)
    assert old.grid == (8, 8) and len(old.predictor.predictor_blocks) == 1
    with pytest.warns(DeprecationWarning, match="lr=.*by keyword"):
        opt = make_optimizer(old, 5e-4)
    assert opt.param_groups[0]["lr"] == 5e-4
    sampler = MultiBlockSampler(old.grid, MaskConfig(min_keep=4), seed=0)
    with pytest.warns(DeprecationWarning, match="precision=.*by keyword"):
        res = train_step(old, opt, torch.randn(2, 3, 32, 32), sampler(2), 0, _sched(), "fp32", 1.0)
    assert math.isfinite(res.loss) and res.grad_norm is not None  # grad_clip=1.0 reached its parameter
    with pytest.raises(TypeError, match="multiple values"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        train_step(old, opt, torch.randn(2, 3, 32, 32), sampler(2), 1, _sched(), "fp32", precision="fp32")
    with pytest.warns(DeprecationWarning, match="moved to ijepa_fast.model"):
        assert ijepa_fast.training.step.jepa_loss is ijepa_fast.jepa_loss
    assert ijepa_fast.IJEPA is IJEPA and ijepa_fast.train_step is train_step
