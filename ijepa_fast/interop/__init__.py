"""Other libraries' layouts: export an encoder to timm / transformers (``export``) and import theirs
back (``importer``).
"""
import importlib
import importlib.util


def __getattr__(name: str):
    """``export_encoder`` and ``import_encoder`` (and the other names of ``export`` and ``importer``)
    are importable from here, loaded on first use (so that importing one module never drags in the other)."""
    if name.startswith("__"):
        raise AttributeError(name)
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a module of this package
        return importlib.import_module(f"{__name__}.{name}")
    for sub in ("export", "importer"):
        value = getattr(importlib.import_module(f"{__name__}.{sub}"), name, None)
        if value is not None:
            return value
    if value is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return value
