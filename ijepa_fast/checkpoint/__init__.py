"""Every state layout on disk: the published checkpoint format (``format``) and a run folder's
checkpoint files, links and sharded (FSDP) files (``run_files``).
"""
from .._compat import module_names

__getattr__ = module_names(__name__, "format")  # the old module's names, loaded on first use
