"""The ``ijepa-fast bench`` command: one config's step (``run_config``) or a suite file
(``run_suite_file``), timed by ``step.measure``; the page of a suite by ``compare.write_report``.
``cli.cmd_bench`` checks the arguments and calls these."""
from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch

from ..config import Config, PerfConfig, load_config, merge, parse_override
from ..errors import ConfigError
from ..training.setup import resolve_device
from .compare import run_label, write_report
from .step import PUBLISHED_BATCH, matmul_peak_tflops, measure
from .suite import SuiteEntry, read_suite, released_rows, row_metadata, run_suite


def shortcut_overrides(args, config: str | None) -> list[str]:
    """The ``bench`` flags (``--model``, ``--patch``, ``--img``, ``--batch``, ``--pred-depth``) as
    config overrides. Without a CONFIG they build one from the defaults as before: ViT-H/14 (patch 16
    for the other sizes) at the model's published per-GPU batch, 224 px, predictor depth 12."""
    out = []
    model = args.model or (None if config else "vit_huge")
    if model:
        out.append(f"model.name={model}")
    patch = args.patch or (None if config else 14 if model == "vit_huge" else 16)
    batch = args.batch or (None if config else PUBLISHED_BATCH.get(model, 1))
    for key, value in (("model.patch_size", patch), ("data.crop_size", args.img or (None if config else 224)),
                       ("data.batch_size", batch), ("model.pred_depth", args.pred_depth or (None if config else 12))):
        if value is not None:
            out.append(f"{key}={value}")
    return out


def perf_flags(args) -> dict:
    """``--perf KEY=VALUE`` (repeatable) and ``--fp8`` as perf.* settings, checked."""
    bad = [kv for kv in args.perf if "=" not in kv]
    if bad:
        raise ConfigError(f"--perf {bad[0]}: expected KEY=VALUE, e.g. --perf optimizer=fused_tail")
    perf = dict(kv.removeprefix("perf.").split("=", 1) for kv in args.perf)
    if args.fp8:
        perf["fp8"] = args.fp8
    merge(PerfConfig(), dict(perf), "perf.")  # a wrong key or value stops here, before any work
    return perf


def variants(cfg: Config, masks: tuple, paths: str, perf: dict) -> list[Config]:
    """The configs one ``bench`` command times: for each mask mode (``()``: the config's own), first
    the config as given (with no perf key set: ``"perf": "defaults"``, the step ``ijepa-fast train``
    runs), then the plain path (``paths`` plain or both: ``perf.preset=plain``, the reference
    kernels, the padded layout) and the ``--perf`` / ``--fp8`` variant."""
    out = []
    for mode in masks or (cfg.mask.mode,):
        base = dataclasses.replace(cfg, mask=dataclasses.replace(cfg.mask, mode=mode))
        out.append(base)
        if paths in ("plain", "both"):
            model = dataclasses.replace(base.model, kernels="reference", layout="padded")
            out.append(dataclasses.replace(base, model=model, perf=PerfConfig(preset="plain")))
        if perf:
            fast = copy.deepcopy(base)
            merge(fast.perf, dict(perf), "perf.")
            out.append(fast)
    return out


def run_config(args, cfg: Config, device: torch.device, config: str | None, overrides: list[str]) -> int:
    """``ijepa-fast bench [CONFIG] [KEY=VALUE ...]``: one JSON line per config of ``variants`` (see
    there), each timed by ``measure``; ``cfg``: the loaded config (with the shortcut flags applied)."""
    perf = perf_flags(args)
    masks = () if config and not args.masks else ("reference", "default") if args.masks in (None, "both") \
        else (args.masks,)
    peak = matmul_peak_tflops(device)
    for c in variants(cfg, masks, args.paths or ("fast" if config else "both"), perf):
        row = measure(c, device=device, steps=args.steps, warmup=args.warmup, repeats=args.repeats, peak_tflops=peak)
        row.update(config=config or "(flags)", overrides=overrides)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


def run_suite_file(args, overrides: list[str]) -> int:
    """``ijepa-fast bench --suite FILE.yaml [KEY=VALUE ...] [--out NAME]``: every entry of the suite
    (its overrides, then these), timed as ``bench CONFIG`` times one (``step.measure``, ``--steps``,
    ``--warmup``, ``--repeats``), each in its own try, with a progress bar; the rows as JSON lines
    on stdout as measured, then NAME.jsonl, .csv, .md and .png (``compare.write_report``)."""
    for text in overrides:  # a wrong key or value in the command's overrides stops here, before any work
        merge(Config(), parse_override(text))
    skipped: list[str] = []
    entries = read_suite(args.suite, skipped=skipped)
    for note in skipped:
        print(f"note: {note}", file=sys.stderr)
    device = resolve_device(args.device or "auto")
    peak = matmul_peak_tflops(device)

    def one(entry: SuiteEntry) -> list[dict]:
        cfg = load_config(entry.config, [*entry.overrides, *overrides])
        if entry.step == "released":
            rows = released_rows(cfg, steps=args.steps, warmup=args.warmup, device=str(device))
            rows = [{**r, **row_metadata(cfg.to_dict(), str(device))} for r in rows]
        else:
            rows = [measure(cfg, device=device, steps=args.steps, warmup=args.warmup, repeats=args.repeats,
                            peak_tflops=peak)]
        for r in rows:
            print(json.dumps({"config": entry.config, "label": entry.label, **r}), flush=True)
        return rows

    rows = run_suite(entries, one, progress=True)
    out = args.out or Path(args.suite).stem
    run = run_label(rows, Path(out).name)
    rows = [{**r, "run": run} for r in rows]
    failed = [r for r in rows if r.get("error")]
    for r in failed:
        print(f"{r['label']}: {r['error']}", file=sys.stderr, flush=True)
    paths = write_report(rows, out, title=f"Benchmark suite {Path(args.suite).name}",
                         command="ijepa-fast " + " ".join(args.argv))
    print(f"{len(rows)} rows ({len(failed)} with an error) on {row_metadata(None, str(device))['card']} -> "
          + ", ".join(map(str, paths.values())))
    return 1 if rows and len(failed) == len(rows) else 0
