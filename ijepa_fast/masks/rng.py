"""A small counter-based random number generator, specified bit for bit.

The mask samplers (this Python one and the C++ one in ``csrc/``) must draw identical numbers for
the same seed, so neither uses a library generator. Everything here is unsigned 64-bit integer
arithmetic (modulo 2**64) and IEEE double arithmetic:

- ``splitmix64(x)``: ``x += 0x9E3779B97F4A7C15``, then the splitmix64 finaliser of ``x``.
- ``derive(seed, *words)``: ``s = splitmix64(seed)``; for each word ``s = splitmix64(s ^ word)``.
  Every stream is named by such a key, so any batch or image can be drawn without drawing the
  ones before it. (Hashing the seed first keeps (seed, step) pairs apart: without it seed 0 at
  step 1 and seed 1 at step 0 would name the same stream.)
- A ``Stream`` with state ``s`` returns ``splitmix64(s + i * 0x9E3779B97F4A7C15)`` for its
  ``i``-th draw (i = 0, 1, ...).
- ``uniform()``: ``(u >> 11) * 2**-53``, in [0, 1).
- ``randint(lo, hi)``: ``lo + ((u * (hi - lo)) >> 64)``, in [lo, hi) (multiply-shift, no modulo).
"""
from __future__ import annotations

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def splitmix64(x: int) -> int:
    z = (x + GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def derive(seed: int, *words: int) -> int:
    s = splitmix64(seed & MASK64)
    for w in words:
        s = splitmix64(s ^ (w & MASK64))
    return s


class Stream:
    """Sequential draws from one derived key."""

    __slots__ = ("_state",)

    def __init__(self, key: int):
        self._state = key & MASK64

    def next_u64(self) -> int:
        out = splitmix64(self._state)
        self._state = (self._state + GOLDEN) & MASK64
        return out

    def uniform(self) -> float:
        return (self.next_u64() >> 11) * (1.0 / 9007199254740992.0)

    def randint(self, lo: int, hi: int) -> int:
        if hi <= lo:
            raise ValueError(f"empty range [{lo}, {hi})")
        return lo + ((self.next_u64() * (hi - lo)) >> 64)
