"""Benchmark suites: window statistics, row metadata, suite files, the suite loop, merging runs of
two cards into one page, CSV and chart, and the GPU-hours of the published recipes."""
import csv
import json
import random
import statistics

import pytest
import torch
from conftest import ROOT

from ijepa_fast.bench.compare import markdown_page, merge_reports, write_report
from ijepa_fast.bench.report import PUBLISHED_HOURS, RECIPE_GPUS, RECIPES, gpu_hours, recipe_hours
from ijepa_fast.bench.step import PUBLISHED_BATCH
from ijepa_fast.bench.suite import SuiteEntry, config_hash, read_suite, row_metadata, run_suite, window_stats
from ijepa_fast.cli import main
from ijepa_fast.config import load_config
from ijepa_fast.errors import ConfigError

SUITE = ROOT / "benchmarks" / "suites" / "recipes.yaml"


def test_window_stats_by_hand():
    values = [random.uniform(100, 200) for _ in range(random.randint(2, 7))]
    s = window_stats(values)
    assert s["median"] == statistics.median(values) and s["repeats"] == len(values)
    assert s["min"] == min(values) and s["max"] == max(values)
    assert abs(s["spread"] - (max(values) - min(values)) / statistics.median(values)) < 1e-12
    assert window_stats([42.0])["spread"] == 0.0
    with pytest.raises(ValueError):
        window_stats([])


def test_config_hash_names_the_resolved_settings():
    a = load_config("in1k_vith14_ep300").to_dict()
    shuffled = dict(reversed(list(a.items())))
    assert config_hash(a) == config_hash(shuffled) and len(config_hash(a)) == 12
    b = load_config("in1k_vith14_ep300", ["data.batch_size=64"]).to_dict()
    assert config_hash(a) != config_hash(b)


def test_row_metadata_on_this_machine():
    resolved = load_config("demo_cpu").to_dict()
    meta = row_metadata(resolved, "cpu")
    assert meta["torch"] == torch.__version__ and meta["cuda"] == torch.version.cuda
    assert "cores" in meta["card"] and meta["driver"] is None
    assert meta["config_hash"] == config_hash(resolved) and meta["commit"]
    assert "config_hash" not in row_metadata(None, "cpu")


def test_shipped_suite_lists_the_published_recipes(tmp_path):
    entries = read_suite(SUITE, root=tmp_path)  # no .bench_ref/: no released step
    assert [e.config for e in entries] == ["in1k_vitb16", "in1k_vitl16", "in1k_vith14_ep300", "in22k_vitg16_ep44"]
    for e in entries:
        cfg = load_config(e.config, e.overrides)
        assert cfg.data.batch_size == PUBLISHED_BATCH[cfg.model.name]  # each at its recipe's per-GPU batch
        assert cfg.data.global_batch == 2048
        assert e.step == "ijepa-fast"
    (tmp_path / ".bench_ref").mkdir()
    (tmp_path / ".bench_ref" / "reference_step.py").write_text("")
    with_ref = read_suite(SUITE, root=tmp_path)
    assert len(with_ref) == 5 and with_ref[-1].step == "released"


@pytest.mark.parametrize("text, what", [
    ("runs: []\n", "non-empty 'runs:'"),
    ("runs:\n  - overrides: [a=1]\n", "needs a 'config'"),
    ("runs:\n  - config: demo_cpu\n    overides: [a=1]\n", "unknown keys ['overides']"),
    ("runs:\n  - config: demo_cpu\n    overrides: [data.batch_size]\n", "key=value"),
    ("runs:\n  - config: demo_cpu\n    step: ours\n", "runs[0].step"),
    ("runs: [demo_cpu\n", "not valid YAML"),
])
def test_bad_suite_files_say_what_to_fix(tmp_path, text, what):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=r".*" + what.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        read_suite(p)


def test_suite_overrides_as_a_mapping(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("runs:\n  - demo_cpu\n  - config: demo_cpu\n    overrides: {data.batch_size: 8}\n    label: small\n")
    plain, small = read_suite(p)
    assert (plain.config, plain.overrides, plain.label) == ("demo_cpu", [], "demo_cpu")
    assert small.overrides == ["data.batch_size=8"] and small.label == "small"
    assert load_config(small.config, small.overrides).data.batch_size == 8


def test_run_suite_keeps_going_past_a_failure():
    entries = [SuiteEntry("a", ["x=1"], "A"), SuiteEntry("b", [], "B"), SuiteEntry("c", [], "C")]
    seen = []

    def measure(entry):
        seen.append(entry.config)
        if entry.config == "b":
            raise RuntimeError("out of memory\nmore detail")
        return [{"images_per_s": 1.0, "masks": m} for m in ("reference", "default")]

    rows = run_suite(entries, measure, progress=False)
    assert seen == ["a", "b", "c"]
    assert [r["config"] for r in rows] == ["a", "a", "b", "c", "c"]
    assert rows[2]["error"] == "RuntimeError: out of memory" and rows[2]["label"] == "B"
    assert rows[0]["overrides"] == ["x=1"] and "error" not in rows[0]


def _row(card, commit, model, patch, batch, ips, **kw):
    w = window_stats([ips * f for f in (0.98, 1.0, 1.03)])
    return {"bench": "step", "model": model, "patch": patch, "img": 224, "batch": batch, "masks": "reference",
            "fast": True, "images_per_s": ips, "windows": w, "card": card, "commit": commit, "torch": "2.13.0",
            "cuda": "13.0", "triton": "3.5.0", "driver": "580.1", "config_hash": "abc123def456", "date": "2026-12-04",
            **kw}


def _two_cards(tmp_path):
    h100 = [_row("NVIDIA H100 80GB HBM3", "1111111", "vit_huge", 14, 128, 620.0, config="in1k_vith14_ep300"),
            _row("NVIDIA H100 80GB HBM3", "1111111", "vit_base", 16, 256, 2900.0, config="in1k_vitb16"),
            {"bench": "reference_step", "model": "vit_huge", "patch": 14, "batch": 128, "variant": "released",
             "img_per_s": 270.0, "gpu": "NVIDIA H100 80GB HBM3", "commit": "1111111"},
            {"config": "in22k_vitg16_ep44", "label": "ViT-g/16", "error": "OutOfMemoryError: CUDA out of memory"}]
    h200 = [_row("NVIDIA H200", "2222222", "vit_huge", 14, 128, 700.0, config="in1k_vith14_ep300"),
            _row("NVIDIA H200", "2222222", "vit_huge", 14, 128, 500.0, config="in1k_vith14_ep300", fast=False)]
    a, b = tmp_path / "h100.jsonl", tmp_path / "h200.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in h100))
    b.write_text("\n".join(json.dumps(r) for r in h200) + "\n\n")
    return a, b


def test_merge_reports_two_cards_side_by_side(tmp_path):
    a, b = _two_cards(tmp_path)
    rows = merge_reports([a, b])
    assert len(rows) == 6
    runs = list(dict.fromkeys(r["run"] for r in rows))
    assert runs == ["NVIDIA H100 80GB HBM3 @ 1111111", "NVIDIA H200 @ 2222222"]
    page = markdown_page(rows)
    for run in runs:
        assert f"| {run} |" in page
    assert "released step" in page and "error: OutOfMemoryError" in page
    assert "5.0% (" in page  # the spread of the three windows: (1.03 - 0.98) / 1.0
    # GPU-hours at the fastest fast-path row per run: 700 images/s on the H200, not the plain path's 500
    h = recipe_hours("in1k_vith14_ep300", 700.0)
    assert f"{h['gpu_hours']:,.1f}" in page and f"{h['hours']:,.1f} on 16" in page
    assert f"{recipe_hours('in1k_vith14_ep300', 500.0)['gpu_hours']:,.1f}" not in page
    assert "1,150 A100-hours" in page
    # the same card and commit twice: the file names tell them apart
    c = tmp_path / "again.jsonl"
    c.write_text(a.read_text())
    assert len({r["run"] for r in merge_reports([a, c])}) == 2


def test_write_report_four_files(tmp_path):
    a, b = _two_cards(tmp_path)
    rows = merge_reports([a, b])
    paths = write_report(rows, tmp_path / "out" / "cmp")
    assert {p.name for p in paths.values()} == {"cmp.jsonl", "cmp.csv", "cmp.md", "cmp.png"}
    back = [json.loads(line) for line in paths["jsonl"].read_text().splitlines()]
    assert back == rows
    table = list(csv.DictReader(paths["csv"].open()))
    assert len(table) == len(rows) and table[0]["card"] == "NVIDIA H100 80GB HBM3"
    assert float(table[0]["images_per_s"]) == 620.0 and float(table[0]["images_per_s_max"]) == 620.0 * 1.03
    assert table[2]["step"].startswith("released step") and table[2]["images_per_s"] == "270.0"
    assert table[3]["error"].startswith("OutOfMemoryError")
    import matplotlib.image

    img = matplotlib.image.imread(paths["png"])
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300
    assert img[..., :3].std() > 0.01  # bars drawn, not an empty canvas


def test_cli_report_merges_runs(tmp_path, capsys):
    a, b = _two_cards(tmp_path)
    assert main(["bench", "--report", str(a), str(b), "--out", str(tmp_path / "page")]) == 0
    assert "6 rows of 2 run(s)" in capsys.readouterr().out
    assert "NVIDIA H200 @ 2222222" in (tmp_path / "page.md").read_text()
    assert main(["bench", "--report", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\nnot json\n')
    assert main(["bench", "--report", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_recipe_hours_as_users_count_them():
    ips = random.uniform(100, 3000)
    for name, (_, _, _, epochs, n) in RECIPES.items():
        h = recipe_hours(name, ips)
        assert abs(h["gpu_hours"] - epochs * n / ips / 3600) < 0.06
        assert abs(h["hours"] - epochs * n / ips / 3600 / RECIPE_GPUS[name]) < 0.06
        assert ("published_gpu_hours" in h) == (name in PUBLISHED_HOURS)
    # the paper's figure: ViT-H/14 on ImageNet-1K in under 72 h on 16 A100s
    assert recipe_hours("in1k_vith14_ep300", ips)["published_gpu_hours"] == pytest.approx(16 * 72, rel=0.01)
    assert set(gpu_hours(ips, "vit_base", 16)) == {"in1k_vitb16"}
