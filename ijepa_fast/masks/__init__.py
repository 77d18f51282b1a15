"""Multi-block mask sampling (Python; a compiled sampler with identical output lives in csrc/)."""
from .multiblock import MODES, MaskBatch, MultiBlockSampler, block_size

__all__ = ["MODES", "MaskBatch", "MultiBlockSampler", "block_size"]
