"""Measuring the step: timing (``step``), the report (``report``), suite files and row metadata
(``suite``), runs compared as a page and chart (``compare``), the ``ijepa-fast bench`` command
(``command``), host-sync counting (``profiling``) and the bytes a forward pass keeps for backward
(``saved_memory``).
"""
import importlib
import importlib.util


def __getattr__(name: str):
    """The names of ``ijepa_fast.bench`` from before it became a package live in ``step``;
    they stay importable from here, loaded on first use (so that importing a sibling module
    never drags in the rest)."""
    if name.startswith("__"):
        raise AttributeError(name)
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a module of this package
        return importlib.import_module(f"{__name__}.{name}")
    value = getattr(importlib.import_module(f"{__name__}.step"), name, None)
    if value is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return value
