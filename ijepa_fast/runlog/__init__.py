"""What a run writes as it goes: log lines, metric rows, the progress bar and the loss plot
(``output``), and the loggers the rows go to (``loggers``).
"""
from .._compat import module_names

__getattr__ = module_names(__name__, "output")  # the old module's names, loaded on first use
