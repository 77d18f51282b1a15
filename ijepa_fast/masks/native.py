"""The compiled extension ``ijepa_fast._C`` (sources in ``csrc/``): built at first use, cached.

``load()`` compiles ``csrc/mask_sampler.cpp`` with ``torch.utils.cpp_extension.load`` the first
time it is called on a machine (about a minute; the result is cached under
``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), then imports it from the
cache. Without a compiler, or with ``IJEPA_FAST_NO_EXT=1``, it returns None and the Python
sampler is used; the reason is logged once.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("ijepa_fast")

_LOCK = threading.Lock()
_STATE: dict = {}
SOURCES = ("mask_sampler.cpp",)


def source_dir() -> Path | None:
    """csrc/ of this installation (copied into the package) or of the source checkout."""
    here = Path(__file__).resolve().parents[1]
    for cand in (here / "csrc", here.parent / "csrc"):
        if all((cand / s).is_file() for s in SOURCES):
            return cand
    return None


def load():
    """The compiled module, or None (see the module docstring). Thread-safe; tried once."""
    with _LOCK:
        if "module" in _STATE:
            return _STATE["module"]
        _STATE["module"] = None
        if os.environ.get("IJEPA_FAST_NO_EXT", "0") == "1":
            _STATE["reason"] = "IJEPA_FAST_NO_EXT=1"
            return None
        src = source_dir()
        if src is None:
            _STATE["reason"] = "the csrc/ sources are not installed"
            log.info("compiled mask sampler unavailable (csrc/ missing); using the Python sampler")
            return None
        try:
            from torch.utils.cpp_extension import load as build

            _STATE["module"] = build(name="ijepa_fast_C", sources=[str(src / s) for s in SOURCES],
                                     extra_cflags=["-O3", "-ffp-contract=off"], verbose=False)
        except Exception as e:  # no compiler, no ninja, headers missing: the Python path works
            _STATE["reason"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning(f"could not build the compiled mask sampler ({_STATE['reason']}); using the Python sampler")
        return _STATE["module"]


def reason() -> str | None:
    """Why the compiled module is unavailable (None when it loaded or was not tried)."""
    return _STATE.get("reason")
