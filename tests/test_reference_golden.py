"""The golden files: the reference implementation's own steps, reproduced by the engine.

Every pair found in tests/golden (or in $IJEPA_REFERENCE_DIR when set) is checked, and finding none is a
failure, not a skip. tests/golden holds pairs at several model sizes, recorded with the released code by
tests/golden/make_goldens.py:

- ``ref_step_<name>.pt`` with ``ref_ckpt_<name>.pth.tar``: one fp32 step. The models are built
  from the published-layout checkpoint alone, then encoder outputs, predictor outputs, both
  losses, every gradient and the state after one AdamW + EMA step must agree (criterion below).
- ``ref_traj_<name>.pt`` with ``ref_traj_ckpt_<name>.pth.tar``: several fp32 steps of the
  reference's training script (its schedules, four AdamW groups and EMA). ``train_step`` must
  reproduce each step's learning rate, weight decay, momentum and loss and the final state, from
  the start and again after resuming from the reference's own mid-run checkpoint (optimiser state
  included).

The criterion, per tensor t with reference r and ours o (``max`` over the tensor's elements):

    max|o - r| <= TOL * max|r|                              outputs, losses, gradients
    max|o - r| <= TOL * max|r| + TOL_UPDATE * max|r - r0|   a state after steps from r0

fp32 sums of a few thousand terms carry relative rounding of about 1e-6 of the tensor's scale, so
TOL = 1e-5 of the tensor's own largest entry covers outputs and gradients at any size (measured: at
most 1e-6 on the pairs in tests/golden). A state after AdamW steps carries a second error that
does not scale with the weight but with its update: Adam divides each gradient by its own
magnitude, so where a gradient is rounding noise (the key bias's, small biases) fp32 differences
in that gradient become differences of a fraction of that element's update. Biases start at zero,
so after a step their whole value is update and a bound of 1e-5 of the value fails at other sizes
while the engine is right. TOL_UPDATE = 2e-4 of the tensor's largest update covers it (measured:
at most 2.5e-4 of the update on a weight whose own scale term covers the rest, at most 1.4e-5 on
a bias). Both bounds stay five times or more below a 0.1 % change of any single tensor, which
``test_reference_golden_check_rejects_a_tenth_of_a_percent`` makes on every tensor of every pair.

The state after a step is checked two ways. Applying our optimiser and EMA to the reference's
gradients checks the update rule (groups, weight decay, momentum) on any attention path. Applying
them to our own gradients checks the whole step end to end; that is done on the plain path
(``attn="math"``, the reference's arithmetic), because a fused attention kernel's summation order
changes noise-level gradients (the key bias's) by their own size, which AdamW's first step turns
into changes of up to the learning rate.
"""
import pytest
import torch
from conftest import reference_dir

from ijepa_fast.checkpoint.format import add_prefix, load_training_checkpoint, models_from_checkpoint, read_checkpoint
from ijepa_fast.masks import MaskBatch
from ijepa_fast.model import IJEPA, jepa_loss
from ijepa_fast.training.schedules import Schedules
from ijepa_fast.training.step import make_optimizer, train_step

TOL = 1e-5  # of a tensor's largest entry: fp32 rounding of outputs, gradients and weights
TOL_UPDATE = 2e-4  # of a state's largest update: AdamW's normalisation of noise-level gradients
PARTS = ("encoder", "predictor", "target_encoder")


def _pairs(prefix: str, companion: str) -> list:
    """(golden file, companion checkpoint) for every ``<prefix><name>.pt`` in the reference folder."""
    d = reference_dir()
    out = []
    for gold_file in sorted(d.glob(f"{prefix}*.pt")):
        name = gold_file.name[len(prefix):-len(".pt")]
        out.append(pytest.param(gold_file, d / f"{companion}{name}.pth.tar", id=name))
    return out


PAIRS = _pairs("ref_step_", "ref_ckpt_")
TRAJ_PAIRS = _pairs("ref_traj_", "ref_traj_ckpt_")


def test_reference_files_present():
    """No golden file is a failure: the suite must never pass without comparing against the reference."""
    assert PAIRS, f"no ref_step_<name>.pt files in {reference_dir()} (set IJEPA_REFERENCE_DIR)"
    assert TRAJ_PAIRS, f"no ref_traj_<name>.pt files in {reference_dir()} (set IJEPA_REFERENCE_DIR)"
    for p in PAIRS + TRAJ_PAIRS:
        assert p.values[1].exists(), f"{p.values[0].name} has no matching {p.values[1].name}"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs expected {tuple(b.shape)}"
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def excess(ours: torch.Tensor, ref: torch.Tensor, start: torch.Tensor | None = None) -> float:
    """max|ours - ref| over its bound (see the module docstring): above 1 fails. ``start``: the
    value before the steps, for a state after steps."""
    a, b = ours.detach().double().cpu(), ref.detach().double().cpu()
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs expected {tuple(b.shape)}"
    bound = TOL * b.abs().max()
    if start is not None:
        bound = bound + TOL_UPDATE * (b - start.detach().double().cpu()).abs().max()
    return float((a - b).abs().max() / bound.clamp_min(1e-30))


def run_golden_step(step_file, ckpt_file, attn="sdpa", kernels="reference", layout="auto", device="cpu"):
    """Everything the engine computes for the golden step, keyed like the golden file.

    The state after our own update is checked only on the reference's arithmetic (math attention,
    reference ops, the dense layout, CPU): on a GPU (TF32 off), with the Triton kernels or through the
    packed layout, AdamW's first step turns another summation order (the kernels' atomic scatter and
    partial sums, the packed sequences' own matmul shapes) into differences above the tolerance
    (see the module docstring); the update rule is still checked from the
    reference's gradients, and outputs and every gradient are checked on every path."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return _golden_step(step_file, ckpt_file, attn, kernels, layout, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _golden_step(step_file, ckpt_file, attn, kernels, layout, device):
    gold = torch.load(step_file, weights_only=False)
    cfg = gold["config"]
    enc, pred, tgt = models_from_checkpoint(read_checkpoint(ckpt_file), num_heads=cfg["num_heads"],
                                            pred_heads=cfg["pred_num_heads"], norm_eps=cfg["norm_eps"],
                                            attn_impl=attn)
    model = IJEPA(enc, pred, tgt).to(device).configure_kernels(kernels).configure_layout(layout)
    masks = MaskBatch.from_lists(gold["masks_enc"], gold["masks_pred"]).to(device)
    images = gold["images"].to(device)
    out = {"state_loaded": {n: {k: v.clone() for k, v in getattr(model, n).state_dict().items()}
                            for n in ("encoder", "predictor", "target_encoder")}}
    with torch.no_grad():
        out["target_encoder_out"] = model.target_encoder(images)
        if layout == "packed":
            from ijepa_fast.perf.packing import pack

            p = pack(masks)
            z = model.encoder.forward_packed(images, p.ctx_idx, p.ctx_meta)
            out["context_encoder_out"] = z.reshape(masks.context.shape[0] * masks.batch_size, -1, z.shape[-1])
        else:
            out["context_encoder_out"] = model.encoder(images, masks.context)
    loss, parts = model.loss(images, masks, return_outputs=True)
    out["predictor_out"] = parts["pred"]
    out["loss_smooth_l1"] = jepa_loss(parts["pred"], parts["target"], "smooth_l1", backend=kernels)
    out["loss_mse"] = jepa_loss(parts["pred"], parts["target"], "mse", backend=kernels)
    loss.backward()
    out["grads"] = {n: {k: p.grad.clone() for k, p in getattr(model, n).named_parameters() if p.grad is not None}
                    for n in ("encoder", "predictor")}
    if attn == "math" and kernels == "reference" and device == "cpu" and layout != "packed":  # end to end
        out["state_after"] = apply_update(model, gold["step"])
    # the update rule, from the reference's gradients and the loaded start state
    enc2, pred2, tgt2 = models_from_checkpoint(read_checkpoint(ckpt_file), num_heads=cfg["num_heads"],
                                               pred_heads=cfg["pred_num_heads"], norm_eps=cfg["norm_eps"])
    model2 = IJEPA(enc2, pred2, tgt2).to(device).configure_kernels(kernels)
    for part, grads in gold["grads"].items():
        for k, p in getattr(model2, part).named_parameters():
            if k in grads:
                p.grad = grads[k].clone().to(device)
    out["state_after_from_reference_grads"] = apply_update(model2, gold["step"])
    return gold, out


def apply_update(model, step: dict) -> dict:
    """One AdamW step with the golden settings, then the EMA update; the resulting state."""
    opt = make_optimizer(model, lr=step["lr"], weight_decay=step["weight_decay"])
    opt.step()
    model.update_target(step["ema_momentum"])
    return {n: getattr(model, n).state_dict() for n in ("encoder", "predictor", "target_encoder")}


def compare(gold, out) -> list[str]:
    """Every check of the golden step; returns the failures (empty when the step matches)."""
    bad = []

    def check(what, a, b, start=None):
        err = excess(a, b, start)
        if not err <= 1:
            bad.append(f"{what}: {err:.2f} times its bound (relative error {rel_err(a, b):.2e})")

    for part, state in gold["state_before"].items():
        for k, v in state.items():
            check(f"checkpoint {part}.{k} vs state_before", out["state_loaded"][part][k], v)
    for key in ("target_encoder_out", "context_encoder_out", "predictor_out", "loss_smooth_l1", "loss_mse"):
        check(key, out[key], gold[key])
    for part, grads in gold["grads"].items():
        if set(grads) != set(out["grads"][part]):
            bad.append(f"{part}: gradient keys differ: {sorted(set(grads) ^ set(out['grads'][part]))}")
        for k, g in grads.items():
            if k in out["grads"][part]:
                check(f"grad {part}.{k}", out["grads"][part][k], g)
    for key in ("state_after", "state_after_from_reference_grads"):
        if key not in out:
            continue
        for part, state in gold["state_after"].items():
            for k, v in state.items():
                check(f"{key} {part}.{k}", out[key][part][k], v, gold["state_before"][part][k])
    return bad


@pytest.mark.parametrize("attn", ["sdpa", "math"])
@pytest.mark.parametrize("step_file,ckpt_file", PAIRS)
def test_reference_golden_step(step_file, ckpt_file, attn):
    gold, out = run_golden_step(step_file, ckpt_file, attn)
    bad = compare(gold, out)
    assert not bad, "golden step differs from the reference:\n" + "\n".join(bad)


def golden_tensors(gold: dict) -> list[tuple]:
    """(kind, name, container, key) of every tensor the comparison checks: outputs and losses, gradients,
    states after the step."""
    out = [("output", k, gold, k) for k in ("target_encoder_out", "context_encoder_out", "predictor_out",
                                            "loss_smooth_l1", "loss_mse")]
    out += [("grad", f"grad {part}.{k}", grads, k) for part, grads in gold["grads"].items() for k in grads]
    out += [("state", f"{part}.{k}", state, k) for part, state in gold["state_after"].items() for k in state]
    return out


@pytest.mark.parametrize("step_file,ckpt_file", PAIRS)
def test_reference_golden_check_rejects_a_tenth_of_a_percent(step_file, ckpt_file):
    """The criterion is sharp at every size: scaling any single expected tensor by 1.001 (the loss, an
    output, one gradient, one weight after the step) fails the comparison, naming that tensor; a
    changed weight fails the end-to-end check on its own, not only the update-rule one."""
    gold, out = run_golden_step(step_file, ckpt_file, "math")
    assert not compare(gold, out)
    tensors = golden_tensors(gold)
    assert len(tensors) > 5 + 2 * len(gold["state_after"])
    for kind, name, where, key in tensors:
        original = where[key]
        assert original.abs().max() > 0, f"{name} is all zeros: a relative change cannot be checked"
        where[key] = original * 1.001
        try:
            bad = compare(gold, out)
        finally:
            where[key] = original
        hits = [line for line in bad if line.split(":")[0].endswith(name)]
        assert hits, f"a 0.1% change of {name} went unnoticed"
        if kind == "state":
            assert any(line.startswith("state_after ") for line in hits), f"end to end: {name} went unnoticed"


@pytest.mark.parametrize("step_file,ckpt_file", PAIRS)
def test_reference_pos_embed_tables(step_file, ckpt_file):
    """Our sin-cos tables equal the reference's stored ones."""
    from ijepa_fast.models.pos_embed import grid_from_tokens, sincos_2d

    gold = torch.load(step_file, weights_only=False)
    for part, key in (("encoder", "pos_embed"), ("predictor", "predictor_pos_embed")):
        table = gold["state_before"][part][key]
        ours = sincos_2d(table.shape[-1], grid_from_tokens(table.shape[1])).unsqueeze(0)
        assert torch.allclose(ours, table, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# the multi-step trajectory

def traj_schedules(gold) -> Schedules:
    o = gold["optim"]
    return Schedules(steps_per_epoch=o["iterations_per_epoch"], epochs=o["epochs"], warmup=o["warmup_epochs"],
                     start_lr=o["start_lr"], lr=o["lr"], final_lr=o["final_lr"], weight_decay=o["weight_decay"],
                     final_weight_decay=o["final_weight_decay"], ipe_scale=o["ipe_scale"], ema=tuple(o["ema"]))


def traj_model(gold, ckpt: dict) -> IJEPA:
    cfg = gold["config"]
    enc, pred, tgt = models_from_checkpoint(ckpt, num_heads=cfg["num_heads"], pred_heads=cfg["pred_num_heads"],
                                            norm_eps=cfg["norm_eps"], attn_impl="math")
    return IJEPA(enc, pred, tgt).configure_kernels("reference")


def run_trajectory(gold, model, optimizer, first: int) -> tuple[list[str], dict]:
    """Steps ``first``.. of the golden trajectory through ``train_step``; the failures and the final state."""
    bad = []
    schedules = traj_schedules(gold)
    for i in range(first, len(gold["steps"])):
        s = gold["steps"][i]
        res = train_step(model, optimizer, s["images"], MaskBatch.from_lists(s["masks_enc"], s["masks_pred"]), i,
                         schedules, precision="fp32")
        checks = (("lr", res.lr, s["lr"], 1e-12), ("wd", res.wd, s["wd"], 1e-12),
                  ("momentum", res.momentum, s["momentum"], 1e-12), ("loss", res.loss, s["loss"], TOL))
        for what, ours, ref, tol in checks:
            if not abs(ours - ref) <= tol * abs(ref):
                bad.append(f"step {i} {what}: {ours!r} vs the reference's {ref!r}")
    return bad, {n: getattr(model, n).state_dict() for n in PARTS}


def compare_states(ours: dict, ref: dict, what: str, start: dict) -> list[str]:
    """The failures of a state after steps from ``start`` (the criterion in the module docstring)."""
    bad = []
    for part, state in ref.items():
        for k, v in state.items():
            err = excess(ours[part][k], v, start[part][k])
            if not err <= 1:
                rel = rel_err(ours[part][k], v)
                bad.append(f"{what} {part}.{k}: {err:.2f} times its bound (relative error {rel:.2e})")
    return bad


@pytest.mark.parametrize("traj_file,ckpt_file", TRAJ_PAIRS)
def test_reference_golden_trajectory_from_the_start(traj_file, ckpt_file):
    gold = torch.load(traj_file, weights_only=False)
    model = traj_model(gold, {n: add_prefix(gold["state_before"][n]) for n in PARTS})
    bad, state = run_trajectory(gold, model, make_optimizer(model), 0)
    bad += compare_states(state, gold["state_after"], "after the last step:", gold["state_before"])
    assert not bad, "the trajectory differs from the reference:\n" + "\n".join(bad)
    moved = rel_err(gold["state_after"]["encoder"]["blocks.0.attn.qkv.weight"],
                    gold["state_before"]["encoder"]["blocks.0.attn.qkv.weight"])
    assert moved > 100 * TOL  # the steps move the weights far more than the tolerance


@pytest.mark.parametrize("traj_file,ckpt_file", TRAJ_PAIRS)
def test_reference_golden_trajectory_resumed_from_its_checkpoint(traj_file, ckpt_file):
    """The reference's own mid-run checkpoint (optimiser state included) resumes to the same end state."""
    gold = torch.load(traj_file, weights_only=False)
    model = traj_model(gold, read_checkpoint(ckpt_file))
    optimizer = make_optimizer(model)
    extra = load_training_checkpoint(ckpt_file, model, optimizer)
    first = extra["epoch"] * gold["optim"]["iterations_per_epoch"]
    assert first == gold["ckpt_step"] and 0 < first < len(gold["steps"])
    assert optimizer.state  # the moments came from the file, not from zero
    bad, state = run_trajectory(gold, model, optimizer, first)
    bad += compare_states(state, gold["state_after"], "after the last step:", gold["state_before"])
    assert not bad, "the resumed trajectory differs from the reference:\n" + "\n".join(bad)


@pytest.mark.parametrize("traj_file,ckpt_file", TRAJ_PAIRS)
def test_reference_golden_trajectory_check_is_sharp(traj_file, ckpt_file):
    """Resuming with fresh optimiser moments (a plausible bug) fails the comparison."""
    gold = torch.load(traj_file, weights_only=False)
    model = traj_model(gold, read_checkpoint(ckpt_file))
    bad, state = run_trajectory(gold, model, make_optimizer(model), gold["ckpt_step"])
    assert compare_states(state, gold["state_after"], "", gold["state_before"])


@pytest.mark.parametrize("traj_file,ckpt_file", TRAJ_PAIRS)
def test_reference_golden_trajectory_rejects_a_tenth_of_a_percent(traj_file, ckpt_file):
    """Scaling any single tensor of the final state, or any step's loss, by 1.001 fails the comparison."""
    gold = torch.load(traj_file, weights_only=False)
    model = traj_model(gold, {n: add_prefix(gold["state_before"][n]) for n in PARTS})
    bad, state = run_trajectory(gold, model, make_optimizer(model), 0)
    assert not bad and not compare_states(state, gold["state_after"], "", gold["state_before"])
    for part, ref in gold["state_after"].items():
        for k, v in ref.items():
            ref[k] = v * 1.001
            try:
                bad = compare_states(state, gold["state_after"], "", gold["state_before"])
            finally:
                ref[k] = v
            assert any(line.split(":")[0].strip() == f"{part}.{k}" for line in bad), f"{part}.{k} went unnoticed"
    for s in gold["steps"]:
        s["loss"] *= 1.001
    model = traj_model(gold, {n: add_prefix(gold["state_before"][n]) for n in PARTS})
    bad, _ = run_trajectory(gold, model, make_optimizer(model), 0)
    assert [line for line in bad if " loss: " in line] == [line for line in bad], bad
    assert len(bad) == len(gold["steps"]), bad


def traj_overrides(gold, ckpt_file, run_dir) -> list[str]:
    """A config for the golden trajectory's model and schedules, resuming from the reference's checkpoint."""
    c, o = gold["config"], gold["optim"]
    images = len(gold["steps"][0]["images"])
    return ["model.name=custom", f"model.patch_size={c['patch_size']}", f"model.embed_dim={c['embed_dim']}",
            f"model.depth={c['depth']}", f"model.num_heads={c['num_heads']}", f"model.mlp_ratio={c['mlp_ratio']}",
            f"model.pred_depth={c['pred_depth']}", f"model.pred_dim={c['pred_embed_dim']}",
            f"model.pred_heads={c['pred_num_heads']}", "model.attn=math", "model.kernels=reference",
            f"data.crop_size={c['img_size']}", "data.source=demo", f"data.batch_size={images}",
            f"data.demo_images={images * o['iterations_per_epoch']}", f"optim.epochs={o['epochs']}",
            f"optim.warmup={o['warmup_epochs']}", f"optim.start_lr={o['start_lr']}", f"optim.lr={o['lr']}",
            f"optim.final_lr={o['final_lr']}", f"optim.weight_decay={o['weight_decay']}",
            f"optim.final_weight_decay={o['final_weight_decay']}", f"optim.ipe_scale={o['ipe_scale']}",
            f"optim.ema=[{o['ema'][0]},{o['ema'][1]}]", "run.precision=fp32", "run.progress=false", "run.plot=false",
            "run.monitor_every=0", "mask.min_keep=0", f"run.resume={ckpt_file}", f"run.dir={run_dir}"]


@pytest.mark.parametrize("traj_file,ckpt_file", TRAJ_PAIRS)
def test_reference_golden_trajectory_resumed_by_the_trainer(traj_file, ckpt_file, tmp_path):
    """As a user resumes: run.resume=PATH on the reference's checkpoint. The trainer takes its step
    from the checkpoint's epoch times the iterations per epoch, as the reference does, and its own
    step function, schedules and optimiser then reach the reference's final state."""
    from ijepa_fast.config import load_config
    from ijepa_fast.data import Batch
    from ijepa_fast.training.trainer import Trainer

    gold = torch.load(traj_file, weights_only=False)
    trainer = Trainer(load_config(None, traj_overrides(gold, ckpt_file, tmp_path / "run")))
    assert trainer.steps_per_epoch == gold["optim"]["iterations_per_epoch"]
    assert trainer.step == gold["ckpt_step"]
    assert "resumed from" in (tmp_path / "run" / "train.log").read_text()
    bad = []
    for i in range(trainer.step, len(gold["steps"])):
        s = gold["steps"][i]
        batch = Batch(s["images"], MaskBatch.from_lists(s["masks_enc"], s["masks_pred"]), i,
                      i // trainer.steps_per_epoch)
        res = trainer._one_step(batch)
        for what, ours, ref in (("lr", res.lr, s["lr"]), ("wd", res.wd, s["wd"]), ("momentum", res.momentum,
                                                                                   s["momentum"])):
            if not abs(ours - ref) <= 1e-12 * abs(ref):
                bad.append(f"step {i} {what}: {ours!r} vs {ref!r}")
        if not abs(res.loss - s["loss"]) <= TOL * abs(s["loss"]):
            bad.append(f"step {i} loss: {res.loss!r} vs {s['loss']!r}")
    state = {n: getattr(trainer.model, n).state_dict() for n in PARTS}
    bad += compare_states(state, gold["state_after"], "after the last step:", gold["state_before"])
    assert not bad, "the trainer's resumed trajectory differs from the reference:\n" + "\n".join(bad)
