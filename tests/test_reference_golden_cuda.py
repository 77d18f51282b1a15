"""The golden files on a CUDA GPU, in fp32 (TF32 off): the reference's step and trajectory, reproduced
by the engine's CUDA path. Skips without CUDA; with CUDA, finding no golden file is a failure (set
IJEPA_REFERENCE_DIR to the folder holding them).

What is compared (see tests/test_reference_golden.py): for the step, the loaded state, the target
and context encoder outputs, the predictor output, both losses, every gradient and the state after
AdamW + EMA applied to the reference's gradients, within 1e-5; for the trajectory, each step's
learning rate, weight decay and momentum exactly and its loss within 1e-4. The state after our own
AdamW steps is compared on the CPU only: AdamW's first step divides each gradient by its own
magnitude, so a gradient that is rounding noise moves by up to the learning rate under any other
summation order (the GPU's), far above 1e-5, while outputs and gradients agree.
"""
import pytest
import torch
from test_reference_golden import PAIRS, PARTS, TRAJ_PAIRS, compare, run_golden_step, traj_model, traj_schedules

from ijepa_fast.checkpoint.format import add_prefix
from ijepa_fast.masks import MaskBatch
from ijepa_fast.training.step import make_optimizer, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
LOSS_TOL = 1e-4


def test_reference_golden_cuda_files_present():
    assert PAIRS and TRAJ_PAIRS, "no golden files: set IJEPA_REFERENCE_DIR to the folder holding them"


@pytest.mark.parametrize("attn", ["sdpa", "math"])
@pytest.mark.parametrize("step_file,ckpt_file", PAIRS)
def test_reference_golden_step_on_cuda(step_file, ckpt_file, attn):
    gold, out = run_golden_step(step_file, ckpt_file, attn, device="cuda")
    assert out["context_encoder_out"].is_cuda
    bad = compare(gold, out)
    assert not bad, "golden step on CUDA differs from the reference:\n" + "\n".join(bad)


@pytest.mark.parametrize("traj_file,ckpt_file", TRAJ_PAIRS)
def test_reference_golden_trajectory_on_cuda(traj_file, ckpt_file):
    gold = torch.load(traj_file, weights_only=False)
    model = traj_model(gold, {n: add_prefix(gold["state_before"][n]) for n in PARTS}).to("cuda")
    optimizer = make_optimizer(model)
    schedules = traj_schedules(gold)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    bad = []
    try:
        for i, s in enumerate(gold["steps"]):
            masks = MaskBatch.from_lists(s["masks_enc"], s["masks_pred"]).to("cuda")
            res = train_step(model, optimizer, s["images"].to("cuda"), masks, i, schedules, precision="fp32")
            for what, ours, ref, tol in (("lr", res.lr, s["lr"], 1e-12), ("wd", res.wd, s["wd"], 1e-12),
                                         ("momentum", res.momentum, s["momentum"], 1e-12),
                                         ("loss", res.loss, s["loss"], LOSS_TOL)):
                if not abs(ours - ref) <= tol * abs(ref):
                    bad.append(f"step {i} {what}: {ours!r} vs the reference's {ref!r}")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    assert len(gold["steps"]) > 1 and not bad, "the trajectory on CUDA differs:\n" + "\n".join(bad)
