"""Benchmark suites: many recipes timed in one go, and runs from several cards or commits compared.

A suite file (``benchmarks/suites/recipes.yaml``) lists configs with overrides; ``read_suite``
parses it into ``SuiteEntry`` items and ``run_suite`` turns each into rows through a callable (the
step benchmark), each in its own try, so a failure is an error row, never a lost suite. Rows are the
JSON objects of ``ijepa_fast.bench`` (``bench: step``) and of the released step (``bench:
reference_step``, ``img_per_s``). ``write_report`` writes them as JSON lines, a CSV, a markdown
page and a PNG chart (images/s per recipe, and the projected GPU-hours of each published recipe,
one bar per card or commit); ``merge_reports`` reads the JSON lines of several runs for that.

Every timed row carries ``window_stats`` of its ``--repeats`` timed windows and ``row_metadata``
(card, driver, torch, CUDA, Triton, commit, a hash of the resolved config).
"""
from __future__ import annotations

import csv
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

from .bench_report import RECIPES, _name, recipe_hours, recipe_line
from .errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("ijepa-fast", "released")
CSV_COLUMNS = ("run", "config", "label", "model", "patch", "img", "batch", "masks", "fast", "step", "images_per_s",
               "images_per_s_min", "images_per_s_max", "spread", "repeats", "step_ms", "tflops", "mfu",
               "peak_mem_gib", "card", "driver", "torch", "cuda", "triton", "commit", "config_hash", "date", "error")


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


def _cpu() -> str:
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
    meta = {"card": torch.cuda.get_device_name(torch.device(device)) if cuda else f"{_cpu()} ({cores} cores)",
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


def read_suite(path, root: Path | None = None) -> list[SuiteEntry]:
    """A suite file as entries. The file is a mapping with ``runs:``, a list whose items are a config
    name, or ``{config: NAME, overrides: [key=value, ...], label: TEXT, step: ijepa-fast | released,
    needs: PATH}``; ``needs`` drops the item when PATH (relative to ``root``, default the suite
    file's repository) does not exist (the released step needs ``.bench_ref/``). ``overrides`` may
    also be a mapping ``{key: value}``."""
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
    from .runlog import Progress

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
# reading and merging runs

def read_rows(path) -> list[dict]:
    """The rows of one JSON-lines file (blank lines skipped; a bad line is an error naming it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--report {path}: no such file (give the JSON lines a bench run wrote)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{path}:{n}: not a JSON object (expected one benchmark row per line)") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{n}: not a JSON object (expected one benchmark row per line)")
        rows.append(row)
    return rows


def run_label(rows: list[dict], fallback: str) -> str:
    """A run's name on the page and chart: its card and commit (``fallback`` when the rows name neither)."""
    first = next((r for r in rows if r.get("card") or r.get("gpu") or r.get("commit")), {})
    card = first.get("card") or first.get("gpu")
    parts = [p for p in (card, first.get("commit")) if p]
    return " @ ".join(parts) if parts else fallback


def merge_reports(paths) -> list[dict]:
    """The rows of several runs (one JSON-lines file per card or commit), each tagged ``run`` with
    its card and commit; two files of the same card and commit get their file names added."""
    runs = [(Path(p), read_rows(p)) for p in paths]
    labels = [run_label(rows, p.stem) for p, rows in runs]
    out = []
    for (p, rows), label in zip(runs, labels):
        name = f"{label} ({p.stem})" if labels.count(label) > 1 else label
        out += [{**r, "run": r.get("run") or name} for r in rows]
    return out


# ---------------------------------------------------------------------------------------------
# figures of a row

def images_per_s(row: dict) -> float | None:
    """A row's images/s (ours: ``images_per_s``; the released step's: ``img_per_s``)."""
    v = row.get("images_per_s", row.get("img_per_s"))
    return float(v) if v else None


def is_released(row: dict) -> bool:
    return row.get("bench") == "reference_step"


def step_name(row: dict) -> str:
    if is_released(row):
        return f"released step ({row.get('variant', 'released')})"
    name = "ijepa-fast" if row.get("fast", True) else "ijepa-fast, plain path"
    return name + (f", FP8 {row['fp8']}" if row.get("fp8") else "")


def setting(row: dict) -> str:
    """'ViT-H/14 224px b128' of a row (its model, resolution and batch)."""
    if "model" not in row:
        return row.get("label") or row.get("config") or "?"
    return f"{_name(row['model'], row.get('patch', '?'))} {row.get('img', 224)}px b{row.get('batch', '?')}"


def recipes_of(row: dict) -> list[str]:
    """The published recipes a row's model, patch and resolution train."""
    key = (row.get("model"), int(row.get("patch", 0) or 0), int(row.get("img", 224) or 224))
    return [name for name, (m, p, r, _, _) in RECIPES.items() if (m, p, r) == key]


def best(rows: list[dict]) -> dict[tuple[str, str, str], dict]:
    """(run, setting, 'released' | 'ijepa-fast') -> the fastest error-free row (plain-path rows left out)."""
    out = {}
    for r in rows:
        ips = images_per_s(r)
        if r.get("error") or not ips or (not is_released(r) and r.get("fast") is False):
            continue
        if is_released(r) and r.get("variant", "released") != "released":
            continue
        key = (r.get("run", ""), setting(r), "released" if is_released(r) else "ijepa-fast")
        if key not in out or ips > images_per_s(out[key]):
            out[key] = r
    return out


# ---------------------------------------------------------------------------------------------
# writing

def write_jsonl(rows: list[dict], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def csv_row(row: dict) -> dict:
    """One CSV line's values (``CSV_COLUMNS``) from a row of either kind."""
    w = row.get("windows") or {}
    return {"run": row.get("run", ""), "config": row.get("config", ""), "label": row.get("label", ""),
            "model": row.get("model", ""), "patch": row.get("patch", ""), "img": row.get("img", ""),
            "batch": row.get("batch", ""), "masks": row.get("masks", ""), "fast": row.get("fast", ""),
            "step": step_name(row) if not row.get("error") or "model" in row else "",
            "images_per_s": images_per_s(row) or "", "images_per_s_min": w.get("min", ""),
            "images_per_s_max": w.get("max", ""), "spread": w.get("spread", ""), "repeats": w.get("repeats", ""),
            "step_ms": row.get("step_ms", ""), "tflops": row.get("tflops", row.get("achieved_tflops", "")),
            "mfu": row.get("mfu", ""), "peak_mem_gib": row.get("peak_mem_gib", ""),
            "card": row.get("card") or row.get("gpu") or "", "driver": row.get("driver") or "",
            "torch": row.get("torch", ""), "cuda": row.get("cuda") or "", "triton": row.get("triton") or "",
            "commit": row.get("commit", ""), "config_hash": row.get("config_hash", ""), "date": row.get("date", ""),
            "error": row.get("error", "")}


def write_csv(rows: list[dict], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(csv_row(r))
    return path


def _num(x, fmt: str = ",.1f") -> str:
    return "" if x in (None, "") else format(x, fmt)


def hours_table(rows: list[dict]) -> list[str]:
    """Markdown: per published recipe and run, the whole run's GPU-hours at the best measured
    images/s, the hours on the recipe's GPU count, and the published figure where known."""
    top = best(rows)
    lines = ["| recipe | run | step | images/s per GPU | GPU-hours | hours on the recipe's GPUs | published |",
             "|---|---|---|---|---|---|---|"]
    for name in RECIPES:
        for (run, _, who), r in top.items():
            if name not in recipes_of(r):
                continue
            h = recipe_hours(name, images_per_s(r))
            pub = (f"{h['published_gpu_hours']:,.0f} {h['published_card']}-hours ({h['published']})"
                   if "published" in h else "")
            lines.append(f"| `{name}` | {run} | {who} | {_num(images_per_s(r))} | {_num(h['gpu_hours'])} | "
                         f"{_num(h['hours'])} on {h['gpus']} | {pub} |")
    return lines


def markdown_page(rows: list[dict], *, title: str = "Benchmark suite", command: str = "") -> str:
    """The page: the runs compared (card, driver, versions, commit), every row, the GPU-hours table."""
    runs = list(dict.fromkeys(r.get("run", "") for r in rows))
    lines = [f"# {title}", ""] + ([f"Command: `{command}`", ""] if command else []) + [
        "| run | card | driver | torch | CUDA | Triton | commit | date |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        e = next((r for r in rows if r.get("run", "") == run and not is_released(r) and "torch" in r),
                 next(r for r in rows if r.get("run", "") == run))
        lines.append(f"| {run} | {e.get('card') or e.get('gpu') or ''} | {e.get('driver') or ''} | "
                     f"{e.get('torch', '')} | {e.get('cuda') or ''} | {e.get('triton') or ''} | {e.get('commit', '')} "
                     f"| {e.get('date', '')} |")
    lines += ["", "## Rows", "", "| run | config | setting | step | masks | images/s (median) | spread (min-max) | "
              "step ms | MFU | peak GiB | config hash |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r.get('run', '')} | {r.get('label') or r.get('config', '')} | {setting(r)} | | | "
                         f"error: {r['error']} | | | | | |")
            continue
        w = r.get("windows") or {}
        spread = (f"{w['spread']:.1%} ({w['min']:,.1f}-{w['max']:,.1f}, {w['repeats']} windows)"
                  if w.get("repeats", 0) > 1 else "")
        mfu = r.get("mfu")
        lines.append(f"| {r.get('run', '')} | {r.get('label') or r.get('config', '')} | {setting(r)} | {step_name(r)} "
                     f"| {r.get('masks', '')} | {_num(images_per_s(r))} | {spread} | {r.get('step_ms', '')} | "
                     f"{'' if mfu is None else f'{mfu:.1%}'} | {r.get('peak_mem_gib', '')} | "
                     f"{r.get('config_hash', '')} |")
    lines += ["", "## Projected GPU-hours per published recipe", "",
              "The whole run as users count it: epochs x images / images per second per GPU (GPU-hours), and that "
              "over the GPUs the recipe was published on (hours, perfect scaling assumed), at the fastest "
              "error-free row of each run. The recipes:", ""]
    lines += [f"- `{name}`: {recipe_line(name)}" for name in RECIPES]
    lines += [""] + hours_table(rows)
    return "\n".join(lines) + "\n"


def plot_chart(rows: list[dict], path) -> Path:
    """PNG: images/s per setting (left) and projected GPU-hours per published recipe (right), one
    bar per run (card or commit) and step (ijepa-fast, the released step where measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = best(rows)
    series = list(dict.fromkeys((run, who) for run, _, who in top))
    settings = list(dict.fromkeys(s for _, s, _ in top))
    recipes = [n for n in RECIPES if any(n in recipes_of(r) for r in top.values())]
    fig, (a, b) = plt.subplots(1, 2, figsize=(6 + 1.2 * max(len(settings), len(recipes)), 4.5))
    width = 0.8 / max(len(series), 1)
    for i, (run, who) in enumerate(series):
        ips = [images_per_s(top[(run, s, who)]) if (run, s, who) in top else 0 for s in settings]
        a.bar([x + i * width for x in range(len(settings))], ips, width, label=f"{run}: {who}")
        hours = []
        for n in recipes:
            r = next((top[(run, s, who)] for s in settings if (run, s, who) in top
                      and n in recipes_of(top[(run, s, who)])), None)
            hours.append(recipe_hours(n, images_per_s(r))["gpu_hours"] if r else 0)
        b.bar([x + i * width for x in range(len(recipes))], hours, width)
    for n_i, n in enumerate(recipes):
        if n in RECIPES and "published_gpu_hours" in recipe_hours(n, 1.0):
            pub = recipe_hours(n, 1.0)
            b.hlines(pub["published_gpu_hours"], n_i - 0.1, n_i + 0.9, colors="k", linestyles="dashed",
                     label=f"published ({pub['published_card']})")
    a.set_xticks([x + 0.4 - width / 2 for x in range(len(settings))], settings, rotation=20, ha="right", fontsize=8)
    b.set_xticks([x + 0.4 - width / 2 for x in range(len(recipes))], recipes, rotation=20, ha="right", fontsize=8)
    a.set_ylabel("images/s per GPU")
    b.set_ylabel("projected GPU-hours, whole run")
    a.set_title("throughput")
    b.set_title("GPU-hours per published recipe")
    if series:
        a.legend(fontsize=7)
    if b.get_legend_handles_labels()[0]:
        b.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(rows: list[dict], out, *, title: str = "Benchmark suite", command: str = "") -> dict[str, Path]:
    """``out``.jsonl, .csv, .md and .png (``out``: a path without suffix); returns the four paths."""
    out = Path(out)
    base = out.with_suffix("") if out.suffix in (".jsonl", ".csv", ".md", ".png") else out
    paths = {"jsonl": write_jsonl(rows, base.with_name(base.name + ".jsonl")),
             "csv": write_csv(rows, base.with_name(base.name + ".csv"))}
    md = base.with_name(base.name + ".md")
    md.write_text(markdown_page(rows, title=title, command=command))
    paths["md"] = md
    paths["png"] = plot_chart(rows, base.with_name(base.name + ".png"))
    return paths
