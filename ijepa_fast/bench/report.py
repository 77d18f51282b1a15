"""The step benchmark's report: MFU against a per-card spec peak, the throughput goals, GPU-hours
per published recipe, and the markdown table (``benchmarks/bench_step.py --md``).

Rows are the JSON objects of ``ijepa_fast.bench.step.run`` (``bench: step``) and of the released step
(``bench: reference_step``, from ``.bench_ref/reference_step.py``; ``masks`` says whether it was fed
ijepa-fast's reference-mode masks, the equal-work comparison, or drew its own).
"""
from __future__ import annotations

# dense bf16 tensor-core peak of the card's specification, TFLOP/s, by torch.cuda.get_device_name()
SPEC_PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0,  # H100 SXM
    "NVIDIA H200": 989.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
}
EQUAL_MASKS = "ijepa-fast reference mode"  # the released step fed our masks: the same tokens in every step

# published recipes: (model, patch, resolution, epochs, images in the dataset); the ViT-B/16 and L/16
# ones are StoP's I-JEPA configs (configs/in1k_vitb16.yaml, in1k_vitl16.yaml), the others the release's
RECIPES = {
    "in1k_vitb16": ("vit_base", 16, 224, 600, 1_281_167),
    "in1k_vitl16": ("vit_large", 16, 224, 600, 1_281_167),
    "in1k_vith14_ep300": ("vit_huge", 14, 224, 300, 1_281_167),
    "in1k_vith16-448_ep300": ("vit_huge", 16, 448, 300, 1_281_167),
    "in22k_vith14_ep66": ("vit_huge", 14, 224, 66, 14_197_122),
    "in22k_vitg16_ep44": ("vit_giant", 16, 224, 44, 14_197_122),
}
# the GPUs each recipe was published on (global batch 2048 in every one)
RECIPE_GPUS = {"in1k_vitb16": 32, "in1k_vitl16": 32, "in1k_vith14_ep300": 16, "in1k_vith16-448_ep300": 128,
               "in22k_vith14_ep66": 64, "in22k_vitg16_ep44": 128}
# published training cost where the paper gives one: (GPU-hours, card, what was reported)
PUBLISHED_HOURS = {"in1k_vith14_ep300": (1150.0, "A100", "under 72 h on 16 A100s (Assran et al. 2023)")}

# (label, model, patch, batch, masks, fp8 of our row, minimum speed-up over the released step, extra checks)
GOALS = [
    ("ViT-H/14 b128, reference masks, bf16", "vit_huge", 14, 128, "reference", None, 2.2,
     {"mfu": 0.52, "peak_mem_gib": 30.0}),
    ("ViT-H/14 b128, default masks, bf16", "vit_huge", 14, 128, "default", None, 1.75, {}),
    ("ViT-B/16 b256, reference masks, bf16", "vit_base", 16, 256, "reference", None, 2.5, {}),
    ("ViT-H/14 b128, reference masks, FP8", "vit_huge", 14, 128, "reference", "rowwise", 2.5, {}),
]


def spec_peak(gpu: str | None) -> float | None:
    """The card's dense bf16 spec peak (TFLOP/s), or None for a card not in the table."""
    return SPEC_PEAK_TFLOPS.get(gpu or "")


def add_spec_mfu(row: dict) -> dict:
    """``mfu_spec``: model TFLOP/s over the card's spec peak (rows of unknown cards keep only ``mfu``)."""
    peak = spec_peak(row.get("gpu"))
    if peak and row.get("tflops") is not None:
        row["spec_peak_tflops"] = peak
        row["mfu_spec"] = round(row["tflops"] / peak, 3)
    return row


def gpu_hours(images_per_s: float, model: str, patch: int, img: int = 224) -> dict:
    """Projected GPU-hours of each published recipe of this model at ``images_per_s`` on one GPU."""
    return {name: recipe_hours(name, images_per_s)["gpu_hours"]
            for name, (m, p, r, _, _) in RECIPES.items() if (m, p, r) == (model, patch, img) and images_per_s}


def recipe_hours(name: str, images_per_s: float) -> dict:
    """The whole run of published recipe ``name`` at ``images_per_s`` per GPU, as users count it:
    ``gpu_hours`` = epochs x images / images-per-second / 3600 (one GPU's time, summed over GPUs),
    ``hours`` = that over the recipe's GPU count (wall-clock on that many cards, perfect scaling
    assumed), and the published figure where the paper gives one."""
    _, _, _, epochs, n = RECIPES[name]
    gpus = RECIPE_GPUS[name]
    total = epochs * n / images_per_s / 3600
    out = {"recipe": name, "epochs": epochs, "images": n, "gpus": gpus, "gpu_hours": round(total, 1),
           "hours": round(total / gpus, 1)}
    if name in PUBLISHED_HOURS:
        out["published_gpu_hours"], out["published_card"], out["published"] = PUBLISHED_HOURS[name]
    return out


def released(refs: list[dict], model: str, patch: int, batch: int) -> dict | None:
    """The released step as shipped (not the compiled variant) for this model; fed our masks if measured so."""
    cands = [r for r in refs if r.get("model") == model and int(r.get("patch", 0)) == patch
             and int(r.get("batch", 0)) == batch and r.get("variant") == "released" and r.get("img_per_s")]
    cands.sort(key=lambda r: r.get("masks") != EQUAL_MASKS)
    return cands[0] if cands else None


def peak_gib(row: dict) -> float | None:
    """The row's peak memory (GiB), or None where it was not measured truthfully: a CUDA-graph row
    whose peak was read as allocated memory (a captured graph's pool is not counted as allocated on
    replay; rows since record the reserved memory there, marked ``peak_mem_kind``)."""
    graphs = (row.get("perf_resolved") or {}).get("cuda_graphs") is True
    return None if graphs and not row.get("peak_mem_kind") else row.get("peak_mem_gib")


def _check_value(row: dict, key: str):
    return peak_gib(row) if key == "peak_mem_gib" else row.get(key)


def ours(rows: list[dict], model: str, patch: int, batch: int, masks: str, fp8: str | None,
         checks: dict | None = None) -> dict | None:
    """Our fast-path row for this setting; among several variants (``--perf``), the fastest of those
    that pass ``checks`` (MFU at least, peak memory at most), else the fastest."""
    cands = [r for r in rows
             if (r.get("model"), r.get("patch"), r.get("batch"), r.get("masks")) == (model, patch, batch, masks)
             and r.get("fast") and (r.get("fp8") or None) == fp8 and r.get("images_per_s")]

    def passes(r):
        values = {k: _check_value(r, k) for k in (checks or {})}
        return all(values[k] is not None and (values[k] >= v if k == "mfu" else values[k] <= v)
                   for k, v in (checks or {}).items())

    return max(cands, key=lambda r: (passes(r), r["images_per_s"]), default=None)


def evaluate_goals(rows: list[dict], refs: list[dict]) -> list[dict]:
    """Each goal: ``status`` met / not met / not measured, and the figures behind it."""
    out = []
    for label, model, patch, batch, masks, fp8, speedup, checks in GOALS:
        mine, base = ours(rows, model, patch, batch, masks, fp8, checks), released(refs, model, patch, batch)
        goal = f">= {speedup}x the released step" + "".join(
            f", {'MFU (in-run peak)' if k == 'mfu' else 'peak'} {'>=' if k == 'mfu' else '<='} "
            f"{f'{v:.0%}' if k == 'mfu' else f'{v:g} GiB'}" for k, v in checks.items())
        g = {"goal": label, "target": goal, "status": "not measured", "figure": ""}
        if mine is None or base is None:
            g["figure"] = "no " + " and no ".join(w for w, r in (("row of ours", mine), ("released row", base))
                                                  if r is None)
            out.append(g)
            continue
        ratio = mine["images_per_s"] / base["img_per_s"]
        met = ratio >= speedup
        parts = [f"{ratio:.2f}x ({mine['images_per_s']:.0f} vs {base['img_per_s']:.0f} images/s"
                 + (", equal work)" if base.get("masks") == EQUAL_MASKS and masks == "reference" else
                    ", not equal work)")]
        for key, limit in checks.items():
            value = _check_value(mine, key)
            if value is None:
                met = None if met is not False else False
                parts.append(f"{key} not measured")
                continue
            met = met if met is None else met and (value >= limit if key == "mfu" else value <= limit)
            parts.append(f"MFU {value:.1%}" if key == "mfu" else f"peak {value:.1f} GiB")
        g["status"] = {True: "met", False: "not met", None: "not measured"}[met]
        extra = _extras(mine)
        g["figure"] = "; ".join(parts) + (f" (with {', '.join(extra)})" if extra else "")
        out.append(g)
    return out


def _extras(row: dict) -> list[str]:
    """The perf switches a row set by hand beyond bf16 weights, compile and FP8 (rows name their
    switches 'defaults', 'plain' or a list of ``key=value``; older rows list the switches on)."""
    perf = row.get("perf") or []
    if isinstance(perf, str):
        return [] if perf in ("defaults", "plain") else [perf]
    return [p for p in perf if p not in ("bf16_weights", "compile") and not p.startswith("fp8=")]


def _name(model: str, patch) -> str:
    return {"vit_tiny": "ViT-Ti", "vit_small": "ViT-S", "vit_base": "ViT-B", "vit_large": "ViT-L",
            "vit_huge": "ViT-H", "vit_giant": "ViT-g"}.get(model, model) + f"/{patch}"


def _fmt(x, pct=False) -> str:
    if x is None or x == "":
        return ""
    return f"{x:.1%}" if pct else str(x)


def table_rows(rows: list[dict], refs: list[dict]) -> list[str]:
    """One markdown line per released and per ijepa-fast row, grouped by model."""
    lines = ["| model | batch | step | masks | context tokens / image | step ms | images/s | vs released | "
             "model TFLOP/s | MFU (in-run peak) | MFU (spec peak) | peak GiB |", "|" + "---|" * 12]
    models = list(dict.fromkeys((r["model"], int(r["patch"]), int(r["batch"])) for r in refs + rows if "model" in r))
    for model, patch, batch in models:
        base = released(refs, model, patch, batch)
        for r in refs:
            if (r.get("model"), int(r.get("patch", 0)), int(r.get("batch", 0))) != (model, patch, batch):
                continue
            masks = ("reference, fed ijepa-fast's reference-mode masks (equal work)" if r.get("masks") == EQUAL_MASKS
                     else "reference, its own collator")
            if r.get("error"):
                lines.append(f"| {_name(model, patch)} | {batch} | {r.get('variant')} | | | | {r['error']} | | | | | |")
                continue
            lines.append(f"| {_name(model, patch)} | {batch} | {r.get('variant')} | {masks} | "
                         f"{_fmt(r.get('mean_ctx_tokens'))} | {r.get('step_ms')} | {r.get('img_per_s')} | "
                         f"{'1.00x' if r is base else ''} | {_fmt(r.get('achieved_tflops'))} | | | "
                         f"{_fmt(r.get('peak_mem_gib'))} |")
        for r in rows:
            if (r.get("model"), r.get("patch"), r.get("batch")) != (model, patch, batch):
                continue
            extra = _extras(r)
            step = ("ijepa-fast, recipe as shipped (perf defaults)" if r.get("perf") == "defaults" else
                    "ijepa-fast" if r.get("fast") else "ijepa-fast, plain path") + (
                f", FP8 {r['fp8']}" if r.get("fp8") else f", {_precision(r)}" if r.get("fast") else "") + (
                f", {', '.join(extra)}" if extra else "")
            if r.get("error"):
                lines.append(f"| {_name(model, patch)} | {batch} | {step} | {r.get('masks')} | | | {r['error']} "
                             "| | | | | |")
                continue
            equal = r.get("masks") == "reference" and base is not None and base.get("masks") == EQUAL_MASKS
            masks = r.get("masks") + (" (equal work)" if equal else "")
            vs = f"{r['images_per_s'] / base['img_per_s']:.2f}x" if base else ""
            lines.append(f"| {_name(model, patch)} | {batch} | {step} | {masks} | {_fmt(r.get('ctx_tokens_per_img'))} "
                         f"| {r.get('step_ms')} | {r.get('images_per_s')} | {vs} | {_fmt(r.get('tflops'))} | "
                         f"{_fmt(r.get('mfu'), True)} | {_fmt(r.get('mfu_spec'), True)} | "
                         f"{_peak_cell(r)} |")
    return lines


def _precision(row: dict) -> str:
    """The row's arithmetic as its bench recorded it; rows from before that field: bf16 on a GPU,
    fp32 on the CPU (the fast path's defaults there)."""
    if row.get("precision"):
        return "fp32" if row["precision"] == "fp32" else "bf16"
    return "fp32" if str(row.get("device", "")).startswith("cpu") else "bf16"


def _peak_cell(row: dict) -> str:
    if peak_gib(row) is None and row.get("peak_mem_gib") is not None:
        return "not measured (graph pool)"
    return _fmt(peak_gib(row)) + (" reserved" if row.get("peak_mem_kind") else "")


def hours_lines(rows: list[dict], refs: list[dict]) -> list[str]:
    """Projected GPU-hours of each published recipe, from the rows of this run."""
    lines = []
    for name, (model, patch, img, epochs, n) in RECIPES.items():
        cands = [("released", r["img_per_s"]) for r in refs if (r.get("model"), int(r.get("patch", 0))) ==
                 (model, patch) and r.get("variant") == "released" and r.get("img_per_s") and img == 224]
        cands += [(f"ijepa-fast {r['masks']} masks" + (f" FP8 {r['fp8']}" if r.get("fp8") else ""), r["images_per_s"])
                  for r in rows if (r.get("model"), r.get("patch"), r.get("img", 224)) == (model, patch, img)
                  and r.get("fast") and r.get("images_per_s")]
        if cands:
            lines.append(f"- `{name}` ({recipe_line(name)}): " + ", ".join(
                f"{who} {h['gpu_hours']:,} GPU-hours ({h['hours']:,} h on {h['gpus']})"
                for who, h in ((w, recipe_hours(name, ips)) for w, ips in cands)))
    return lines


def recipe_line(name: str) -> str:
    """'300 epochs x 1,281,167 images on 16 GPUs; published: ...' for a published recipe."""
    _, _, _, epochs, n = RECIPES[name]
    pub = PUBLISHED_HOURS.get(name)
    return (f"{epochs} epochs x {n:,} images on {RECIPE_GPUS[name]} GPUs"
            + (f"; published: {pub[2]}, about {pub[0]:,.0f} {pub[1]}-hours" if pub else ""))


def step_report(rows: list[dict], refs: list[dict], *, command: str, peak: float | None = None) -> str:
    """The markdown page: where and when, the table, the goals and the GPU-hours."""
    e = (rows + refs)[0] if rows + refs else {}
    where = e.get("gpu") or (f"{e.get('cpu')} ({e.get('cpus')} cores)" if e.get("cpu") else "unknown machine")
    versions = ", ".join(f"{k} {e[k]}" for k in ("torch", "cuda", "triton", "python") if k in e)
    spec = spec_peak(e.get("gpu"))
    lines = ["# The training step, beside the released step", "",
             f"Measured on {where}; {versions}; commit {e.get('commit', 'unknown')}; {e.get('date', '')}.",
             f"Command: `{command}`", ""]
    lines += table_rows(rows, refs)
    lines += ["", "MFU counts the model FLOPs of the tokens processed (ijepa_fast/bench/step.py) against the bf16 "
              "8192^3 "
              "matmul peak measured in the same run" + (f" ({peak:.0f} TFLOP/s)" if peak else "") + " and against "
              + (f"the card's dense bf16 spec peak ({spec:.0f} TFLOP/s, {e.get('gpu')})" if spec else
                 "no spec peak (card not in ijepa_fast/bench/report.py's table)")
              + "; FP8 rows too are against the bf16 peaks. Equal work: the released step was fed "
              "ijepa-fast's reference-mode masks (the released sampler's semantics, truncation included) for the "
              "same seed and steps, so both steps process the same tokens in every timed step; default masks "
              "keep every context whole and so do more work per image than the released step.", "", "## Goals", "",
              "| goal | target | status | figure |", "|---|---|---|---|"]
    lines += [f"| {g['goal']} | {g['target']} | {g['status']} | {g['figure']} |" for g in evaluate_goals(rows, refs)]
    hours = hours_lines(rows, refs)
    if hours:
        lines += ["", "## Projected GPU-hours per published recipe (one GPU of this kind, this run's images/s)", ""]
        lines += hours
    return "\n".join(lines) + "\n"
