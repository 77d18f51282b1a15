"""benchmarks/profile_step.py: one tiny run on this machine's device, its row and its table."""
import json
import subprocess
import sys

from conftest import DEVICE, ROOT

CATEGORIES = ("gemm", "attention", "triton_ops", "optimizer_ema", "copies", "other")


def test_profile_step_reports_categories_syncs_and_a_planted_sync(tmp_path):
    out, md = tmp_path / "p.jsonl", tmp_path / "p.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--model", "vit_tiny", "--patch", "8",
           "--img", "64", "--batch", "2", "--pred-depth", "1", "--min-keep", "4", "--warmup", "1", "--steps", "2",
           "--device", DEVICE, "--plant-sync", "--out", str(out), "--md", str(md)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["bench"] == "profile_step" and row["planted_sync"] and len(row["steps"]) == 2
    for s in row["steps"]:
        assert s["total_ms"] > 0
        assert all(s[c] >= 0 for c in CATEGORIES), s
        assert sum(s[c] for c in CATEGORIES) <= s["total_ms"] * (1 + 1e-6) + 1e-3, s
        assert s["gemm"] > 0, s  # the linear layers ran
        assert s["optimizer_ema"] > 0, s  # AdamW and the EMA ran
        assert s["compiles"] >= 0 and s["graph_breaks"] >= 0 and s["alloc_retries"] >= 0
    where = row["host_syncs_by_location"]
    planted = {k: n for k, n in where.items() if "profile_step.py" in k}
    assert list(planted.values()) == [1], where
    # nothing else but the step's deliberate read of the loss and gradient norm
    assert all("ijepa_fast/training/step.py" in k for k in where if k not in planted), where
    assert row["host_syncs"] == sum(where.values())
    for key in ("commit", "torch", "date"):
        assert row[key]
    text = md.read_text()
    assert "| step | wall ms | device ms | gemm ms" in text and text.count("\n| ") >= 3
