"""Multi-block mask sampling: K target blocks and M context blocks per image.

Two modes (``MaskConfig.mode``):

``reference``
    The released sampler's semantics, flaws included. One target block size and one context
    block size per batch, both drawn from a uniform number ``r`` (scale and aspect from the same
    ``r``); top-left corners drawn with an exclusive upper bound of ``grid - size`` (so the last
    row and column position is never drawn); context = its block minus the union of the target
    blocks, redrawn while it keeps ``<= min_keep`` patches, relaxing one target block (the last
    first) after every 20 failures; finally every mask is truncated to the batch minimum length
    (indices are sorted row-major, so this drops bottom-right context patches).
``default``
    The same with the two flaws fixed: every corner position can be drawn, and nothing is
    truncated. Context lengths then differ between images; the batch is padded to the longest
    context and ``context_lens`` says which positions are real (the model masks the padding out
    of attention and the loss, so the result equals running each image on its own).

Randomness is seeded per step: an image's draws depend only on ``(seed, t, g)``, with ``t`` the
step and ``g = rank + b * world`` the image's position in the global batch (the data loader's
sharding), so a resumed run, a data-loader worker, the C++ sampler, or the same global batch
split over any number of processes draws exactly the same blocks (see ``rng``). The block sizes
depend on ``(seed, t)`` only. In ``default`` mode the masks are then the same too. In
``reference`` mode the truncation to the batch minimum is over *this process's* batch, as in the
released code: the number of processes changes how many context patches each image keeps (on
more processes, at least as many; the shorter context is a prefix of the longer), never which
blocks are drawn or the targets.

Two implementations give bit-identical results: this file's Python, and the compiled one in
``csrc/mask_sampler.cpp`` (``impl="cpp"``; ``"auto"`` uses it when it builds, see ``native``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .rng import MASK64, Stream, derive

MODES = ("default", "reference")
IMPLS = ("auto", "cpp", "python")
RETRIES_PER_RELAXATION = 20


@dataclass
class MaskBatch:
    """Patch indices (row-major into the patch grid) for one batch.

    context: int64 [M, B, Lc]; targets: int64 [K, B, Lt]. context_lens / target_lens: int64
    [M, B] / [K, B], the number of real indices of each row (the rest is padding, index 0), or
    None when every row is full. Rows are sorted ascending.
    """

    context: torch.Tensor
    targets: torch.Tensor
    context_lens: torch.Tensor | None = None
    target_lens: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.context.shape[1]

    def context_valid(self) -> torch.Tensor | None:
        return _valid(self.context, self.context_lens)

    def target_valid(self) -> torch.Tensor | None:
        return _valid(self.targets, self.target_lens)

    def to(self, device, non_blocking: bool = False) -> MaskBatch:
        def mv(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)
        return MaskBatch(mv(self.context), mv(self.targets), mv(self.context_lens), mv(self.target_lens))

    def pin_memory(self) -> MaskBatch:
        def pin(t):
            return None if t is None else t.pin_memory()
        return MaskBatch(pin(self.context), pin(self.targets), pin(self.context_lens), pin(self.target_lens))

    def mean_tokens(self) -> tuple[float, float]:
        """(context tokens, target tokens summed over blocks) per image, padding excluded."""
        m, b, lc = self.context.shape
        k, _, lt = self.targets.shape
        ctx = float(self.context_lens.sum()) if self.context_lens is not None else float(m * b * lc)
        tgt = float(self.target_lens.sum()) if self.target_lens is not None else float(k * b * lt)
        return ctx / b, tgt / b

    def slice(self, start: int, stop: int) -> MaskBatch:
        """The masks of images start .. stop-1 (padding widths unchanged)."""
        def cut(t):
            return None if t is None else t[:, start:stop]
        return MaskBatch(cut(self.context), cut(self.targets), cut(self.context_lens), cut(self.target_lens))

    @classmethod
    def from_lists(cls, masks_enc, masks_pred) -> MaskBatch:
        """From the reference layout: lists of [B, L] index tensors (one per block)."""
        return cls(torch.stack(list(masks_enc)), torch.stack(list(masks_pred)))

    def to_lists(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.context_lens is not None or self.target_lens is not None:
            raise ValueError("padded masks have no reference (list) layout; sample them in reference mode")
        return list(self.context.unbind(0)), list(self.targets.unbind(0))


def _valid(idx, lens):
    if lens is None:
        return None
    return torch.arange(idx.shape[-1], device=idx.device) < lens.unsqueeze(-1)


def block_size(r: float, scale, aspect, grid, mode: str = "reference") -> tuple[int, int]:
    """Block (height, width) in patches from one uniform number r, as the reference sizes blocks.

    ``reference`` clamps each side below the grid's (its exclusive corner bound needs a spare row
    and column, so a 224 px / patch 14 context block is never more than 15 x 15 = 87.9 % of the
    image); ``default`` lets a block span the whole grid (context blocks then cover 85-100 %)."""
    gh, gw = grid
    s = scale[0] + r * (scale[1] - scale[0])
    n = int((gh * gw) * s)
    a = aspect[0] + r * (aspect[1] - aspect[0])
    h = int(round(math.sqrt(n * a)))  # Python rounds half to even; the C++ sampler does too
    w = int(round(math.sqrt(n / a)))
    spare = 1 if mode == "reference" else 0
    return min(h, gh - spare), min(w, gw - spare)


class MultiBlockSampler:
    """Seeded multi-block masks; ``sampler(batch_size)`` draws the next step's batch.

    grid: (rows, cols) of the patch grid. cfg: a ``MaskConfig`` (or any object with its fields).
    seed: the run's seed. rank, world: this process's rank and the number of processes; image b of
    this rank is image ``rank + b * world`` of the global batch.
    """

    def __init__(self, grid, cfg, seed: int = 0, rank: int = 0, impl: str | None = None, world: int = 1):
        if cfg.mode not in MODES:
            raise ValueError(f"mask.mode must be one of {MODES}, got {cfg.mode!r}")
        impl = impl or getattr(cfg, "sampler", "auto")
        if impl not in IMPLS:
            raise ValueError(f"mask.sampler must be one of {IMPLS}, got {impl!r}")
        self.grid = (int(grid[0]), int(grid[1]))
        self.cfg = cfg
        self.seed = int(seed)
        self.rank, self.world = int(rank), int(world)
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {rank} is not in 0 .. world-1 = {world - 1}")
        self.impl = impl
        self.step = 0  # the step whose masks the next call draws
        self._check_config()

    def native(self):
        """The compiled sampler module, or None when this sampler runs the Python path."""
        if self.impl == "python":
            return None
        from . import native

        mod = native.load()
        if mod is None and self.impl == "cpp":
            raise RuntimeError(f"mask.sampler=cpp but the compiled sampler is unavailable ({native.reason()}); "
                               f"use mask.sampler=auto or python")
        return mod

    # -- state, for checkpoints
    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step, "mode": self.cfg.mode}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode", self.cfg.mode) != self.cfg.mode:
            raise ValueError(f"checkpointed sampler used mask.mode={state['mode']!r}, this run {self.cfg.mode!r}")
        self.seed, self.step = int(state["seed"]), int(state["step"])

    def __call__(self, batch_size: int) -> MaskBatch:
        out = self.sample(batch_size, self.step)
        self.step += 1
        return out

    # -- sampling
    def block_sizes(self, step: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(target block size, context block size) of a step."""
        st = Stream(derive(self.seed, step, MASK64))
        c = self.cfg
        tgt = block_size(st.uniform(), c.target_scale, c.target_aspect, self.grid, c.mode)
        ctx = block_size(st.uniform(), c.context_scale, (1.0, 1.0), self.grid, c.mode)
        return tgt, ctx

    def sample(self, batch_size: int, step: int) -> MaskBatch:
        """The masks of ``step`` for ``batch_size`` images (independent of any earlier call)."""
        (th, tw), (ch, cw) = self.block_sizes(step)
        self._check_sizes(th, tw, ch, cw)
        mod = self.native()
        if mod is not None:
            return self._sample_native(mod, batch_size, step)
        return self._sample_python(batch_size, step, th, tw, ch, cw)

    def _native_args(self, batch_size: int, step: int) -> tuple:
        c = self.cfg
        return (self.seed, step, self.rank, self.world, batch_size, self.grid[0], self.grid[1], c.mode == "reference",
                c.num_targets, list(c.target_scale), list(c.target_aspect), c.num_context, list(c.context_scale),
                c.min_keep, c.allow_overlap)

    def _sample_native(self, mod, batch_size: int, step: int) -> MaskBatch:
        context, lens, targets, _ = mod.sample(*self._native_args(batch_size, step))
        if self.cfg.mode == "reference" or batch_size == 0 or bool((lens == lens.max()).all()):
            return MaskBatch(context, targets)
        return MaskBatch(context, targets, lens)

    def _sample_python(self, batch_size: int, step: int, th, tw, ch, cw) -> MaskBatch:
        c = self.cfg
        if batch_size == 0:
            empty = torch.zeros(c.num_context, 0, 0, dtype=torch.int64)
            return MaskBatch(empty, torch.zeros(c.num_targets, 0, th * tw, dtype=torch.int64))
        shift = 0 if c.mode == "reference" else 1  # reference: exclusive bound, last position never drawn
        draws = [self._draw_image(Stream(derive(self.seed, step, self.rank + b * self.world)), th, tw, ch, cw, shift)
                 for b in range(batch_size)]
        tgt_tl = torch.tensor([d[0] for d in draws], dtype=torch.int64).permute(1, 0, 2)  # [K, B, 2]
        ctx_tl = torch.tensor([d[1] for d in draws], dtype=torch.int64).permute(1, 0, 2)  # [M, B, 3]
        targets = _rect_indices(tgt_tl, th, tw, self.grid[1])
        context, lens = self._context_indices(tgt_tl, ctx_tl, th, tw, ch, cw)
        if c.mode == "reference":
            return MaskBatch(context[..., : int(lens.min())], targets)
        full = bool((lens == lens.max()).all())
        return MaskBatch(context[..., : int(lens.max())], targets, None if full else lens)

    def _check_config(self):
        """Every block size the scales can give must keep more than min_keep patches; checked once,
        at start-up, over a fine sweep of the uniform draw (the sizes are piecewise constant in it)."""
        c = self.cfg
        sweep = [i / 1000 for i in range(1001)]
        def area(size):
            return size[0] * size[1]

        tgt = min((block_size(r, c.target_scale, c.target_aspect, self.grid, c.mode) for r in sweep), key=area)
        ctx = min((block_size(r, c.context_scale, (1.0, 1.0), self.grid, c.mode) for r in sweep), key=area)
        try:
            self._check_sizes(*tgt, *ctx)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _check_sizes(self, th, tw, ch, cw):
        k = self.cfg.min_keep
        if th * tw <= k:
            raise ValueError(
                f"mask.min_keep={k}: target blocks can be as small as {th}x{tw} patches on this "
                f"{self.grid[0]}x{self.grid[1]} grid and never keep more than {k}; lower mask.min_keep, raise "
                f"mask.target_scale or use a finer grid (smaller patches or larger images)")
        if ch * cw <= k:
            raise ValueError(
                f"mask.min_keep={k}: context blocks can be as small as {ch}x{cw} patches and never keep more than "
                f"{k}; lower mask.min_keep or raise mask.context_scale")

    def _draw_image(self, st: Stream, th, tw, ch, cw, shift):
        """One image's draws: target corners, then each context block's corner and how many
        target blocks constrain it (after relaxations)."""
        gh, gw = self.grid
        c = self.cfg
        tgt = []
        cum = [[0] * gh]  # cum[n][row]: bitmask of columns covered by the first n target blocks
        bits = ((1 << tw) - 1)
        for _ in range(c.num_targets):
            top, left = st.randint(0, gh - th + shift), st.randint(0, gw - tw + shift)
            tgt.append((top, left))
            rows = list(cum[-1])
            for r in range(top, top + th):
                rows[r] |= bits << left
            cum.append(rows)
        ctx = []
        cbits = (1 << cw) - 1
        for _ in range(c.num_context):
            tries, fails = 0, 0
            while True:
                top, left = st.randint(0, gh - ch + shift), st.randint(0, gw - cw + shift)
                n = 0 if c.allow_overlap else max(c.num_targets - tries, 0)
                covered = cum[n]
                keep = sum(((cbits << left) & ~covered[r]).bit_count() for r in range(top, top + ch))
                if keep > c.min_keep:
                    break
                fails += 1
                if fails == RETRIES_PER_RELAXATION:
                    tries, fails = tries + 1, 0
            ctx.append((top, left, n))
        return tgt, ctx

    def _context_indices(self, tgt_tl, ctx_tl, th, tw, ch, cw):
        gh, gw = self.grid
        rows = torch.arange(gh).view(1, 1, gh, 1)
        cols = torch.arange(gw).view(1, 1, 1, gw)
        in_tgt = _in_rect(tgt_tl[..., 0], tgt_tl[..., 1], th, tw, rows, cols)  # [K, B, gh, gw]
        in_ctx = _in_rect(ctx_tl[..., 0], ctx_tl[..., 1], ch, cw, rows, cols)  # [M, B, gh, gw]
        k = tgt_tl.shape[0]
        active = torch.arange(k).view(1, 1, k) < ctx_tl[..., 2].unsqueeze(-1)  # [M, B, K]
        covered = (active[..., None, None] & in_tgt.transpose(0, 1).unsqueeze(0)).any(dim=2)
        keep = (in_ctx & ~covered).flatten(2)  # [M, B, N]
        lens = keep.sum(-1)
        order = torch.argsort((~keep).to(torch.uint8), dim=-1, stable=True)  # kept indices first, ascending
        pad = torch.arange(order.shape[-1]) >= lens.unsqueeze(-1)
        return order.masked_fill(pad, 0), lens


def _in_rect(top, left, h, w, rows, cols):
    top, left = top[..., None, None], left[..., None, None]
    return (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)


def _rect_indices(tl, h, w, gw):
    """[K, B, 2] corners -> [K, B, h * w] row-major indices of each block."""
    ii = torch.arange(h).repeat_interleave(w)
    jj = torch.arange(w).repeat(h)
    return (tl[..., :1] + ii) * gw + tl[..., 1:] + jj
