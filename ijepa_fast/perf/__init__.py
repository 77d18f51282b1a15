"""The step's speed-ups, each a ``perf.*`` switch applied in one order (``switches``): bf16 compute
copy, token buckets and packing, FP8 linear layers, the fused optimiser tail, compile and
activation checkpointing.
"""
import importlib
import importlib.util


def __getattr__(name: str):
    """The names of ``ijepa_fast.perf`` from before it became a package live in ``switches``;
    they stay importable from here, loaded on first use (so that importing a sibling module
    never drags in the rest)."""
    if name.startswith("__"):
        raise AttributeError(name)
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a module of this package
        return importlib.import_module(f"{__name__}.{name}")
    value = getattr(importlib.import_module(f"{__name__}.switches"), name, None)
    if value is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return value
