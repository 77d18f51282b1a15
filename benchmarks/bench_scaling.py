"""Data-parallel cost: bytes each process sends per step, and measured DDP / FSDP overhead.

    python benchmarks/bench_scaling.py [--procs 2,8,16] [--measure --nproc 2 --device cpu] [--out F] [--md F]

Per-step communication per process, for every published model size, counted from the parameter
counts (ring algorithms: an all-reduce moves 2 (n-1)/n of the data, an all-gather or a
reduce-scatter (n-1)/n):

- DDP: one all-reduce of the encoder's and predictor's fp32 gradients (with perf.bf16_weights
  too: the fp32 master gradients are averaged in fp32; the bf16 column is what averaging the bf16
  compute copy's gradients would send, at bf16 precision);
- FSDP: all-gathers of the target encoder, encoder and predictor parameters (bf16) for the
  forward pass, again for the encoder and predictor in the backward pass, and a reduce-scatter of
  their gradients (fp32).

``--measure`` times the training step of a small model with ``--nproc`` processes (gloo on the
CPU, NCCL on GPUs) for each strategy, against one process with the same per-process batch and
threads; ``--bf16`` adds DDP with ``perf.bf16_weights`` (against one bf16-weights process).
One JSON object per line.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, emit, environment, write_markdown

MODELS = {"vit_base": 16, "vit_large": 16, "vit_huge": 14, "vit_giant": 16}


def param_counts(name: str, patch: int) -> tuple[int, int]:
    """(trainable: encoder + predictor, target encoder) parameter counts."""
    import torch

    from ijepa_fast.model import IJEPA

    with torch.device("meta"):
        m = IJEPA.build(name, img_size=224, patch_size=patch, pred_depth=16 if name == "vit_giant" else 12)
    train = sum(p.numel() for part in (m.encoder, m.predictor) for p in part.parameters() if p.requires_grad)
    target = sum(p.numel() for p in m.target_encoder.parameters())
    return train, target


def volumes(name: str, patch: int, n: int) -> dict:
    train, target = param_counts(name, patch)
    ring = (n - 1) / n
    ddp = 2 * ring * train * 4
    fsdp = ring * ((target + train) * 2 + train * 2 + train * 4)
    return {"model": name, "procs": n, "trainable_M": round(train / 1e6, 1), "target_M": round(target / 1e6, 1),
            "ddp_GB_per_step": round(ddp / 1e9, 3), "ddp_bf16_GB_per_step": round(ddp / 2e9, 3),
            "fsdp_GB_per_step": round(fsdp / 1e9, 3)}


WORKER = r'''
import json, os, sys, time, torch
sys.path.append({root!r})  # the checkout, where nothing is installed
from ijepa_fast.config import load_config
from ijepa_fast.training.trainer import Trainer
from ijepa_fast import distributed
cfg = load_config("demo_cpu", {overrides!r})
t = Trainer(cfg)
batches = iter(t.make_loader(cfg.run.max_steps))
times = []
for i, batch in enumerate(batches):
    distributed.barrier()
    s = time.perf_counter()
    t._one_step(batch)
    if t.device.type == "cuda":
        torch.cuda.synchronize()
    distributed.barrier()
    times.append(time.perf_counter() - s)
if t.rank == 0:
    times = sorted(times[2:])
    print("RESULT " + json.dumps({{"median_s": times[len(times) // 2]}}), flush=True)
distributed.shutdown()
'''


def measure(strategy: str, nproc: int, device: str, steps: int, extra, threads: int) -> float:
    overrides = ["model.embed_dim=192", "model.depth=6", "model.num_heads=3", "model.pred_depth=2",
                 "model.pred_dim=96", "data.demo_images=512", "data.batch_size=32", "optim.epochs=100",
                 f"run.max_steps={steps}", "run.progress=false", "run.plot=false", "run.monitor_every=0",
                 f"run.device={device}", f"dist.strategy={strategy}", "mask.sampler=python", *extra]
    with tempfile.TemporaryDirectory() as tmp:
        overrides.append(f"run.dir={tmp}/run")
        script = Path(tmp) / "worker.py"
        script.write_text(WORKER.format(root=str(ROOT), overrides=overrides))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(random.randint(20000, 40000)), str(script)] if nproc > 1 else [sys.executable, str(script)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(p.stderr[-3000:])
        return json.loads(line[7:])["median_s"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", default="2,8,16")
    p.add_argument("--measure", action="store_true")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--bf16", action="store_true", help="also measure DDP with perf.bf16_weights=true")
    p.add_argument("--out")
    p.add_argument("--md")
    args = p.parse_args()
    env = environment(args.device)
    rows = []
    for name, patch in MODELS.items():
        for n in (int(x) for x in args.procs.split(",")):
            rows.append({"bench": "comm_volume", **volumes(name, patch, n), **env})
            emit(rows[-1], args.out)
    measured = []
    if args.measure:
        threads = max(1, (os.cpu_count() or 2) // args.nproc)  # the same cores per process in every run
        runs = [("ddp", []), ("fsdp", [])] + ([("ddp", ["perf.bf16_weights=true"])] if args.bf16 else [])
        bases = {}
        for strategy, extra in runs:
            key = tuple(extra)
            if key not in bases:
                bases[key] = measure("none", 1, args.device, args.steps, extra, threads)
            base = bases[key]
            t = measure(strategy, args.nproc, args.device, args.steps, extra, threads)
            name = strategy + (" + bf16 weights" if extra else "")
            measured.append({"bench": "dp_overhead", "strategy": name, "nproc": args.nproc, "device": args.device,
                             "step_s_one_process": round(base, 4), "step_s": round(t, 4),
                             "threads_per_process": threads, "overhead": round(t / base - 1, 3), **env})
            emit(measured[-1], args.out)
    if args.md:
        notes = ""
        for m in measured:
            notes += (f"\n\nMeasured ({m['device']}, {m['nproc']} processes of {m['threads_per_process']} thread(s), "
                      "ViT 192 x 6, batch 32 per process): "
                      f"{m['strategy']} step {m['step_s']} s against {m['step_s_one_process']} s for one process "
                      f"({m['overhead'] * 100:+.0f} %).")
        cols = [("model", "model"), ("procs", "processes"), ("trainable_M", "trainable M params"),
                ("ddp_GB_per_step", "DDP GB (fp32 grads)"), ("ddp_bf16_GB_per_step", "DDP GB (bf16)"),
                ("fsdp_GB_per_step", "FSDP GB")]
        write_markdown(args.md, "Data-parallel communication per step and process",
                       "python benchmarks/bench_scaling.py", rows, cols, notes.strip())


if __name__ == "__main__":
    main()
