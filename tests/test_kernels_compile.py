"""Every Triton kernel compiles for an H100 (sm_90), checked on a machine with no GPU.

Under the interpreter the kernel tests never run Triton's compiler; tests/gpu_compile.py sends
every op's forward and backward launches, over sizes and dtypes, through Triton's specialisation
and full compiler pipeline for the card instead (once, Triton 3.6's layout pass crashed on a
kernel that the interpreter ran correctly).
"""
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from ijepa_fast.kernels.dispatch import triton_version


def _nvidia_backend() -> bool:
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except Exception:
        return False
    return True


pytestmark = [pytest.mark.skipif(triton_version() is None, reason="Triton is not installed (pip install triton)"),
              pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernel tests compile for it"),
              pytest.mark.skipif(not _nvidia_backend(), reason="this Triton has no NVIDIA backend")]


def launched_kernels() -> set[str]:
    """Names of the @triton.jit functions that the kernels' Python code launches (``name[grid](...)``)."""
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        src = path.read_text()
        jitted = re.findall(r"@triton\.jit\s+def (\w+)", src)
        names |= {n for n in jitted if re.search(rf"\b{n}\[", src)}
    return names


def test_kernels_compile_for_sm90_every_launch():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu_compile.py"), "--arch", "90"], capture_output=True,
                       text=True, env=env, timeout=1200)
    assert p.returncode == 0, (p.stdout[-2000:] + p.stderr[-4000:])
    compiled = {line.split()[1] for line in p.stdout.splitlines() if line.startswith("compiled ")}
    expected = launched_kernels()
    assert len(expected) >= 10 and expected <= compiled, f"never compiled: {sorted(expected - compiled)}"
    assert "0 launches failed" in p.stdout
