"""Every state layout on disk: the published checkpoint format (``format``) and a run folder's
checkpoint files, links and sharded (FSDP) files (``run_files``).
"""
import importlib
import importlib.util


def __getattr__(name: str):
    """The names of ``ijepa_fast.checkpoint`` from before it became a package live in ``format``;
    they stay importable from here, loaded on first use (so that importing a sibling module
    never drags in the rest)."""
    if name.startswith("__"):
        raise AttributeError(name)
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a module of this package
        return importlib.import_module(f"{__name__}.{name}")
    value = getattr(importlib.import_module(f"{__name__}.format"), name, None)
    if value is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return value
