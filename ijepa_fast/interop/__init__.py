"""Other libraries' layouts: export an encoder to timm / transformers (``export``) and import theirs
back (``importer``).
"""
from .._compat import module_names

__getattr__ = module_names(__name__, "export", "importer")  # the old module's names, loaded on first use
