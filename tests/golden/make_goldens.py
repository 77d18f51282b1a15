"""Record golden pairs with the released I-JEPA code (facebookresearch/ijepa), fp32 on the CPU.

Each case writes four files into the output folder, in the layout the golden tests read
(``tests/test_reference_golden.py``; ``about`` inside each file describes its keys):

- ``ref_step_<name>.pt``: one step from the case's start state (images, masks, every output, both
  losses, every gradient, the state after one AdamW + EMA step), and ``ref_ckpt_<name>.pth.tar``,
  the same start state in the published checkpoint layout;
- ``ref_traj_<name>.pt``: several steps run as the released training script runs them (its four
  AdamW groups, warm-up + cosine LR, cosine weight decay, linear momentum ramp, the EMA), and
  ``ref_traj_ckpt_<name>.pth.tar``, the checkpoint that script saves at the end of epoch
  ``ckpt_epoch`` (optimiser state included).

The released code is imported from a folder that git ignores and is never committed. To rerun::

    git --git-dir=<a clone of facebookresearch/ijepa>/.git archive HEAD src configs | \\
        (mkdir -p .bench_ref/.ref && tar -x -C .bench_ref/.ref)
    python tests/golden/make_goldens.py                       # every case, into tests/golden/
    python tests/golden/make_goldens.py --case odd7 --out /tmp/g --ref path/to/.ref

The models, masks, images and schedules of each case are fixed by ``CASES`` and its seed, so a
rerun with the same torch writes the same tensors (to fp32 rounding of the CPU's kernels).
"""
import argparse
import copy
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]

# name -> (model, masks, optimiser and schedules, steps); tiny models, so each file is a few MB at most
CASES = {
    # another width and depth: 48 wide, 3 blocks, 3 heads of 16; predictor 24 wide, 1 block
    "w48d3": dict(
        model=dict(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, pred_embed_dim=24, pred_depth=1,
                   pred_num_heads=3),
        masks=dict(nenc=1, npred=4, allow_overlap=False, enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2),
                   aspect_ratio=(0.75, 1.5), min_keep=4),
        optim=dict(iterations_per_epoch=2, epochs=3, warmup_epochs=1.0, ipe_scale=1.0, start_lr=2e-4, lr=1e-3,
                   final_lr=1e-6, weight_decay=0.04, final_weight_decay=0.4, ema=(0.996, 1.0)),
        batch=4, traj_steps=5, ckpt_epoch=1, seed=11),
    # an odd 7 x 7 grid, a predictor deeper than the encoder, two context blocks, three target blocks
    # allowed to overlap them, a fractional warm-up (1.5 epochs of 3 iterations)
    "odd7": dict(
        model=dict(img_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=2, pred_embed_dim=16, pred_depth=3,
                   pred_num_heads=2),
        masks=dict(nenc=2, npred=3, allow_overlap=True, enc_mask_scale=(0.6, 0.8), pred_mask_scale=(0.15, 0.25),
                   aspect_ratio=(0.75, 1.5), min_keep=4),
        optim=dict(iterations_per_epoch=3, epochs=2, warmup_epochs=1.5, ipe_scale=1.0, start_lr=1e-4, lr=2e-3,
                   final_lr=1e-5, weight_decay=0.05, final_weight_decay=0.2, ema=(0.99, 1.0)),
        batch=3, traj_steps=6, ckpt_epoch=1, seed=12),
    # a 5 x 5 grid of 8-pixel patches, 4 encoder blocks of 5 heads of 8, a 2-block predictor, a
    # fractional warm-up (0.5 epoch) and an iterations-per-epoch scale of 1.25
    "p8g5": dict(
        model=dict(img_size=40, patch_size=8, embed_dim=40, depth=4, num_heads=5, pred_embed_dim=20, pred_depth=2,
                   pred_num_heads=5),
        masks=dict(nenc=1, npred=2, allow_overlap=True, enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.3),
                   aspect_ratio=(0.75, 1.5), min_keep=2),
        optim=dict(iterations_per_epoch=2, epochs=3, warmup_epochs=0.5, ipe_scale=1.25, start_lr=5e-4, lr=1e-3,
                   final_lr=1e-6, weight_decay=0.04, final_weight_decay=0.4, ema=(0.996, 1.0)),
        batch=2, traj_steps=6, ckpt_epoch=2, seed=13),
}

NORM_EPS = 1e-6  # the released size factories' layer norm


def released(ref: Path):
    """The released modules used here (imported from ``ref``, the unpacked src/ and configs/)."""
    sys.path.insert(0, str(ref))
    from src import helper
    from src.masks.multiblock import MaskCollator
    from src.masks.utils import apply_masks
    from src.models import vision_transformer as vit
    from src.utils.tensors import repeat_interleave_batch

    return argparse.Namespace(helper=helper, MaskCollator=MaskCollator, apply_masks=apply_masks, vit=vit,
                              repeat_interleave_batch=repeat_interleave_batch)


def build(r, m: dict):
    """Encoder, predictor and target encoder built and initialised as the released training script does."""
    norm = partial(torch.nn.LayerNorm, eps=NORM_EPS)
    enc = r.vit.VisionTransformer(img_size=[m["img_size"]], patch_size=m["patch_size"], embed_dim=m["embed_dim"],
                                  depth=m["depth"], num_heads=m["num_heads"], mlp_ratio=4.0, qkv_bias=True,
                                  norm_layer=norm)
    pred = r.vit.VisionTransformerPredictor(num_patches=enc.patch_embed.num_patches, embed_dim=m["embed_dim"],
                                            predictor_embed_dim=m["pred_embed_dim"], depth=m["pred_depth"],
                                            num_heads=m["pred_num_heads"], mlp_ratio=4.0, qkv_bias=True,
                                            norm_layer=norm)
    for module in (*enc.modules(), *pred.modules()):  # the training script's re-initialisation
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.ones_(module.weight)
            torch.nn.init.zeros_(module.bias)
    tgt = copy.deepcopy(enc)
    for p in tgt.parameters():
        p.requires_grad = False
    return enc, pred, tgt


def batches(r, case: dict, n: int) -> list:
    """n (images, masks_enc, masks_pred) from the released mask collator, with standard-normal images."""
    m = case["model"]
    coll = r.MaskCollator(input_size=(m["img_size"], m["img_size"]), patch_size=m["patch_size"], **case["masks"])
    out = []
    for _ in range(n):
        images, masks_enc, masks_pred = coll([torch.randn(3, m["img_size"], m["img_size"])
                                              for _ in range(case["batch"])])
        out.append((images, masks_enc, masks_pred))
    return out


def forward(r, enc, pred, tgt, images, masks_enc, masks_pred):
    """The released step's forward pass: target features, context encoding, predictions."""
    with torch.no_grad():
        h_all = tgt(images)
        h = F.layer_norm(h_all, (h_all.size(-1),))
        h = r.apply_masks(h, masks_pred)
        h = r.repeat_interleave_batch(h, len(images), repeat=len(masks_enc))
    z_ctx = enc(images, masks_enc)
    z = pred(z_ctx, masks_enc, masks_pred)
    return h_all, z_ctx, z, h


def ema(enc, tgt, momentum: float):
    with torch.no_grad():
        for q, k in zip(enc.parameters(), tgt.parameters()):
            k.data.mul_(momentum).add_((1.0 - momentum) * q.detach().data)


def states(enc, pred, tgt) -> dict:
    return {n: {k: v.detach().clone() for k, v in part.state_dict().items()}
            for n, part in (("encoder", enc), ("predictor", pred), ("target_encoder", tgt))}


def published(state: dict, **extra) -> dict:
    """A checkpoint in the published layout (keys prefixed as the distributed wrapper saves them)."""
    return {**{n: {f"module.{k}": v for k, v in s.items()} for n, s in state.items()}, **extra}


def optimizer(r, enc, pred, o: dict):
    """The released four AdamW groups, LR and weight-decay schedulers (helper.init_opt)."""
    opt, _, scheduler, wd_scheduler = r.helper.init_opt(
        encoder=enc, predictor=pred, wd=o["weight_decay"], final_wd=o["final_weight_decay"], start_lr=o["start_lr"],
        ref_lr=o["lr"], final_lr=o["final_lr"], iterations_per_epoch=o["iterations_per_epoch"],
        warmup=o["warmup_epochs"], num_epochs=o["epochs"], ipe_scale=o["ipe_scale"], use_bfloat16=False)
    return opt, scheduler, wd_scheduler


def config(m: dict) -> dict:
    return {"img_size": m["img_size"], "patch_size": m["patch_size"], "embed_dim": m["embed_dim"],
            "depth": m["depth"], "num_heads": m["num_heads"], "mlp_ratio": 4.0, "qkv_bias": True,
            "norm_eps": NORM_EPS, "pred_embed_dim": m["pred_embed_dim"], "pred_depth": m["pred_depth"],
            "pred_num_heads": m["pred_num_heads"]}


def record_step(r, name: str, case: dict, out: Path):
    o = case["optim"]
    torch.manual_seed(case["seed"])
    enc, pred, tgt = build(r, case["model"])
    (images, masks_enc, masks_pred), = batches(r, case, 1)
    before = states(enc, pred, tgt)
    h_all, z_ctx, z, h = forward(r, enc, pred, tgt, images, masks_enc, masks_pred)
    loss = F.smooth_l1_loss(z, h)
    loss_mse = F.mse_loss(z, h)
    loss.backward()
    grads = {n: {k: p.grad.detach().clone() for k, p in part.named_parameters() if p.grad is not None}
             for n, part in (("encoder", enc), ("predictor", pred))}
    opt = optimizer(r, enc, pred, o)[0]
    for g in opt.param_groups:  # one step at the case's peak settings
        g["lr"] = o["lr"]
        g["weight_decay"] = 0.0 if g.get("WD_exclude") else o["weight_decay"]
    opt.step()
    ema(enc, tgt, o["ema"][0])
    torch.save({
        "about": (f"One fp32 step of the released I-JEPA implementation on CPU (case {name}, written by "
                  "tests/golden/make_goldens.py). Layout as ref_step_tiny.pt: masks are index tensors into the "
                  "row-major patch grid, masks_enc one [B, Nc] tensor per context block, masks_pred one [B, Nt] "
                  "per target block; predictor output rows are block-major (row k*B+b: context block i, target "
                  "block j, image b, k = j * len(masks_enc) + i as the released code repeats them)."),
        "config": config(case["model"]), "images": images, "masks_enc": masks_enc, "masks_pred": masks_pred,
        "state_before": before, "target_encoder_out": h_all.detach(), "context_encoder_out": z_ctx.detach(),
        "predictor_out": z.detach(), "loss_smooth_l1": loss.detach(), "loss_mse": loss_mse.detach(),
        "grads": grads,
        "step": {"optimizer": "AdamW(betas=(0.9, 0.999), eps=1e-8)", "lr": o["lr"],
                 "weight_decay": o["weight_decay"], "weight_decay_excludes": "biases and all 1-D parameters",
                 "ema_momentum": o["ema"][0],
                 "loss": "smooth_l1 (beta=1) between predictor_out and layer_norm(target_encoder_out) gathered at "
                         "masks_pred (no affine, eps=1e-5)"},
        "state_after": states(enc, pred, tgt),
    }, out / f"ref_step_{name}.pt")
    torch.save(published(before, opt=None, scaler=None, epoch=1, loss=float(loss.detach()), batch_size=case["batch"],
                         world_size=1, lr=o["lr"]), out / f"ref_ckpt_{name}.pth.tar")


def record_trajectory(r, name: str, case: dict, out: Path):
    o = case["optim"]
    ipe = o["iterations_per_epoch"]
    torch.manual_seed(case["seed"] + 1000)
    enc, pred, tgt = build(r, case["model"])
    opt, scheduler, wd_scheduler = optimizer(r, enc, pred, o)
    total = ipe * o["epochs"] * o["ipe_scale"]
    momentum = (o["ema"][0] + i * (o["ema"][1] - o["ema"][0]) / total for i in range(int(total) + 1))
    before = states(enc, pred, tgt)
    steps, epoch_losses, ckpt = [], [], None
    for i, (images, masks_enc, masks_pred) in enumerate(batches(r, case, case["traj_steps"])):
        lr, wd = scheduler.step(), wd_scheduler.step()
        _, _, z, h = forward(r, enc, pred, tgt, images, masks_enc, masks_pred)
        loss = F.smooth_l1_loss(z, h)
        loss.backward()
        opt.step()
        opt.zero_grad()
        m = next(momentum)
        ema(enc, tgt, m)
        steps.append({"images": images, "masks_enc": masks_enc, "masks_pred": masks_pred, "lr": lr, "wd": wd,
                      "momentum": m, "loss": float(loss)})
        epoch_losses.append(float(loss))
        if (i + 1) % ipe == 0:  # the end of an epoch: the script saves its latest checkpoint
            epoch = (i + 1) // ipe
            if epoch == case["ckpt_epoch"]:
                ckpt = published(states(enc, pred, tgt), opt=copy.deepcopy(opt.state_dict()), scaler=None,
                                 epoch=epoch, loss=sum(epoch_losses) / len(epoch_losses),
                                 batch_size=case["batch"], world_size=1, lr=o["lr"])
            epoch_losses = []
    assert ckpt is not None and case["ckpt_epoch"] * ipe < case["traj_steps"], f"{name}: no mid-run checkpoint"
    torch.save({
        "about": (f"Several fp32 training steps of the released I-JEPA implementation on CPU (case {name}, "
                  "written by tests/golden/make_goldens.py), run as its training script runs them; layout as "
                  "ref_traj_tiny.pt."),
        "config": config(case["model"]),
        "optim": {**o, "ema": list(o["ema"]), "optimizer": "AdamW(betas=(0.9, 0.999), eps=1e-8), four groups",
                  "loss": "smooth_l1, beta 1", "masks": {k: v for k, v in case["masks"].items()}},
        "ckpt_epoch": case["ckpt_epoch"], "ckpt_step": case["ckpt_epoch"] * ipe,
        "state_before": before, "steps": steps, "state_after": states(enc, pred, tgt),
    }, out / f"ref_traj_{name}.pt")
    torch.save(ckpt, out / f"ref_traj_ckpt_{name}.pth.tar")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", type=Path, default=ROOT / ".bench_ref" / ".ref",
                    help="the released code's src/ and configs/ (default .bench_ref/.ref)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="default tests/golden")
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="only these cases (repeatable)")
    a = ap.parse_args(argv)
    if not (a.ref / "src" / "models" / "vision_transformer.py").exists():
        raise SystemExit(f"--ref {a.ref}: no src/models/vision_transformer.py there; unpack the released code first")
    torch.set_num_threads(1)  # one summation order, whatever the machine
    r = released(a.ref)
    a.out.mkdir(parents=True, exist_ok=True)
    for name in a.case or sorted(CASES):
        record_step(r, name, CASES[name], a.out)
        record_trajectory(r, name, CASES[name], a.out)
        sizes = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.2f} MiB" for p in sorted(a.out.glob(f"*_{name}.*")))
        print(f"{name}: {sizes}")


if __name__ == "__main__":
    main()
