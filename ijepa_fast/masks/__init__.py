"""Multi-block mask sampling (Python; a compiled sampler with identical output lives in csrc/), and a
DataLoader collate function that draws each batch's masks in the workers."""
from .collate import MaskCollator
from .multiblock import MODES, MaskBatch, MultiBlockSampler, block_size

__all__ = ["MODES", "MaskBatch", "MaskCollator", "MultiBlockSampler", "block_size"]
