"""benchmarks/gpu_window.py (the GPU window's driver) and the report built from its rows: every
failure, cap or lack of time becomes an error row and the window goes on; the rows of two commands
make one page; the rehearsal runs a stage on the CPU."""
import importlib.util
import json
import re
import sys
import time

from conftest import ROOT
from test_bench import _load, _ours, _released


def _window():
    """benchmarks/gpu_window.py as a module (registered: its dataclasses need it)."""
    if "gpu_window" not in sys.modules:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        spec = importlib.util.spec_from_file_location("gpu_window", ROOT / "benchmarks" / "gpu_window.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["gpu_window"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["gpu_window"]


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_window_turns_failures_caps_and_lack_of_time_into_rows(tmp_path):
    gw = _window()
    win = gw.Window(str(tmp_path), 60, "cpu", {"run_id": "r1"})

    def boom():
        raise ValueError("the step broke\nsecond line")

    def slow():
        time.sleep(10)
        return {"bench": "step", "model": "never"}

    win.guarded({"bench": "step", "model": "a"}, 30, boom)
    win.guarded({"bench": "step", "model": "b"}, 30, lambda: {"bench": "step", "model": "b", "images_per_s": 2.0})
    t = time.monotonic()
    win.guarded({"bench": "step", "model": "c"}, 1, slow)
    assert time.monotonic() - t < 8  # cut at its cap, not run to the end
    late = gw.Window(str(tmp_path), 5, "cpu", {"run_id": "r1"})
    late.guarded({"bench": "step", "model": "d"}, 60, lambda: {"bench": "step", "model": "d"})
    rows = _rows(tmp_path / "rows.jsonl")
    assert [r["model"] for r in rows] == ["a", "b", "c", "d"]
    assert rows[0]["error"] == "ValueError: the step broke"
    assert "error" not in rows[1] and rows[1]["images_per_s"] == 2.0
    assert rows[2]["error"] == "Cut: cut at its cap of 1 s"
    assert rows[3]["error"].startswith("skipped:") and "left of the window" in rows[3]["error"]
    assert all(r["run_id"] == "r1" for r in rows)


def test_report_merges_the_newest_run_of_each_file(tmp_path):
    bench_step = _load("bench_step")
    main, extras = tmp_path / "main.jsonl", tmp_path / "extras.jsonl"
    old = _ours("vit_huge", 14, 128, "reference", 100.0, run_id="old")
    main.write_text("\n".join(json.dumps(r) for r in [
        old, _released("vit_huge", 14, 128, 300.0) | {"run_id": "new"},
        _ours("vit_huge", 14, 128, "reference", 660.0, run_id="new"),
        {"bench": "step", "model": "vit_base", "patch": 16, "batch": 256, "masks": "reference", "fast": True,
         "fp8": None, "perf": [], "error": "Cut: cut at its cap of 50 s", "run_id": "new"}]) + "\n")
    extras.write_text(json.dumps(_ours("vit_large", 16, 128, "reference", 900.0, run_id="x")) + "\n")
    md = tmp_path / "page.md"
    bench_step.report([str(main), str(extras)], str(md), "python benchmarks/bench_step.py --report ...")
    text = md.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("| ViT-")]
    assert any(ln.startswith("| ViT-H/14 |") and "2.20x" in ln for ln in lines)  # 660 / 300, the new run only
    assert not any("| 100.0 |" in ln for ln in lines)
    assert any(ln.startswith("| ViT-B/16 |") and "Cut: cut at its cap of 50 s" in ln for ln in lines)
    assert any(ln.startswith("| ViT-L/16 |") and "900.0" in ln for ln in lines)


def test_window_models_give_the_released_step_our_predictor_depth():
    gw = _window()
    for rehearse in (False, True):
        for extras in (False, True):
            steps, fp8 = gw.window_models(rehearse, extras)
            for m in steps + fp8:
                assert m.pred_depth == (16 if m.model == "vit_giant" else 12 if not rehearse else 2)
    steps, fp8 = gw.window_models(False, False)
    assert [(m.model, m.batch) for m in steps] == [("vit_huge", 128), ("vit_base", 256), ("vit_huge", 128)]
    # each model's first row is the recipe as shipped: no perf keys (every switch 'auto'); the explicit
    # eager variant is an extra row after the others, without a second released row
    for rehearse in (False, True):
        steps, _ = gw.window_models(rehearse, False)
        assert all(m.variants[0].name == "defaults" and m.variants[0].perf == {} for m in steps[:-1])
        assert [v.name for v in steps[-1].variants] == ["eager"] and not steps[-1].released_cap_s
        assert steps[-1].variants[0].perf == {"compile": "false", "bf16_weights": "false"}
    steps, fp8 = gw.window_models(False, False)
    assert [v.fp8 for m in fp8 for v in m.variants] == ["rowwise", "target"] and not fp8[0].released_cap_s
    _, fp8 = gw.window_models(True, False)  # the rehearsal emulates both
    assert [v.fp8 for m in fp8 for v in m.variants] == ["rowwise", "target"]
    assert all(v.perf.get("fp8_emulate") == "true" for m in fp8 for v in m.variants)


def test_window_rehearsal_of_the_step_stage(tmp_path):
    """The step stage on the CPU with a tiny model: one row per variant of ours, none with an error
    (the released step is left out here: it runs in the full rehearsal when .bench_ref/ exists)."""
    gw = _window()
    steps, _ = gw.window_models(True, False)
    win = gw.Window(str(tmp_path), 600, "cpu", {"run_id": "rehearsal"})
    tiny = steps[0]
    tiny.released_cap_s = 0
    tiny.variants = tiny.variants[:2]
    gw.run_steps(win, [tiny], 1, 1, None)
    rows = _rows(tmp_path / "rows.jsonl")
    assert [r.get("variant") for r in rows] == ["defaults", "best"]
    assert rows[0]["perf"] == "defaults" and rows[0]["perf_resolved"]["compile"] is False  # 'auto' on the CPU
    assert not any(r.get("error") for r in rows), rows
    assert rows[1]["optimizer"] == "fused_tail" and "token_buckets=4" in rows[1]["perf"]
    assert all(r["images_per_s"] > 0 and r["pred_depth"] == 2 for r in rows)
    assert ROOT.joinpath("benchmarks", "run_gpu.sh").read_text().count("gpu_window.py") >= 1


def test_window_rehearsal_of_the_numerics_stage(tmp_path):
    """The numerics stage on the CPU (tiny model, 2 steps): numerics_check.py's rows land in the window's
    rows file, one per path and measurement, with finite errors and the tiny model's size."""
    gw = _window()
    text = (ROOT / "benchmarks" / "gpu_window.py").read_text()
    assert re.search(r'"--stages", default="[a-z0-9,]*numerics', text)  # a default stage of the main command
    assert "--tiny" in gw.numerics_command("cpu", True) and "--tiny" not in gw.numerics_command("cuda", False)
    win = gw.Window(str(tmp_path), 600, "cpu", {"run_id": "rehearsal"})
    gw.run_numerics(win, True)
    rows = _rows(tmp_path / "rows.jsonl")
    assert not any(r.get("error") for r in rows), rows
    assert sorted((r["path"], r["what"]) for r in rows) == [
        ("autocast", "numerics_grad_vs_fp32"), ("autocast", "numerics_update_vs_fp32"),
        ("lean", "numerics_grad_vs_fp32"), ("lean", "numerics_update_vs_fp32")]
    assert all(r["bench"] == "numerics" and r["run_id"] == "rehearsal" and r["embed_dim"] == 48 for r in rows)
    assert all(0 < r["overall"] < 1 and r["overall"] <= r["worst"] for r in rows), rows


def test_tests_stage_writes_each_failure_as_it_happens(tmp_path):
    """The tests stage's plugin (benchmarks/pytest_live.py) writes a failure's report the moment the
    test ends: a pytest run killed before its end-of-run summary still leaves which test failed and why."""
    import os
    import subprocess

    (tmp_path / "test_cut.py").write_text(
        "import time\n"
        "def test_ok():\n    assert True\n"
        "def test_wrong():\n    assert 1 + 1 == 3, 'arithmetic differs'\n"
        "def test_hangs():\n    time.sleep(600)\n")
    live = tmp_path / "live.txt"
    env = {**os.environ, "PYTEST_LIVE_LOG": str(live),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pytest", str(tmp_path / "test_cut.py"), "-q", "-p", "no:cacheprovider",
           "-p", "pytest_live"]
    try:
        subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
        raise AssertionError("the hanging test should have been cut")
    except subprocess.TimeoutExpired:
        pass
    text = live.read_text()
    assert "PASSED" in text and "test_cut.py::test_ok" in text
    assert "FAILED" in text and "test_cut.py::test_wrong" in text and "arithmetic differs" in text
    assert "test_hangs" not in text  # never finished
