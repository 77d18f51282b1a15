"""Checks the run folder of the README's first command (the CPU demo): python check_demo.py RUN_DIR.

It must hold the resolved config, the log, a finite loss that went down, the loss plot and a
checkpoint that loads into an encoder giving finite features. Exits non-zero, saying what is wrong.
"""
import json
import math
import sys
from pathlib import Path


def fail(msg: str) -> None:
    raise SystemExit(f"demo check failed: {msg}")


def main(run_dir: str) -> None:
    if not run_dir:
        fail("the demo printed no 'run folder: ...' line")
    run = Path(run_dir)
    for name in ("config.yaml", "train.log", "metrics.jsonl", "metrics.csv", "loss.png", "jepa-latest.pth.tar"):
        if not (run / name).is_file() or (run / name).stat().st_size == 0:
            fail(f"{run / name} is missing or empty")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    if len(losses) < 8:
        fail(f"only {len(losses)} logged losses")
    if not all(isinstance(v, float) and math.isfinite(v) for v in losses):
        fail(f"a logged loss is not finite: {losses}")
    q = len(losses) // 4
    first, last = sum(losses[:q]) / q, sum(losses[-q:]) / q
    if not last < first:
        fail(f"the loss did not go down: first quarter {first:.4f}, last quarter {last:.4f}")
    if not (run / "loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n"):
        fail("loss.png is not a PNG")

    import torch

    from ijepa_fast import encoder_from_checkpoint
    from ijepa_fast.checkpoint.format import read_checkpoint

    ckpt = read_checkpoint(run / "jepa-latest.pth.tar")
    step = ckpt["ijepa_fast"]["step"]
    if step < len(losses):
        fail(f"the checkpoint is at step {step}, before the last logged step")
    enc = encoder_from_checkpoint(ckpt).eval()
    side = enc.patch_size * enc.grid[0]
    with torch.no_grad():
        feats = enc(torch.randn(2, 3, side, side))
    if not torch.isfinite(feats).all():
        fail("the checkpoint's encoder gives non-finite features")
    print(f"demo ok: {run}: {len(losses)} logged steps, loss {first:.4f} -> {last:.4f} (first and last quarter), "
          f"checkpoint at step {step}, features {tuple(feats.shape)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
