"""Every GPU check the throughput goals need, in one process and one time budget.

    python benchmarks/gpu_window.py --out DIR [--budget-s 450] [--stages tests,step,profile]
    python benchmarks/gpu_window.py --out DIR --extras          # the optional second command
    python benchmarks/gpu_window.py --out DIR --rehearse        # every stage on the CPU, tiny models

Stages, in order:

- ``tests``: the GPU tests (the golden step and trajectory on CUDA in fp32 from
  $IJEPA_REFERENCE_DIR first, where finding no golden file is a failure; every kernel, the fused tail
  against torch's AdamW + EMA on CUDA tensors, the captured CUDA graphs against the plain step, FP8,
  host syncs, token buckets); each outcome and failure goes to ``DIR/gpu_tests.txt`` as it happens
  (``pytest_live.py``), and one row counts passed / failed / skipped.
- ``step``: for ViT-H/14 b128 and ViT-B/16 b256 at reference masks, the released step (fed the same
  masks, at the same predictor depth; skipped, saying so, without ``.bench_ref/``) and our step as
  the recipe ships (``defaults``: no perf keys, every switch 'auto'), at its best measured variant
  and (ViT-H) the memory variant; then ViT-H ``eager`` (compile and bf16 weights off).
- ``profile``: one profiled step of the 0-sync configuration (fused tail, deferred step) of ViT-H.
- ``fp8``: ViT-H/14 b128 with FP8 rowwise linear layers (best variant), then FP8 in the target
  encoder's forward only (``perf.fp8=target``), after the profile, so that a slow FP8 warm-up cannot
  take the other rows' time.
- ``numerics``: ``benchmarks/numerics_check.py --device cuda`` (the lean bf16 step and bf16
  autocast against the fp32 step: gradient and 20-step update errors at 64 px, width 192, 6 blocks),
  capped at ``NUMERICS_CAP_S``; its JSON rows go into the same rows file (``bench: numerics``), or
  one error row. Under ``--rehearse``: the tiny model, 2 steps, on the CPU.

``--extras``: ViT-L/16 b128 and ViT-g/16 b16 beside the released step, and the FP8 quality gate on
the digits. Rows go to ``DIR/rows.jsonl`` as each is measured (appended and flushed); every
variant runs in its own ``try`` and a failure or a variant cut at its time cap becomes an error row.
Models are built directly on the GPU. The page is made afterwards, on any machine, from the rows
of one or both commands: ``python benchmarks/bench_step.py --report A/rows.jsonl B/rows.jsonl --md F.md``.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field

from common import ROOT, emit, environment

TESTS = ["tests/test_reference_golden_cuda.py", "tests/test_kernel_adamw_tail.py", "tests/test_fused_tail.py",
         "tests/test_cuda_graphs.py", "tests/test_kernel_dispatch.py",
         "tests/test_kernel_ema.py", "tests/test_kernel_gather_layernorm.py", "tests/test_kernel_gather_tokens.py",
         "tests/test_kernel_jepa_loss.py", "tests/test_kernel_predictor_tokens.py", "tests/test_varlen.py",
         "tests/test_syncs.py", "tests/test_buckets.py",
         "tests/test_kernel_fp8_rows.py", "tests/test_fp8.py", "tests/test_fp8_target_tail.py"]
REHEARSAL_TESTS = ["tests/test_reference_golden_cuda.py", "tests/test_kernel_adamw_tail.py::"
                   "test_kernel_adamw_tail_checks_its_inputs"]
NUMERICS_CAP_S = 60.0  # the numerics check on a GPU (a few seconds of compute; model builds and warm-up)
BEST = {"optimizer": "fused_tail", "token_buckets": "4"}  # the fastest measured (H200, 2026-12-04)


@dataclass
class Variant:
    """One row of ours: a name, the perf settings on the fast path, FP8, the time cap (seconds)."""
    name: str
    perf: dict = field(default_factory=dict)
    fp8: str | None = None
    cap_s: float = 90.0


@dataclass
class Model:
    model: str
    patch: int
    batch: int
    pred_depth: int
    variants: list
    img: int = 224
    released_cap_s: float = 60.0  # 0: no released row (it is in the run already)


def window_models(rehearse: bool, extras: bool) -> tuple[list[Model], list[Model]]:
    """The models and variants of one command: (the step stage's, the FP8 stage's). Each model's first
    row is ``defaults``: the recipe as shipped, no perf keys, every switch 'auto' and resolved for the
    device (``perf.switches.resolve``), the step ``ijepa-fast train`` runs. The explicit variants
    follow; ``eager`` (compile and bf16 weights off, the recipes' step before the switches defaulted
    to 'auto') comes after every model's other rows, so that a short window cuts it first. FP8 comes
    last, after the profile, so that a slow FP8 warm-up cannot take the other rows' time."""
    eager = {"compile": "false", "bf16_weights": "false"}
    memory = {**BEST, "activation_checkpointing": "selective", "selective_blocks": "predictor"}
    if rehearse:  # the same stages and variants, tiny and on the CPU (FP8 emulated)
        tiny = Model("vit_tiny", 16, 2, 2, [Variant("defaults", {}, cap_s=120),
                                           Variant("best", dict(BEST), cap_s=120),
                                           Variant("memory", memory, cap_s=120)], released_cap_s=240)
        fp8 = Model("vit_tiny", 16, 2, 2, [Variant("fp8", {**BEST, "fp8_emulate": "true"}, fp8="rowwise",
                                                   cap_s=180),
                                           Variant("fp8-target", {**BEST, "fp8_emulate": "true", "fp8_min_dim": "16"},
                                                   fp8="target", cap_s=180)], released_cap_s=0)
        late = Model("vit_tiny", 16, 2, 2, [Variant("eager", dict(eager), cap_s=120)], released_cap_s=0)
        return ([Model("vit_tiny", 16, 2, 2, tiny.variants[1:2], released_cap_s=240)], []) if extras \
            else ([tiny, late], [fp8])
    if extras:
        return [Model("vit_large", 16, 128, 12, [Variant("best", dict(BEST), cap_s=80)], released_cap_s=45),
                Model("vit_giant", 16, 16, 16, [Variant("best", dict(BEST), cap_s=100)], released_cap_s=60)], []
    return ([Model("vit_huge", 14, 128, 12, [Variant("defaults", {}, cap_s=75),
                                             Variant("best", dict(BEST), cap_s=75),
                                             Variant("memory", memory, cap_s=70)], released_cap_s=45),
             Model("vit_base", 16, 256, 12, [Variant("defaults", {}, cap_s=50),
                                             Variant("best", dict(BEST), cap_s=50)], released_cap_s=35),
             Model("vit_huge", 14, 128, 12, [Variant("eager", dict(eager), cap_s=45)], released_cap_s=0)],
            [Model("vit_huge", 14, 128, 12, [Variant("fp8", dict(BEST), fp8="rowwise", cap_s=150),
                                             Variant("fp8-target", dict(BEST), fp8="target", cap_s=90)],
                   released_cap_s=0)])


class Cut(Exception):
    """A variant ran past its time cap."""


@contextmanager
def time_cap(seconds: float):
    """Raise ``Cut`` in this (the main) thread after ``seconds`` (a SIGALRM timer)."""
    def fire(signum, frame):
        raise Cut(f"cut at its cap of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(float(seconds), 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Window:
    """The budget, the rows file and the run's environment."""

    def __init__(self, out: str, budget_s: float, device: str, env: dict):
        self.out, self.device, self.env = out, device, env
        self.rows = os.path.join(out, "rows.jsonl")
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def emit(self, row: dict) -> None:
        emit({**row, **self.env}, self.rows)

    def guarded(self, what: dict, cap_s: float, fn):
        """``fn()``'s row, or an error row (any exception, the cap, or too little time left)."""
        cap = min(cap_s, self.left())
        if cap < min(cap_s, 20.0):
            self.emit({**what, "error": f"skipped: {self.left():.0f} s left of the window"})
            return None
        t = time.monotonic()
        try:
            with time_cap(cap):
                row = fn()
        except Exception as e:  # noqa: BLE001  (every failure becomes a row; the window goes on)
            row = {**what, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            if not isinstance(e, Cut):
                traceback.print_exc()
        row["stage_s"] = round(time.monotonic() - t, 1)
        self.emit(row)
        self.release()
        return row

    def release(self) -> None:
        import torch

        gc.collect()
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_tests(win: Window, rehearse: bool) -> None:
    """pytest on the GPU test files; the counts as a row, the output in gpu_tests.txt."""
    golden = os.environ.get("IJEPA_REFERENCE_DIR", "")
    files = REHEARSAL_TESTS if rehearse else TESTS
    cap = min(150.0, win.left() - 5)
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-rfEs", "-p", "no:cacheprovider", "-p", "pytest_live"]
    live = os.path.join(win.out, "gpu_tests.txt")  # each test's outcome and failure as it happens (pytest_live)
    with open(live, "w") as f:
        f.write(f"== {' '.join(files)}\n")
    env = {**os.environ, "PYTEST_LIVE_LOG": live,
           "PYTHONPATH": os.pathsep.join(x for x in (str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")) if x)}
    t = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=cap, env=env)
        text, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    with open(live, "a") as f:
        f.write("\n== pytest's own output\n" + text)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", text.splitlines()[-1]
                                                  if text.strip() else "")}
    golden_cases = len([f for f in os.listdir(golden) if f.endswith(".pt")]) if golden and os.path.isdir(golden) \
        else 0
    row = {"bench": "gpu_tests", "files": len(files), "returncode": rc, "seconds": round(time.monotonic() - t, 1),
           "golden_dir": golden, "golden_files": golden_cases, **counts}
    if rc != 0:
        row["error"] = f"pytest exited {rc}" if rc != "timeout" else f"pytest cut at {cap:.0f} s"
    elif not golden_cases and not rehearse:
        row["error"] = "no golden files: set IJEPA_REFERENCE_DIR to the carried folder"
    print("\n".join(text.splitlines()[-15:]), flush=True)
    win.emit(row)


@contextmanager
def built_on(device: str):
    """``IJEPA.build`` (as ``ijepa_fast.bench.step`` calls it) initialises the model on ``device``:
    building ViT-H on the host takes a minute, on a GPU about a second."""
    import torch

    from ijepa_fast.bench import step as bench

    real = bench.IJEPA.build

    def build(*args, **kwargs):
        if torch.device(device).type != "cuda":
            return real(*args, **kwargs)
        with torch.device(device):
            return real(*args, **kwargs)

    bench.IJEPA.build = build
    try:
        yield
    finally:
        bench.IJEPA.build = real


def run_steps(win: Window, models: list[Model], steps: int, warmup: int, peak: float | None) -> None:
    """The released step's row and ours, variant by variant (MFU against ``peak``)."""
    import torch
    from bench_step import reference_rows

    from ijepa_fast.bench.step import BenchSpec, run
    from ijepa_fast.config import PerfConfig, merge
    from ijepa_fast.perf.switches import fp8_through_torchao

    def needs_torchao(v: Variant) -> bool:
        perf = PerfConfig()
        merge(perf, {**v.perf, "fp8": v.fp8}, "perf.")
        return fp8_through_torchao(perf, torch.device(win.device))

    for m in models:
        what = {"bench": "reference_step", "model": m.model, "patch": m.patch, "batch": m.batch,
                "pred_depth": m.pred_depth, "variant": "released"}
        if not m.released_cap_s:
            pass
        elif not (ROOT / ".bench_ref" / "reference_step.py").exists():
            print(f"no .bench_ref/reference_step.py: the released step of {m.model} is not measured "
                  "(benchmarks/prepare_device.sh unpacks it)", flush=True)
        else:
            def released(m=m):
                rows = reference_rows(m.model, m.patch, m.batch, steps=steps, warmup=warmup, out=None, env={},
                                      pred_depth=m.pred_depth, img=m.img, device=win.device)
                if not rows:
                    raise RuntimeError("the released step gave no row (its output is in the log)")
                return rows[0]
            win.guarded(what, m.released_cap_s, released)
        for v in m.variants:
            if v.fp8 and importlib.util.find_spec("torchao") is None and needs_torchao(v):
                print(f"torchao is not installed: the FP8 row of {m.model} is not measured "
                      "(benchmarks/prepare_device.sh downloads its wheel)", flush=True)
                continue
            spec = BenchSpec(model=m.model, patch=m.patch, img=m.img, batch=m.batch, pred_depth=m.pred_depth,
                             mask_mode="reference", fast=True, fp8=v.fp8, perf=dict(v.perf), steps=steps,
                             warmup=warmup, device=win.device)
            what = {"bench": "step", "model": m.model, "patch": m.patch, "batch": m.batch, "masks": "reference",
                    "fast": True, "fp8": v.fp8, "pred_depth": m.pred_depth,
                    "perf": [f"{k}={x}" for k, x in v.perf.items()]}

            def ours(spec=spec, v=v):
                with built_on(win.device):
                    return {**run(spec, peak), "variant": v.name}
            row = win.guarded({**what, "variant": v.name}, v.cap_s, ours)
            if row and not row.get("error"):
                print(f"{m.model}/{m.batch} {v.name}: {row['images_per_s']} images/s, warm-up {row['warmup_s']} s, "
                      f"peak {row.get('peak_mem_gib')} GiB", flush=True)


def run_profile(win: Window, rehearse: bool) -> None:
    """benchmarks/profile_step.py on the 0-sync configuration (fused tail, deferred step, buckets)."""
    model = ["--model", "vit_tiny", "--patch", "16", "--batch", "2", "--pred-depth", "2", "--warmup", "1",
             "--steps", "1"] if rehearse else ["--model", "vit_huge", "--patch", "14", "--batch", "128"]
    perf = ",".join(f"{k}={v}" for k, v in BEST.items())
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), *model, "--masks", "reference",
           "--perf", perf, "--device", win.device, "--out", os.path.join(win.out, "profile.jsonl"),
           "--md", os.path.join(win.out, "profile.md")]
    cap = min(120.0 if not rehearse else 240.0, win.left() - 5)
    if cap < 30:
        win.emit({"bench": "profile_step", "error": f"skipped: {win.left():.0f} s left of the window"})
        return
    t = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=cap,
                           env={**os.environ, "BENCH_RUN_ID": win.env["run_id"]})
        print(p.stdout[-3000:], p.stderr[-3000:], sep="\n", flush=True)
        err = None if p.returncode == 0 else f"profile_step.py exited {p.returncode}"
    except subprocess.TimeoutExpired:
        err = f"profile_step.py cut at {cap:.0f} s"
    if err:
        win.emit({"bench": "profile_step", "error": err, "seconds": round(time.monotonic() - t, 1)})


def numerics_command(device: str, rehearse: bool) -> list[str]:
    """benchmarks/numerics_check.py as the window runs it (tiny, 2 steps, batch 4 under the rehearsal)."""
    size = ["--tiny", "--steps", "2", "--batch", "4"] if rehearse else ["--steps", "20"]
    return [sys.executable, str(ROOT / "benchmarks" / "numerics_check.py"), "--device", device, *size]


def run_numerics(win: Window, rehearse: bool) -> None:
    """The numerics check's JSON rows into the window's rows file, or one error row."""
    cap = min(NUMERICS_CAP_S if not rehearse else 180.0, win.left() - 5)
    if cap < 20:
        win.emit({"bench": "numerics", "error": f"skipped: {win.left():.0f} s left of the window"})
        return
    t = time.monotonic()
    try:
        p = subprocess.run(numerics_command(win.device, rehearse), cwd=ROOT, capture_output=True, text=True,
                           timeout=cap, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                               x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)})
        rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
        print(p.stdout[-2000:], p.stderr[-2000:], sep="\n", flush=True)
        err = None if p.returncode == 0 and rows else \
            f"numerics_check.py exited {p.returncode}" + ("" if rows else " with no rows")
    except subprocess.TimeoutExpired:
        rows, err = [], f"numerics_check.py cut at {cap:.0f} s"
    seconds = round(time.monotonic() - t, 1)
    for r in rows:
        win.emit({"bench": "numerics", **r, "seconds": seconds})
    if err:
        win.emit({"bench": "numerics", "error": err, "seconds": seconds})


def run_quality(win: Window) -> None:
    cap = min(300.0, win.left() - 5)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "fp8_quality.py"), "--device", win.device, "--fp8", "rowwise",
           "--out", os.path.join(win.out, "fp8_quality.jsonl"), "--md", os.path.join(win.out, "fp8_quality.md")]
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=cap)
        print(p.stdout[-2000:], p.stderr[-2000:], sep="\n", flush=True)
        if p.returncode:
            win.emit({"bench": "fp8_quality", "error": f"fp8_quality.py exited {p.returncode}"})
    except subprocess.TimeoutExpired:
        win.emit({"bench": "fp8_quality", "error": f"cut at {cap:.0f} s"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder of the rows (rows.jsonl) and the tests' output")
    p.add_argument("--budget-s", type=float, help="the whole window's time in seconds (450 on a GPU; 900 for "
                   "--rehearse, whose CPU steps are slow)")
    p.add_argument("--stages", default="tests,step,profile,fp8,numerics")
    p.add_argument("--extras", action="store_true", help="the second command: ViT-L/16, ViT-g/16, FP8 quality gate")
    p.add_argument("--rehearse", action="store_true", help="every stage on the CPU with tiny models")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--strict", action="store_true", help="exit 1 if any row holds an error (--rehearse: always)")
    args = p.parse_args(argv)
    args.budget_s = args.budget_s or (900.0 if args.rehearse else 450.0)
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("IJEPA_FAST_NO_EXT", "1")  # the Python sampler: nothing is compiled inside a stage
    os.environ.setdefault("BENCH_RUN_ID", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    device = "cpu" if args.rehearse else "cuda"
    steps, warmup = (1, 1) if args.rehearse else (args.steps, args.warmup)
    env = {**environment(device), "run_id": os.environ["BENCH_RUN_ID"], "window": "rehearsal" if args.rehearse
           else "extras" if args.extras else "main"}
    win = Window(args.out, args.budget_s, device, env)
    if not args.rehearse:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: run with --rehearse on a machine without a GPU", file=sys.stderr)
            return 2
    stages = args.stages.split(",")
    print(f"== window {env['window']} on {env.get('gpu', env.get('cpu'))}, commit {env['commit']}, "
          f"run {env['run_id']}, budget {args.budget_s:.0f} s", flush=True)
    if "tests" in stages and not args.extras:
        print("== tests", flush=True)
        run_tests(win, args.rehearse)
    step_models, fp8_models = window_models(args.rehearse, args.extras)
    peak = None
    if {"step", "fp8"} & set(stages):
        import torch

        from ijepa_fast.bench.step import matmul_peak_tflops

        peak = matmul_peak_tflops(torch.device(device))
        if peak:
            win.emit({"bench": "matmul_peak", "tflops_bf16_8192": round(peak, 1)})
    if "step" in stages:
        print(f"== step rows ({win.left():.0f} s left)", flush=True)
        run_steps(win, step_models, steps, warmup, peak)
    if "profile" in stages and not args.extras:
        print(f"== profile ({win.left():.0f} s left)", flush=True)
        run_profile(win, args.rehearse)
    if "fp8" in stages and fp8_models:
        print(f"== FP8 rows ({win.left():.0f} s left)", flush=True)
        run_steps(win, fp8_models, steps, warmup, peak)
    if "numerics" in stages and not args.extras:
        print(f"== numerics check ({win.left():.0f} s left)", flush=True)
        run_numerics(win, args.rehearse)
    if args.extras and not args.rehearse:
        print(f"== FP8 quality gate ({win.left():.0f} s left)", flush=True)
        run_quality(win)
    rows = [json.loads(line) for line in open(win.rows)] if os.path.exists(win.rows) else []
    print(f"== done, {win.left():.0f} s left; {len(rows)} rows, "
          f"{sum(1 for r in rows if r.get('error'))} with an error", flush=True)
    for r in rows:
        if r.get("bench") in ("step", "reference_step"):
            print(f"  {r['model']}/{r['batch']} {r.get('variant', '')}: "
                  + (r["error"] if r.get("error") else f"{r.get('images_per_s') or r.get('img_per_s')} images/s, "
                     f"peak {r.get('peak_mem_gib')} GiB, warm-up {r.get('warmup_s')} s"))
    return 1 if (args.strict or args.rehearse) and any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
