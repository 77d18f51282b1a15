"""Triton kernels of ijepa-fast, importable as ``ijepa_fast.kernels``: one op per file, each with a
pure-torch ``<op>_reference`` of the same signature beside it."""
