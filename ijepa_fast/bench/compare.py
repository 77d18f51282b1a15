"""Benchmark runs compared: the rows of one run, or of several cards or commits side by side, as
JSON lines, a CSV, a markdown page and a PNG chart (images/s per setting, and the projected
GPU-hours of each published recipe, one bar per card or commit).

Rows are the JSON objects of ``ijepa_fast.bench.step`` (``bench: step``, ``images_per_s``), of the
released step (``bench: reference_step``, ``img_per_s``) and the error rows of ``bench_suite``.
``merge_reports`` reads the JSON lines of several runs and tags each row with its ``run`` (card
and commit); ``write_report`` writes the four files. ``ijepa-fast bench --report`` is the two.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import ConfigError
from .report import RECIPES, _name, recipe_hours, recipe_line

CSV_COLUMNS = ("run", "config", "label", "model", "patch", "img", "batch", "masks", "fast", "step", "images_per_s",
               "images_per_s_min", "images_per_s_max", "spread", "repeats", "step_ms", "tflops", "mfu",
               "peak_mem_gib", "card", "driver", "torch", "cuda", "triton", "commit", "config_hash", "date", "error")


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
    its card and commit; two files of the same card and commit get their file names added. A row
    that already names its run (a suite's file, a merged page's) keeps it, unless it is that
    shared card and commit."""
    runs = [(Path(p), read_rows(p)) for p in paths]
    labels = [run_label(rows, p.stem) for p, rows in runs]
    out = []
    for (p, rows), label in zip(runs, labels):
        name = f"{label} ({p.stem})" if labels.count(label) > 1 else label
        out += [{**r, "run": name if r.get("run") in (None, "", label) else r["run"]} for r in rows]
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
