"""examples/ (in the checkout, not the wheel) run as scripts with tiny settings: the Engine loop
(whose --save / --resume continues exactly), the Lightning one, and export + linear probe."""
import importlib.util
import json
import math
import re
import subprocess
import sys

import pytest
from conftest import ROOT

EXAMPLES = ROOT / "examples"
pytestmark = pytest.mark.skipif(not EXAMPLES.is_dir(), reason="examples/ is in the source checkout, not the wheel")


def run(script, *args, cwd):
    p = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return re.findall(r"^step (\d+)  loss (\S+)  lr (\S+)  momentum (\S+)$", p.stdout, re.M)


def test_engine_loop_example(tmp_path):
    tiny = ("--images", 32, "--batch-size", 8)
    straight = run("engine_loop.py", "--steps", 4, *tiny, cwd=tmp_path)
    assert [int(s[0]) for s in straight] == [0, 1, 2, 3]
    assert all(math.isfinite(float(s[1])) and float(s[1]) > 0 for s in straight)
    head = run("engine_loop.py", "--steps", 2, *tiny, "--save", tmp_path / "state.pt", cwd=tmp_path)
    tail = run("engine_loop.py", "--steps", 4, *tiny, "--resume", tmp_path / "state.pt", cwd=tmp_path)
    assert head + tail == straight


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                    reason="PyTorch Lightning is not installed (pip install lightning)")
def test_lightning_example(tmp_path):
    lines = run("lightning_train.py", "--epochs", 1, "--images", 32, "--batch-size", 8, "--workers", 2, cwd=tmp_path)
    assert [int(s[0]) for s in lines] == [0, 1, 2, 3]
    assert all(math.isfinite(float(s[1])) and float(s[1]) > 0 for s in lines)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers is not installed (pip install 'ijepa-fast[test]')")
def test_export_probe_example(tmp_path):
    """Pretrain a few steps, export the target encoder for transformers, probe its features there."""
    p = subprocess.run([sys.executable, str(EXAMPLES / "export_timm_probe.py"), "--steps", "4", "--images", "60",
                        "--library", "hf", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["library"] == "hf" and result["steps"] == 4 and result["features"][0] == 60
    assert 0.0 <= result["top1"] <= 100.0
    assert list((tmp_path / "out").rglob("config.json")), "no exported model folder"
