"""The lean bf16 step (bf16 compute weights, fp32 masters) and bf16 autocast against the fp32 step.

On one model and one sequence of batches (the same start weights for every path):

- one step: each parameter's gradient as the optimiser receives it, per-tensor relative error
  ||g - g_fp32|| / ||g_fp32||, the worst tensor and all gradients together;
- ``--steps`` training steps: the weight updates' error, ||dW - dW_fp32|| / ||dW_fp32|| with
  dW = W_after - W_start, per tensor (worst) and overall.

Prints one JSON row per path and measurement (``what``, ``path``, ``device``, the model size and the
figures), so the GPU command can run it on the card as it is:

    python benchmarks/numerics_check.py --device cuda
    python benchmarks/numerics_check.py --device cpu --steps 20          # ~1 min on 2 CPU cores
    python benchmarks/numerics_check.py --device cpu --tiny --steps 2 --batch 4   # the rehearsal's size

tests/test_numerics_lean.py asserts the bounds on the CPU with the same functions.
"""
import argparse
import json
import sys

import torch

from ijepa_fast.config import MaskConfig
from ijepa_fast.masks import MultiBlockSampler
from ijepa_fast.model import IJEPA
from ijepa_fast.perf.switches import MasterWeights
from ijepa_fast.training.schedules import Schedules
from ijepa_fast.training.step import make_optimizer, train_step

PATHS = ("lean", "autocast")
MODEL = dict(img_size=64, patch_size=4, embed_dim=192, depth=6, num_heads=3, pred_dim=96, pred_depth=3)
TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, pred_dim=24, pred_depth=1)  # rehearsals


def build(spec: dict, seed: int, device: str, attn: str) -> IJEPA:
    torch.manual_seed(seed)
    model = IJEPA.build("custom", attn=attn, **spec)
    return model.to(device)


def batches(spec: dict, grid, n: int, batch: int, device: str, seed: int) -> list:
    """n (images, masks); masks from the multi-block sampler at its defaults (4 targets, 1 context)."""
    sampler = MultiBlockSampler(grid, MaskConfig(min_keep=4), seed=seed)
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, spec["img_size"], spec["img_size"], generator=g).to(device),
             sampler.sample(batch, i).to(device)) for i in range(n)]


def layer_norm_rows(masks) -> dict:
    """Rows each layer norm normalises in one step: the context encoder's and the predictor's."""
    m, b, lc = masks.context.shape
    k, _, lt = masks.targets.shape
    return {"encoder": m * b * lc, "predictor": k * m * b * (lc + lt)}


def run(path: str, spec: dict, seed: int, data: list, device: str, attn: str, steps: int):
    """The first step's gradients (name -> fp32 tensor) and the weights after ``steps`` steps."""
    model = build(spec, seed, device, attn)
    opt = make_optimizer(model)
    master = MasterWeights(model) if path == "lean" else None
    precision = {"fp32": "fp32", "autocast": "bf16", "lean": "fp32"}[path]
    names = {id(p): f"{part}.{n}" for part in ("encoder", "predictor")
             for n, p in getattr(model, part).named_parameters()}
    grads = {}
    real = opt.step

    def record(*a, **k):
        if not grads:
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        grads[names[id(p)]] = p.grad.detach().float().cpu().clone()
        return real(*a, **k)

    opt.step = record
    schedules = Schedules(steps_per_epoch=max(steps, 1), epochs=1, warmup=0.25, start_lr=1e-4, lr=1e-3,
                          final_lr=1e-5)
    for i, (images, masks) in enumerate(data[:steps]):
        train_step(model, opt, images, masks, i, schedules, precision=precision, master=master)
    weights = {f"{part}.{n}": p.detach().float().cpu().clone() for part in ("encoder", "predictor")
               for n, p in getattr(model, part).named_parameters() if p.requires_grad}
    return grads, weights


def errors(got: dict, ref: dict) -> dict:
    """Per-tensor relative errors (worst tensor named) and all tensors together."""
    per = {k: float((got[k].double() - r.double()).norm() / r.double().norm().clamp_min(1e-30))
           for k, r in ref.items()}
    a = torch.cat([got[k].double().flatten() for k in ref])
    b = torch.cat([r.double().flatten() for r in ref.values()])
    worst = max(per, key=per.get)
    return {"overall": float((a - b).norm() / b.norm()), "worst": per[worst], "worst_tensor": worst, "per": per}


def compare(spec: dict = MODEL, device: str = "cpu", steps: int = 20, batch: int = 24, seed: int = 0,
            attn: str = "math") -> dict:
    """{path: {"grad": errors of the first step's gradients, "update": errors of the updates after
    ``steps`` steps}}, each against the fp32 step, plus the model and layer-norm row counts."""
    probe = build(spec, seed, device, attn)
    start = {f"{part}.{n}": p.detach().float().cpu().clone() for part in ("encoder", "predictor")
             for n, p in getattr(probe, part).named_parameters() if p.requires_grad}
    data = batches(spec, probe.grid, max(steps, 1), batch, device, seed + 1)
    ref_grads, ref_w = run("fp32", spec, seed, data, device, attn, max(steps, 1))
    ref_dw = {k: ref_w[k] - start[k] for k in start}
    out = {"model": {**spec, "batch": batch, "steps": steps, "attn": attn},
           "rows": layer_norm_rows(data[0][1])}
    for path in PATHS:
        grads, w = run(path, spec, seed, data, device, attn, max(steps, 1))
        out[path] = {"grad": errors(grads, ref_grads), "update": errors({k: w[k] - start[k] for k in w}, ref_dw)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--attn", default="math", help="attention path of every run (math, sdpa, ...)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (rehearsing the GPU command on the CPU)")
    a = ap.parse_args(argv)
    if a.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    res = compare(TINY if a.tiny else MODEL, a.device, a.steps, a.batch, attn=a.attn)
    where = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    for path in PATHS:
        for what in ("grad", "update"):
            e = res[path][what]
            row = {"what": f"numerics_{what}_vs_fp32", "path": path, "device": where, "torch": torch.__version__,
                   **res["model"], "layer_norm_rows": res["rows"], "overall": round(e["overall"], 6),
                   "worst": round(e["worst"], 6), "worst_tensor": e["worst_tensor"]}
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
