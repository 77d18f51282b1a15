"""Keeping old call forms working, with a DeprecationWarning that says what to write instead."""
from __future__ import annotations

import functools
import warnings


def keyword_only(positional: int, names: tuple[str, ...]):
    """Make the parameters after the first ``positional`` keyword-only, while calls that still pass
    ``names`` (in that order) by position keep working and are warned about."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            extra = args[positional:]
            if extra:
                if len(extra) > len(names):
                    raise TypeError(f"{fn.__qualname__}() takes {positional} positional arguments "
                                    f"(then keywords: {', '.join(names)}), but {len(args)} were given")
                given = names[:len(extra)]
                warnings.warn(f"{fn.__qualname__}: pass {', '.join(f'{n}=...' for n in given)} by keyword; "
                              f"passing them by position is deprecated", DeprecationWarning, stacklevel=2)
                for name, value in zip(given, extra):
                    if name in kwargs:
                        raise TypeError(f"{fn.__qualname__}() got multiple values for argument {name!r}")
                    kwargs[name] = value
            return fn(*args[:positional], **kwargs)
        return call
    return wrap


def moved(module: str, names: dict[str, str]):
    """A module ``__getattr__`` serving names that moved elsewhere (name -> new module), with a warning."""
    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        import importlib

        warnings.warn(f"{module}.{name} moved to {names[name]}.{name}; import it from there (or from ijepa_fast)",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(names[name]), name)
    return __getattr__


def module_names(package: str, *modules: str):
    """A module ``__getattr__`` for a package that replaced a module of the same name: the old module's
    names (now in ``modules``) stay importable from the package, and so do its modules, each loaded on first
    use (so that importing one sibling module never drags in the rest)."""
    import importlib
    import importlib.util

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if importlib.util.find_spec(f"{package}.{name}") is not None:  # a module of the package
            return importlib.import_module(f"{package}.{name}")
        for sub in modules:
            value = getattr(importlib.import_module(f"{package}.{sub}"), name, None)
            if value is not None:
                return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
