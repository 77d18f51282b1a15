"""The checkout's top-level kernels/ must not hide a package of the same name.

Run from the root of a clone (``python -m pytest``, ``python -c``, a notebook), the root is first on
``sys.path``. kernels/ has no ``__init__.py`` (kernels/README.md), so it is only a namespace portion and a
regular ``kernels`` package installed anywhere on the path wins; ``ijepa_fast.kernels`` still loads every op.
Each check runs in a fresh interpreter whose working directory is the checkout root, as a user's would be.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
from conftest import ROOT

OPS = sorted(p.stem for p in (ROOT / "kernels").glob("*.py"))


def run_at_root(code: str, *, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    env.setdefault("TRITON_INTERPRET", "1")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_kernels_folder_is_not_a_regular_package():
    assert (ROOT / "kernels").is_dir() and not (ROOT / "kernels" / "__init__.py").exists()
    assert len(OPS) >= 6


def test_installed_kernels_package_wins_and_ours_still_loads(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("STAND_IN = 'a user package named kernels'\n")
    code = "\n".join([
        "import importlib, sys",
        "assert sys.path[0] in ('', '.'), sys.path[:3]",  # the checkout root first, as under python -m
        "import kernels",
        "print('kernels ->', getattr(kernels, 'STAND_IN', None), kernels.__file__)",
        "import ijepa_fast",
        f"for op in {OPS!r}:",
        "    mod = importlib.import_module('ijepa_fast.kernels.' + op)",
        "    print('op', op, mod.__file__)",
    ])
    out = run_at_root(code, pythonpath=str(site))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"kernels -> a user package named kernels {site / 'kernels' / '__init__.py'}"
    loaded = {line.split()[1]: line.split()[2] for line in lines[1:]}
    assert sorted(loaded) == OPS
    for op, path in loaded.items():
        assert os.path.samefile(path, ROOT / "kernels" / f"{op}.py"), (op, path)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_transformers_model_loads_from_the_checkout_root():
    code = ("from transformers import IJepaConfig, IJepaModel\n"
            "m = IJepaModel(IJepaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,"
            " intermediate_size=64, image_size=32, patch_size=16))\n"
            "print(type(m).__name__)")
    out = run_at_root(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "IJepaModel"
