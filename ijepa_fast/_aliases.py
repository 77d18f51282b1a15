"""The module paths of the flat layout, kept importable for one release with a DeprecationWarning.

``import ijepa_fast.step`` gives the very module object ``ijepa_fast.training.step`` (no second copy, so a
monkeypatch or an isinstance check sees one thing), and warns with the path to write instead. Installed on
``sys.meta_path`` by ``ijepa_fast/__init__.py``; it answers for the names below and nothing else.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import warnings

MOVED = {
    "ijepa_fast.bench_report": "ijepa_fast.bench.report",
    "ijepa_fast.buckets": "ijepa_fast.perf.buckets",
    "ijepa_fast.config_reference": "ijepa_fast.config.reference",
    "ijepa_fast.config_schema": "ijepa_fast.config.schema",
    "ijepa_fast.config_validate": "ijepa_fast.config.validate",
    "ijepa_fast.distributed": "ijepa_fast.training.distributed",
    "ijepa_fast.engine": "ijepa_fast.training.engine",
    "ijepa_fast.fp8": "ijepa_fast.perf.fp8",
    "ijepa_fast.interop_import": "ijepa_fast.interop.importer",
    "ijepa_fast.loggers": "ijepa_fast.runlog.loggers",
    "ijepa_fast.monitor": "ijepa_fast.training.monitor",
    "ijepa_fast.packing": "ijepa_fast.perf.packing",
    "ijepa_fast.profiling": "ijepa_fast.bench.profiling",
    "ijepa_fast.run_folder": "ijepa_fast.training.run_folder",
    "ijepa_fast.saved_memory": "ijepa_fast.bench.saved_memory",
    "ijepa_fast.schedules": "ijepa_fast.training.schedules",
    "ijepa_fast.step": "ijepa_fast.training.step",
    "ijepa_fast.tail": "ijepa_fast.perf.tail",
    "ijepa_fast.train_setup": "ijepa_fast.training.setup",
    "ijepa_fast.train_state": "ijepa_fast.checkpoint.run_files",
}


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} is now {new}; the old path will be removed in the next release",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        self._own_spec = module.__spec__
        return module

    def exec_module(self, module):
        # the import system stamped the old name's spec on the real module: give it its own back
        module.__spec__ = self._own_spec
