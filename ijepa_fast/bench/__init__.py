"""Measuring the step: timing (``step``), the report (``report``), suite files and row metadata
(``suite``), runs compared as a page and chart (``compare``), the ``ijepa-fast bench`` command
(``command``), host-sync counting (``profiling``) and the bytes a forward pass keeps for backward
(``saved_memory``).
"""
from .._compat import module_names

__getattr__ = module_names(__name__, "step")  # the old module's names, loaded on first use
