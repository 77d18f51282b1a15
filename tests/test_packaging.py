"""What users install: the wheel holds every package of the source tree, and the tests use it.

``IJEPA_FAST_WHEEL`` names a wheel already built (CI builds one and installs it); otherwise the
test builds one from the checkout.
"""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT


def expected_entries() -> set[str]:
    """Every file a working install needs, named as the wheel names it."""
    want = set()
    for path in (ROOT / "ijepa_fast").rglob("*.py"):
        if "__pycache__" not in path.parts:
            want.add("ijepa_fast/" + path.relative_to(ROOT / "ijepa_fast").as_posix())
    for folder, pattern in (("kernels", "*.py"), ("configs", "*.yaml"), ("csrc", "*.cpp")):
        for path in (ROOT / folder).rglob(pattern):
            if "__pycache__" not in path.parts:
                want.add(f"ijepa_fast/{folder}/" + path.relative_to(ROOT / folder).as_posix())
    return want


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    given = os.environ.get("IJEPA_FAST_WHEEL")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("wheel")
    # build from a copy: setuptools leaves build/ behind, whose stale files a later build would ship
    src = out / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "runs",
                                                              "__pycache__", ".bench_ref", ".pytest_cache"))
    for isolation in (["--no-build-isolation"], []):  # the venv's setuptools, else a fresh build environment
        p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(out),
                            str(src)], capture_output=True, text=True, timeout=600)
        if p.returncode == 0:
            break
    assert p.returncode == 0, p.stderr[-3000:]
    (found,) = out.glob("ijepa_fast-*.whl")
    return found


def test_wheel_holds_every_package_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "ijepa_fast").rglob("__init__.py")}
    assert {"ijepa_fast", "ijepa_fast/eval", "ijepa_fast/models", "ijepa_fast/data"} <= packages
    for pkg in packages:
        assert f"{pkg}/__init__.py" in names, f"the wheel lacks the package {pkg}"
    want = expected_entries()
    assert {"ijepa_fast/kernels/ema.py", "ijepa_fast/configs/demo_cpu.yaml", "ijepa_fast/csrc/mask_sampler.cpp"} <= want
    missing = sorted(want - names)
    assert not missing, f"the wheel lacks {len(missing)} file(s): {missing[:10]}"
    meta = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "ijepa-fast = ijepa_fast.cli:main" in zipfile.ZipFile(wheel).read(meta).decode()


def test_installed_package_imports_every_module():
    """Each module of the source tree imports from the installed package (no optional package needed)."""
    import importlib

    skip = {"ijepa_fast.__main__"}  # runs the command line on import
    mods = sorted({"ijepa_fast." + ".".join(p.relative_to(ROOT / "ijepa_fast").with_suffix("").parts)
                   for p in (ROOT / "ijepa_fast").rglob("*.py") if p.name != "__init__.py"} - skip)
    mods += ["ijepa_fast.kernels." + p.stem for p in (ROOT / "kernels").glob("*.py") if p.name != "__init__.py"]
    for name in mods:
        importlib.import_module(name)
    assert len(mods) > 30


def test_plain_install_pulls_no_integration_library(wheel):
    """``pip install ijepa-fast`` alone brings none of the trainer, logger, export or data libraries:
    each is an extra, imported only when its feature is chosen."""
    names = zipfile.ZipFile(wheel).namelist()
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    plain = [r for r in requires if "extra ==" not in r]
    assert any(r.startswith("torch") for r in plain), plain  # the metadata was read right
    heavy = ("timm", "transformers", "lightning", "pytorch-lightning", "tensorboard", "wandb", "webdataset",
             "torchao", "triton", "nvidia-dali", "torchvision", "scikit-learn")
    pulled = [r for r in plain if r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip()
              .lower() in heavy or r.lower().startswith("nvidia-dali")]
    assert not pulled, f"a plain install would pull {pulled}"
