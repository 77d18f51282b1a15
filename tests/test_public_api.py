"""The public surface: every documented import path works, and the flat layout's old module paths still
import (the same module objects) with a DeprecationWarning that names the new path."""
import importlib
import subprocess
import sys
import warnings

import pytest
from conftest import ROOT

import ijepa_fast
from ijepa_fast._aliases import MOVED


@pytest.mark.parametrize("name", [n for n in ijepa_fast.__all__ if n != "__version__"])
def test_every_exported_name_imports(name):
    value = getattr(ijepa_fast, name)
    assert value is not None
    assert getattr(importlib.import_module(value.__module__), value.__name__, None) is value or callable(value)


def test_documented_paths():
    from ijepa_fast.config import Config, load_config
    from ijepa_fast.interop import export_encoder, import_encoder
    from ijepa_fast.masks import MaskCollator
    from ijepa_fast.training.engine import Engine

    assert isinstance(load_config(None), Config)
    assert callable(export_encoder) and callable(import_encoder) and callable(MaskCollator)
    assert Engine is ijepa_fast.Engine
    ops = sorted(p.stem for p in (ROOT / "kernels").glob("*.py"))
    for op in ops:
        mod = importlib.import_module(f"ijepa_fast.kernels.{op}")
        if op != "dispatch":
            assert callable(getattr(mod, f"{op}_reference", None)) or op == "predictor_tokens", op


def test_lightning_module_path():
    pytest.importorskip("lightning")
    from ijepa_fast.lightning import IJEPAModule

    assert IJEPAModule.__module__ == "ijepa_fast.lightning"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_warn_and_give_the_new_module(old):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module(old)
    new = importlib.import_module(MOVED[old])
    assert mod is new
    assert new.__spec__.name == MOVED[old]  # the alias left the real module's identity alone
    assert any(issubclass(w.category, DeprecationWarning) and MOVED[old] in str(w.message) for w in caught)


def test_the_command_and_python_m():
    out = subprocess.run([sys.executable, "-m", "ijepa_fast", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and ijepa_fast.__version__ in out.stdout + out.stderr
