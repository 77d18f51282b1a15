"""Benchmark suites: many recipes timed in one go, each row with its statistics and metadata.

A suite file (``benchmarks/suites/recipes.yaml``) lists configs with overrides; ``read_suite``
parses it into ``SuiteEntry`` items and ``run_suite`` turns each into rows through a callable (the
step benchmark), each in its own try, so a failure is an error row, never a lost suite. Every timed
row carries ``windows`` (``window_stats`` of its ``--repeats`` timed windows' images/s) and
``row_metadata`` (card, driver, torch, CUDA, Triton, commit, a hash of the resolved config).
``bench_compare`` writes such rows, from one run or several cards and commits, as a page and chart.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]  # the checkout (ijepa_fast/bench/suite.py -> ./)
STEPS = ("ijepa-fast", "released")


# ---------------------------------------------------------------------------------------------
# one row's figures and metadata

def window_stats(values: list[float]) -> dict:
    """The median of ``--repeats`` timed windows' figures (e.g. images/s of each window) and their
    spread: min, max, and (max - min) / median. One window has a spread of 0."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("window_stats needs at least one timed window")
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / med if med else 0.0, "repeats": len(values)}


def config_hash(resolved: dict) -> str:
    """12 hex digits naming a resolved config (``Config.to_dict()``): equal settings, equal hash,
    whatever the order of the keys."""
    text = json.dumps(resolved, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def commit(root: Path = ROOT) -> str:
    """The checkout's commit (+dirty); ``IJEPA_FAST_COMMIT`` names it where the copy has no .git."""
    if os.environ.get("IJEPA_FAST_COMMIT"):
        return os.environ["IJEPA_FAST_COMMIT"]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        if rev.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def _driver() -> str | None:
    """The NVIDIA driver version (from the kernel module), or None."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    for word in text.split():
        if word.count(".") in (1, 2) and word.replace(".", "").isdigit():
            return word
    return None


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def row_metadata(resolved: dict | None = None, device: str = "cpu") -> dict:
    """Where and on what a row was measured: ``card`` (the GPU's name, or the CPU's with its core
    count), ``driver``, ``torch``, ``cuda``, ``triton``, ``commit``, ``date`` and ``config_hash``
    of ``resolved`` (a ``Config.to_dict()``; absent without one). Unknown items are None."""
    from importlib import metadata

    import torch

    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = None
    meta = {"card": torch.cuda.get_device_name(torch.device(device)) if cuda else f"{cpu_name()} ({cores} cores)",
            "driver": _driver() if cuda else None, "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton, "python": platform.python_version(), "commit": commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}
    if resolved is not None:
        meta["config_hash"] = config_hash(resolved)
    return meta


# ---------------------------------------------------------------------------------------------
# suite files and running them

@dataclass
class SuiteEntry:
    """One item of a suite: a config (path or built-in name), its overrides, a label for the page, and
    the step to time: ``ijepa-fast`` or ``released`` (the released step, from ``.bench_ref/``)."""
    config: str
    overrides: list[str] = field(default_factory=list)
    label: str = ""
    step: str = "ijepa-fast"


def read_suite(path, root: Path | None = None, skipped: list | None = None) -> list[SuiteEntry]:
    """A suite file as entries. The file is a mapping with ``runs:``, a list whose items are a config
    name, or ``{config: NAME, overrides: [key=value, ...], label: TEXT, step: ijepa-fast | released,
    needs: PATH}``; ``needs`` drops the item when PATH (relative to ``root``, default the suite
    file's repository) does not exist (the released step needs ``.bench_ref/``), adding a note
    saying so to ``skipped`` when given. ``overrides`` may also be a mapping ``{key: value}``."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"suite {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"suite {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"suite {path}: expected a mapping with a non-empty 'runs:' list of configs")
    root = Path(root) if root is not None else _repo_of(path)
    out = []
    for i, item in enumerate(runs):
        if isinstance(item, str):
            item = {"config": item}
        if not isinstance(item, dict) or not isinstance(item.get("config"), str):
            raise ConfigError(f"suite {path}: runs[{i}] needs a 'config' (a YAML path or built-in name), got {item!r}")
        unknown = set(item) - {"config", "overrides", "label", "step", "needs"}
        if unknown:
            raise ConfigError(f"suite {path}: runs[{i}] has unknown keys {sorted(unknown)}; "
                              f"use config, overrides, label, step, needs")
        if item.get("step", "ijepa-fast") not in STEPS:
            raise ConfigError(f"suite {path}: runs[{i}].step is {item['step']!r}; use one of {', '.join(STEPS)}")
        if item.get("needs") and not (root / item["needs"]).exists():
            if skipped is not None:
                skipped.append(f"{item.get('label') or item['config']}: left out, {root / item['needs']} does "
                               f"not exist")
            continue
        over = item.get("overrides") or []
        if isinstance(over, dict):
            over = [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in over.items()]
        if not isinstance(over, list) or any(not isinstance(o, str) or "=" not in o for o in over):
            raise ConfigError(f"suite {path}: runs[{i}].overrides must be key=value strings, got {over!r}")
        out.append(SuiteEntry(item["config"], list(over), str(item.get("label") or Path(item["config"]).stem),
                              item.get("step", "ijepa-fast")))
    return out


def _repo_of(path: Path) -> Path:
    """The folder above the suite's ``benchmarks/`` (the repository), else the suite's own folder."""
    for parent in path.resolve().parents:
        if parent.name == "benchmarks":
            return parent.parent
    return path.resolve().parent


def run_suite(entries: list[SuiteEntry], measure: Callable[[SuiteEntry], list[dict]],
              progress: bool = True) -> list[dict]:
    """``measure(entry)`` -> rows for each entry, each in its own try: an exception becomes one row
    ``{config, label, overrides, error}`` and the suite goes on. Every row gets the entry's config and label."""
    from ..runlog.output import Progress

    rows, bar = [], Progress(len(entries), 0, progress)
    for entry in entries:
        tag = {"config": entry.config, "label": entry.label, "overrides": list(entry.overrides)}
        try:
            got = [{**tag, **r} for r in measure(entry)]
        except Exception as e:  # noqa: BLE001  (one failed item must not lose the suite)
            got = [{**tag, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}]
        rows += got
        bar.update(1)
    bar.close()
    return rows


# ---------------------------------------------------------------------------------------------
# the released step

def released_step(model: str, patch: int, batch: int, *, steps: int, warmup: int, pred_depth: int, img: int,
                  device: str, extra: tuple[str, ...] = (), root: Path = ROOT):
    """The released step timed in a subprocess by ``benchmarks/reference_equal_work.py`` (fed
    ijepa-fast's reference-mode masks unless ``extra`` holds ``--own-masks``): its rows, named as the
    report reads them, and the finished process (for its exit status and error output)."""
    import sys

    cmd = [sys.executable, str(root / "benchmarks" / "reference_equal_work.py"), "--model", model, "--patch",
           str(patch), "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup),
           "--pred-depth", str(pred_depth), "--crop", str(img), "--device", device, *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OUT": ""})
    rows, tokens = [], None
    variant = "released + sdpa + compile" if "--compile" in extra else "released"
    for line in p.stdout.splitlines():
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        if r.get("what") == "official_mask_collator":
            tokens = r.get("mean_ctx_tokens")
        elif r.get("what") == "official_train_step":
            rows.append({**r, "bench": "reference_step", "variant": variant, "pred_depth": pred_depth, "img": img,
                         "mean_ctx_tokens": round(tokens, 1) if tokens is not None else None})
    return rows, p


def released_rows(cfg, *, steps: int, warmup: int, device: str, root: Path = ROOT) -> list[dict]:
    """The released step's rows for a config's model, patch, batch, predictor depth and resolution,
    fed ijepa-fast's reference-mode masks (equal work), timed in a subprocess by
    ``benchmarks/reference_equal_work.py``; a ConfigError when ``.bench_ref/`` lacks the released code."""
    if not (root / ".bench_ref" / "reference_step.py").exists():
        raise ConfigError(f"the released step needs the released code in {root / '.bench_ref'} "
                          f"(see benchmarks/prepare_device.sh)")
    m = cfg.model
    rows, p = released_step(m.name, m.patch_size, cfg.data.batch_size, steps=steps, warmup=warmup,
                            pred_depth=m.pred_depth, img=cfg.data.crop_size, device=device, root=root)
    if not rows:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the released step gave no row (exit {p.returncode}): {tail}")
    return rows
