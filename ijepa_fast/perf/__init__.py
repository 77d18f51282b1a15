"""The step's speed-ups, each a ``perf.*`` switch applied in one order (``switches``): bf16 compute
copy, token buckets and packing, FP8 linear layers, the fused optimiser tail, compile and
activation checkpointing.
"""
from .._compat import module_names

__getattr__ = module_names(__name__, "switches")  # the old module's names, loaded on first use
