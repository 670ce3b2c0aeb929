"""Platform-independent 64-bit hashing of integer ids (numpy, no I/O)."""
from __future__ import annotations

import numpy as np


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of every element of `x` (any integer array) -> uint64, same shape."""
    x = np.asarray(x).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def pair_hash(first: np.ndarray, second: np.ndarray, key: int = 0) -> np.ndarray:
    """(E,) uint64 keyed hash of the pairs (first[i], second[i]): fixed for the same ids and key, and with
    no order that a model could learn from either id alone."""
    with np.errstate(over="ignore"):
        return splitmix64(splitmix64(np.asarray(first).astype(np.uint64) ^ np.uint64(key))
                          ^ np.asarray(second).astype(np.uint64))
