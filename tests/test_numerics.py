"""Numerics of the step on the paths users run at scale: gradient accumulation, bf16 compute weights,
non-finite gradients, and what the masks depend on. Errors are relative, ||a - b|| / ||b||, so a
wrong scale cannot hide; each bound is stated beside the value measured on the CPU machine
(docs/numerics.md collects them)."""
import dataclasses

import pytest
import torch

from ijepa_fast.config import MaskConfig
from ijepa_fast.masks import MultiBlockSampler
from ijepa_fast.model import IJEPA
from ijepa_fast.perf.switches import MasterWeights
from ijepa_fast.training.schedules import Schedules
from ijepa_fast.training.step import make_optimizer, train_step

SCHED = Schedules(steps_per_epoch=10, epochs=2, warmup=1, start_lr=1e-4, lr=1e-3, final_lr=1e-6)


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def model_and_batch(batch=16, seed=0):
    torch.manual_seed(seed)
    model = IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=2, pred_dim=24, embed_dim=48, depth=2,
                        num_heads=3, attn="math")
    masks = MultiBlockSampler(model.grid, MaskConfig(min_keep=4), seed=5).sample(batch, 3)
    assert masks.context_lens is not None  # padded: the micro-batches differ in context length too
    return model, torch.randn(batch, 3, 32, 32), masks


def step_grads(model, images, masks, **kw) -> tuple[torch.Tensor, float]:
    """The fp32 gradients the optimiser receives in one train_step (flattened), and the loss."""
    opt = make_optimizer(model)
    seen = []
    real = opt.step

    def record(*a, **k):
        seen.append(torch.cat([p.grad.flatten() for g in opt.param_groups for p in g["params"] if p.requires_grad]))
        return real(*a, **k)

    opt.step = record
    res = train_step(model, opt, images, masks, 0, SCHED, precision="fp32", **kw)
    return seen[0], res.loss


def test_numerics_accumulation_fp32_equals_the_full_batch():
    model, images, masks = model_and_batch()
    full, loss_full = step_grads(model, images, masks)
    model2, _, _ = model_and_batch()
    acc, loss_acc = step_grads(model2, images, masks, accum_steps=4)
    assert rel_err(acc, full) < 1e-5  # measured 1.4e-7
    assert loss_acc == pytest.approx(loss_full, rel=1e-6)


def test_numerics_accumulation_with_bf16_weights_sums_in_fp32():
    """bf16 compute weights, 16 micro-batches: the fp32 master gradients are as close to the fp32
    full-batch gradient as one bf16 pass is (each micro-batch's bf16 gradient is added in fp32), and
    closer than a bf16 running sum of the same micro-batch gradients."""
    model, images, masks = model_and_batch()
    exact, _ = step_grads(model, images, masks)
    errs = {}
    for k in (1, 16):
        m, _, _ = model_and_batch()
        got, _ = step_grads(m, images, masks, master=MasterWeights(m), accum_steps=k)
        errs[k] = rel_err(got, exact)
    assert errs[1] < 0.01 and errs[16] < 0.01  # measured 0.39 % and 0.33 %
    assert errs[16] < 1.25 * errs[1]
    # the same micro-batch gradients summed in bf16 (what accumulating on the bf16 copy did)
    m, _, _ = model_and_batch()
    mw = MasterWeights(m)
    for i in range(16):
        (mw.compute.loss(images[i:i + 1].bfloat16(), masks.slice(i, i + 1)) / 16).backward()
    bf16_sum = torch.cat([c.grad.flatten().float() for _, c in mw._train])
    ref, _, _ = model_and_batch()
    ref.loss(images, masks).backward()
    exact_model_order = torch.cat([master.grad.flatten() for master, _ in MasterWeights(ref)._train])
    assert rel_err(bf16_sum, exact_model_order) > 1.2 * errs[16]  # measured 0.50 % against 0.33 %


@pytest.mark.parametrize("bad", ["inf", "nan"])
def test_numerics_nonfinite_gradient_with_a_finite_loss_stops_before_any_update(bad):
    model, images, masks = model_and_batch(batch=4)
    opt = make_optimizer(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    param = model.predictor.predictor_blocks[0].mlp.fc1.weight
    param.register_hook(lambda g: g * float(bad))
    with pytest.raises(FloatingPointError, match="a gradient is not finite at step 0 \\(loss 0\\.[0-9]"):
        train_step(model, opt, images, masks, 0, SCHED, precision="fp32")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # weights and EMA target
    assert not opt.state and all(p.grad is None for p in model.parameters())


def test_numerics_train_step_reports_the_gradient_norm():
    model, images, masks = model_and_batch(batch=4)
    grads, _ = step_grads(model, images, masks)
    model2, _, _ = model_and_batch(batch=4)
    res = train_step(model2, make_optimizer(model2), images, masks, 0, SCHED, precision="fp32")
    assert res.grad_norm == pytest.approx(float(grads.norm()), rel=1e-5)


def test_numerics_reference_masks_depend_on_the_process_count_only_through_truncation():
    """mask.mode=reference truncates contexts to the per-process batch minimum, as the released code
    does: on 2 processes an image keeps at least the context it keeps on one, and the one-process
    context is a prefix of it; targets never change. mask.mode=default does not depend on it at all."""
    cfg = MaskConfig(mode="reference")
    for step in range(10):
        one = MultiBlockSampler((14, 14), cfg, seed=3).sample(8, step)
        ranks = [MultiBlockSampler((14, 14), cfg, seed=3, rank=r, world=2).sample(4, step) for r in range(2)]
        lengths = [r.context.shape[-1] for r in ranks]
        assert one.context.shape[-1] == min(lengths)
        for g in range(8):
            part, b = ranks[g % 2], g // 2
            assert torch.equal(one.targets[:, g], part.targets[:, b])
            assert torch.equal(one.context[:, g], part.context[:, b, : one.context.shape[-1]])
    changed = sum(MultiBlockSampler((14, 14), cfg, seed=3).sample(8, s).context.shape[-1]
                  != max(MultiBlockSampler((14, 14), cfg, seed=3, rank=r, world=2).sample(4, s).context.shape[-1]
                         for r in range(2)) for s in range(10))
    assert changed > 0  # the truncation length does depend on the process count
    default = dataclasses.replace(cfg, mode="default")
    one = MultiBlockSampler((14, 14), default, seed=3).sample(8, 4)
    two = [MultiBlockSampler((14, 14), default, seed=3, rank=r, world=2).sample(4, 4) for r in range(2)]
    for g in range(8):
        part, b = two[g % 2], g // 2
        n = int(one.context_lens[0, g]) if one.context_lens is not None else one.context.shape[-1]
        assert torch.equal(one.context[0, g, :n], part.context[0, b, :n]) and torch.equal(one.targets[:, g],
                                                                                        part.targets[:, b])
