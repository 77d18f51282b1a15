import os
import random
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter, which must be chosen before
# triton is first imported. With a GPU they run for real.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

ROOT = Path(__file__).resolve().parents[1]  # the checkout the tests come from
GOLDEN = Path(__file__).resolve().parent / "golden"  # the recorded reference steps, committed with the tests


def reference_dir() -> Path:
    """The reference's golden files: $IJEPA_REFERENCE_DIR when set, else tests/golden in the checkout."""
    return Path(os.environ.get("IJEPA_REFERENCE_DIR") or GOLDEN)


def pytest_sessionstart(session):
    """With IJEPA_FAST_REQUIRE_INSTALLED=1 (CI), the suite must test the installed package, never the
    checkout's source tree: stop at once if the import resolved into the checkout."""
    if os.environ.get("IJEPA_FAST_REQUIRE_INSTALLED") != "1":
        return
    import ijepa_fast
    import ijepa_fast.kernels

    source = {ROOT / "ijepa_fast", ROOT / "kernels"}
    for mod in (ijepa_fast, ijepa_fast.kernels):
        # ijepa_fast.kernels is a namespace package (kernels/README.md): no __file__, one folder on __path__
        where = Path(mod.__file__ if getattr(mod, "__file__", None) else next(iter(mod.__path__))).resolve()
        if source & set(where.parents):
            raise pytest.UsageError(f"{mod.__name__} was imported from the checkout ({where}), not from the "
                                    f"installed package: run the tests as the README says, outside the source tree")


@pytest.fixture(autouse=True)
def _seed():
    """Fresh but reproducible random inputs in every test."""
    torch.manual_seed(1234)
    random.seed(1234)
    yield


@pytest.fixture
def tiny_cfg():
    """A small demo config for fast end-to-end runs."""
    from ijepa_fast.config import load_config

    return load_config("demo_cpu", [
        "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.pred_depth=1", "model.pred_dim=16",
        "data.demo_images=64", "data.batch_size=8", "optim.epochs=2", "optim.warmup=0.5", "run.progress=false",
        "run.plot=false", "run.log_every=1"])


def run_cli(*args, cwd=None, env=None, check=True, timeout=600):
    """Run ``python -m ijepa_fast ARGS`` in a fresh process of this interpreter (the installed package)."""
    import subprocess
    import sys

    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "ijepa_fast", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ijepa-fast {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc
