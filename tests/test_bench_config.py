"""``ijepa-fast bench CONFIG [key=value ...]`` and ``bench --suite``: the step of a run config, timed in
``--repeats`` windows (median, spread, metadata), a suite of configs in one command (JSON lines, CSV,
markdown, PNG, each entry in its own try), and two suite runs merged into one page. Tiny models, a
couple of steps: the figures mean nothing on the CPU, the rows' make-up is what is checked."""
import csv
import json

import pytest
import torch
from conftest import ROOT

from ijepa_fast.bench.compare import merge_reports, write_report
from ijepa_fast.bench.step import measure, timed_config
from ijepa_fast.bench.suite import config_hash, released_rows
from ijepa_fast.cli import main
from ijepa_fast.config import load_config
from ijepa_fast.errors import ConfigError
from ijepa_fast.training.engine import Engine
from ijepa_fast.training.schedules import Schedules

TINY = ["model.name=custom", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.pred_depth=1",
        "model.pred_dim=32", "model.patch_size=8", "data.crop_size=96", "data.batch_size=2"]
QUICK = ["--steps", "2", "--warmup", "1", "--device", "cpu"]
RECIPE = str(ROOT / "configs" / "in1k_vitb16.yaml")


def _json_rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_bench_config_rows_have_median_spread_and_metadata(capsys):
    assert main(["bench", RECIPE, *TINY, *QUICK, "--repeats", "3"]) == 0
    (row,) = _json_rows(capsys.readouterr().out)  # with a CONFIG: the config's masks, the step as configured
    w = row["windows"]
    assert w["repeats"] == 3 and w["min"] <= w["median"] <= w["max"]
    assert w["spread"] == pytest.approx((w["max"] - w["min"]) / w["median"])
    assert row["images_per_s"] == pytest.approx(w["median"], abs=0.05)
    assert row["step_ms"] == pytest.approx(2 / w["median"] * 1e3, abs=0.01)  # batch 2
    cfg = load_config(RECIPE, TINY)
    assert row["config_hash"] == config_hash(cfg.to_dict())
    assert (row["model"], row["patch"], row["img"], row["pred_depth"]) == ("custom", 8, 96, 1)
    assert row["masks"] == cfg.mask.mode == "reference" and row["perf"] == "defaults" and row["fast"] is True
    assert row["torch"] == torch.__version__ and row["cuda"] == torch.version.cuda and "cores" in row["card"]
    assert row["commit"] and row["triton"] and row["date"] and "driver" in row
    # the recipe's global batch of 2048: the row is one device's step of data.batch_size images
    assert row["batch"] == 2 and row["accum_steps"] == 1 and row["global_batch"] == 2048
    assert row["devices_at_global_batch"] == 1024
    assert row["config"] == RECIPE and row["overrides"] == TINY


def test_bench_times_the_step_train_builds():
    """The loss of the bench's first timed step is the loss of the first step of an Engine built from
    the same config (the trainer's assembler), on the same masks and images."""
    cfg = load_config(RECIPE, TINY + ["data.global_batch=null", "optim.accum_steps=2"])
    row = measure(cfg, device="cpu", steps=1, warmup=0, repeats=1)
    assert row["accum_steps"] == 2 and row["global_batch"] is None and row["devices_at_global_batch"] is None
    engine = Engine.from_config(cfg, device="cpu", schedules=Schedules.from_config(cfg.optim, 1000))
    masks = engine.masks(2, 0)
    images = torch.randn(2, 3, 96, 96)
    assert row["loss"] == round(engine.step(images, 0, masks).loss, 4)
    assert timed_config(load_config(RECIPE, TINY)).data.global_batch is None


def test_bench_flags_are_shortcuts_that_build_a_config(capsys):
    """Without a CONFIG the flags build one (both mask modes, defaults and plain path); with one, the
    flags override it (key=value overrides win over both) and --masks / --paths add rows."""
    tiny = [o for o in TINY if not o.startswith("model.pred_depth")]
    assert main(["bench", RECIPE, *tiny, *QUICK, "--repeats", "1", "--masks", "both", "--paths", "both",
                 "--pred-depth", "2"]) == 0
    rows = _json_rows(capsys.readouterr().out)
    assert [(r["masks"], r["perf"]) for r in rows] == [("reference", "defaults"), ("reference", "plain"),
                                                       ("default", "defaults"), ("default", "plain")]
    assert all(r["pred_depth"] == 2 and r["windows"]["repeats"] == 1 for r in rows)
    assert rows[1]["fast"] is False and rows[1]["kernels"] == "reference"
    assert main(["bench", "--model", "vit_tiny", "--batch", "2", "--pred-depth", "1", "--masks", "default",
                 "--paths", "fast", "--perf", "optimizer=fused_tail", *QUICK, "--repeats", "2", "--steps", "1",
                 "--warmup", "0"]) == 0
    rows = _json_rows(capsys.readouterr().out)
    assert [r["perf"] for r in rows] == ["defaults", ["optimizer=fused_tail"]]
    want = load_config(None, ["model.name=vit_tiny", "model.patch_size=16", "data.crop_size=224",
                              "data.batch_size=2", "model.pred_depth=1", "mask.mode=default"])
    assert rows[0]["config_hash"] == config_hash(want.to_dict())
    assert rows[1]["optimizer"] == "fused_tail" and all(r["windows"]["repeats"] == 2 for r in rows)


@pytest.mark.parametrize("argv, fragment", [
    (["bench", "no_such_config"], "no_such_config"),
    (["bench", RECIPE, "model.embd_dim=32"], "model.embd_dim"),
    (["bench", RECIPE, "data.batch_size=0"], "data.batch_size"),
    (["bench", RECIPE, "data.batch_size=5000"], "data.batch_size=5000"),
    (["bench", RECIPE, "--repeats", "0"], "--repeats"),
    (["bench", RECIPE, "--suite", str(ROOT / "benchmarks" / "suites" / "recipes.yaml")], "drop"),
    (["bench", "--suite", "missing.yaml"], "missing.yaml does not exist"),
    (["bench", "--suite", str(ROOT / "benchmarks" / "suites" / "recipes.yaml"), "model.embd_dim=32"],
     "model.embd_dim"),
])
def test_bench_bad_config_or_override_is_one_line(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], err
    assert not list(tmp_path.iterdir())


def test_suite_gives_four_files_and_keeps_going_past_a_failure(tmp_path, capsys):
    suite = tmp_path / "tiny.yaml"
    suite.write_text("runs:\n"
                     "  - config: in1k_vitb16\n    label: B\n"
                     "  - config: in1k_vith14_ep300\n    label: broken\n    overrides: [optim.accum_steps=3]\n"
                     "  - config: in1k_vith14_ep300\n    label: H\n    overrides: {mask.mode: default}\n"
                     "  - config: in1k_vith14_ep300\n    label: released\n    step: released\n"
                     "    needs: .bench_ref/reference_step.py\n")
    out = tmp_path / "res" / "tiny"
    assert main(["bench", "--suite", str(suite), *TINY, *QUICK, "--repeats", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "released: left out" in captured.err and "broken: ConfigError" in captured.err
    files = {p.name for p in out.parent.iterdir()}
    assert files == {"tiny.jsonl", "tiny.csv", "tiny.md", "tiny.png"}
    rows = [json.loads(line) for line in (out.parent / "tiny.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["B", "broken", "H"]
    assert rows[1]["error"].startswith("ConfigError: optim.accum_steps") and "images_per_s" not in rows[1]
    assert rows[2]["masks"] == "default" and rows[0]["masks"] == "reference"
    for r in (rows[0], rows[2]):
        assert r["windows"]["repeats"] == 2 and r["images_per_s"] > 0 and r["config_hash"]
    assert len({r["run"] for r in rows}) == 1 and rows[0]["card"] in rows[0]["run"]
    table = list(csv.DictReader((out.parent / "tiny.csv").open()))
    assert [t["label"] for t in table] == ["B", "broken", "H"] and table[1]["error"]
    assert table[0]["repeats"] == "2" and float(table[0]["images_per_s"]) == rows[0]["images_per_s"]
    page = (out.parent / "tiny.md").read_text()
    assert "| B |" in page and "error: ConfigError" in page and "2 windows" in page
    import matplotlib.image

    assert matplotlib.image.imread(out.parent / "tiny.png").ndim == 3

    # two runs of one machine and commit merged into one page: the file names tell them apart
    again = tmp_path / "again.jsonl"
    again.write_text((out.parent / "tiny.jsonl").read_text())
    merged = merge_reports([out.parent / "tiny.jsonl", again])
    assert len({r["run"] for r in merged}) == 2 and len(merged) == 6
    page = write_report(merged, tmp_path / "both")["md"].read_text()
    assert "(tiny)" in page and "(again)" in page


def test_released_rows_need_the_released_code_and_read_its_lines(tmp_path):
    cfg = load_config("in1k_vith14_ep300")
    with pytest.raises(ConfigError, match="bench_ref"):
        released_rows(cfg, steps=1, warmup=0, device="cpu", root=tmp_path)
    (tmp_path / ".bench_ref").mkdir()
    (tmp_path / ".bench_ref" / "reference_step.py").write_text("")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "reference_equal_work.py").write_text(
        "import json, sys\n"
        "a = sys.argv[1:]\n"
        "print(json.dumps({'what': 'official_mask_collator', 'mean_ctx_tokens': 68.5}))\n"
        "print('a log line')\n"
        "print(json.dumps({'what': 'official_train_step', 'img_per_s': 300.0, 'model': a[a.index('--model') + 1],"
        " 'batch': int(a[a.index('--batch') + 1]), 'crop': int(a[a.index('--crop') + 1])}))\n")
    (row,) = released_rows(cfg, steps=1, warmup=0, device="cpu", root=tmp_path)
    assert row["bench"] == "reference_step" and row["variant"] == "released" and row["img_per_s"] == 300.0
    assert (row["model"], row["batch"], row["crop"], row["mean_ctx_tokens"]) == ("vit_huge", 128, 224, 68.5)
    (tmp_path / "benchmarks" / "reference_equal_work.py").write_text("import sys\nsys.exit('no GPU')\n")
    with pytest.raises(RuntimeError, match="no GPU"):
        released_rows(cfg, steps=1, warmup=0, device="cpu", root=tmp_path)
