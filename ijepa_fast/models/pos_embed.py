"""Fixed 2-D sin-cos positional tables and their interpolation to other patch grids.

Layout (the published checkpoints store the table this way): for a grid of ``gh`` rows and
``gw`` columns the table has ``gh * gw`` rows in row-major order and ``dim`` channels. The first
``dim / 2`` channels encode the column coordinate, the last ``dim / 2`` the row coordinate; each
half is ``[sin(pos * omega), cos(pos * omega)]`` with ``omega_i = 1 / 10000 ** (i / (dim / 4))``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim] table, computed in float64."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1, 1).to(torch.float64) * omega.reshape(1, -1)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """The fixed table for a ``grid = (rows, cols)`` patch grid: float32 [rows * cols, dim]."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    gh, gw = grid
    rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)  # row coordinate of each patch
    cols = torch.arange(gw, dtype=torch.float64).repeat(gh)  # column coordinate
    return torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1).float()


def interpolate_pos_embed(table: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> torch.Tensor:
    """Resize a [1, gh * gw, D] table to another grid (bicubic, as for evaluation at other resolutions).

    Returns the table itself when the grids are equal, so the native grid is exact.
    """
    if tuple(src_grid) == tuple(dst_grid):
        return table
    gh, gw = src_grid
    if table.shape[1] != gh * gw:
        raise ValueError(f"positional table has {table.shape[1]} rows, expected {gh}x{gw}")
    dim = table.shape[-1]
    grid = table.reshape(1, gh, gw, dim).permute(0, 3, 1, 2)
    out = F.interpolate(grid.float(), size=tuple(dst_grid), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(1, -1, dim).to(table.dtype)


def grid_from_tokens(num_tokens: int) -> tuple[int, int]:
    """Square grid for a token count (published checkpoints are square)."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} positions do not form a square grid; pass the grid explicitly")
    return side, side
