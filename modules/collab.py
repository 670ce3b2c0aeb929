"""Collaborative item vectors: who-watches-what, as positive shifted PMI of co-occurrence, factorised by SVD.

Items play words and a user's time-ordered history plays a sentence (item2vec, Barkan & Koenigstein 2016).
Skip-gram with k negative samples implicitly factorises PMI - log k (Levy & Goldberg 2014); the truncated SVD
of the positive part (SPPMI) is its count-based counterpart, with vectors U_d sqrt(S_d) (Levy, Goldberg &
Dagan 2015, section 3.3, "symmetric" eigenvalue weighting).

Co-occurrence (`cooccurrence`): two events of one user co-occur when at most `window` positions apart in the
user's history (window=None: every pair of the user's distinct items, i.e. X^T X of the binary user-item
matrix). Each co-occurring pair of events counts 1, whatever its distance; an item never co-occurs with itself.
Cost: window w enumerates at most E * w pairs; window=None enumerates sum_u n_u (n_u - 1) / 2, which is fine
for ml-latest-small (3e7) but not for ML-25M (users with thousands of ratings): use a window there.
Pairs are counted in chunks (sort + run-length) and merged, so memory follows the distinct pairs, not E * w.

PMI(i, j) = log(C_ij D / (c_i c_j)) with C the symmetric counts, c_i = sum_j C_ij, D = sum_ij C_ij;
SPPMI = max(PMI - log(shift), 0). The SVD is a randomised range finder with power iterations (Halko,
Martinsson & Tropp 2011, algorithms 4.4 and 5.1) over a torch sparse CSR matrix, seeded by its own generator.

An item whose SPPMI row is empty (no training event, only events alone in a history, or only pairs at or below
chance after the shift) gets has_vector False and an all-zero row: the caller masks it, never reads it.
Pure numpy/torch: no I/O, no printing.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch


def pmi_svd(user_idx: np.ndarray, item_idx: np.ndarray, n_items: int, dims: int, window: int | None = None,
            shift: float = 1.0, seed: int = 0, power_iterations: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Item vectors from the SPPMI of co-occurrence within users' histories.

    user_idx, item_idx: (E,) int, one event each; each user's events in time order (users may interleave).
    n_items: catalogue size (item rows 0..n_items-1). dims: vector width. window, shift: see the module doc.
    Returns (vectors (n_items, dims) float32, has_vector (n_items,) bool); rows without a vector are 0.
    Raises ValueError when fewer than `dims` items have a vector.
    """
    rows, cols, counts = cooccurrence(user_idx, item_idx, n_items, window)
    rows, cols, values = shifted_ppmi(rows, cols, counts, n_items, shift)
    has_vector = np.zeros(n_items, dtype=bool)
    has_vector[rows] = True
    has_vector[cols] = True
    n_with = int(has_vector.sum())
    if not 0 < dims <= n_with:
        raise ValueError(f"collaborative vectors of dims={dims} asked for, but only {n_with} of {n_items} items "
                         f"co-occur with another item above chance in the training events (window={window}, "
                         f"shift={shift}): choose dims between 1 and {n_with}.")
    u, s = symmetric_svd(_symmetric_csr(rows, cols, values, n_items), dims, seed=seed,
                         power_iterations=power_iterations)
    vectors = (u * np.sqrt(s)).astype(np.float32)
    vectors[~has_vector] = 0.0
    return vectors, has_vector


def cooccurrence(user_idx: np.ndarray, item_idx: np.ndarray, n_items: int, window: int | None = None,
                 chunk_pairs: int = 1 << 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Upper-triangular co-occurrence counts (row < col), sorted by (row, col).

    Inputs as in `pmi_svd`. Returns rows (P,) int64, cols (P,) int64, counts (P,) int64: the number of
    co-occurring event pairs of items (row, col) over all users; the matrix is symmetric, so only row < col
    is stored. chunk_pairs: pairs enumerated before they are counted and merged (bounds the memory).
    """
    user_idx, item_idx = _check_events(user_idx, item_idx, n_items, window)
    order = np.argsort(user_idx, kind="stable")   # group by user, keep each user's time order
    users, items = user_idx[order], item_idx[order]
    if window is None:   # all pairs of a user's distinct items: drop repeats, keep first occurrences in order
        _, first = np.unique(users * n_items + items, return_index=True)
        first.sort()
        users, items = users[first], items[first]
    if len(users) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty.copy()
    # remaining[p]: later events of the same user, so (p, p + lag) is a pair of one user iff lag <= remaining[p].
    user_end = np.flatnonzero(np.r_[users[1:] != users[:-1], True])
    ends = np.repeat(user_end, np.diff(np.r_[-1, user_end]))
    remaining = ends - np.arange(len(users))
    max_lag = int(remaining.max()) if window is None else min(window, int(remaining.max()))
    by_remaining = np.argsort(-remaining, kind="stable")
    descending = remaining[by_remaining]
    counter, pending, n_pending = _PairCounter(), [], 0
    for lag in range(1, max_lag + 1):
        # Positions with at least `lag` later events of their user: a prefix of `by_remaining`, so the work
        # over all lags is the number of pairs, not max_lag * E.
        positions = by_remaining[:np.searchsorted(-descending, -lag, side="right")]
        a, b = items[positions], items[positions + lag]
        low, high = np.minimum(a, b), np.maximum(a, b)
        distinct = low != high
        pending.append(low[distinct] * n_items + high[distinct])
        n_pending += len(pending[-1])
        if n_pending >= chunk_pairs:
            counter.add(np.concatenate(pending))
            pending, n_pending = [], 0
    if pending:
        counter.add(np.concatenate(pending))
    keys, counts = counter.result()
    return keys // n_items, keys % n_items, counts


def shifted_ppmi(rows: np.ndarray, cols: np.ndarray, counts: np.ndarray, n_items: int,
                 shift: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positive shifted PMI of upper-triangular symmetric counts (`cooccurrence`); only entries > 0 are kept.

    Returns rows, cols (K,) int64 (row < col) and values (K,) float32, max(PMI - log(shift), 0) > 0.
    """
    if shift < 1.0:
        raise ValueError(f"shift = {shift}: the PMI shift is a number of negative samples k >= 1 "
                         f"(log k is subtracted; 1 is plain PPMI).")
    counts = np.asarray(counts, dtype=np.float64)
    marginal = np.bincount(rows, counts, n_items) + np.bincount(cols, counts, n_items)
    total = 2.0 * counts.sum()
    with np.errstate(divide="ignore"):
        pmi = np.log(counts) + np.log(total) - np.log(marginal[rows]) - np.log(marginal[cols]) - np.log(shift)
    keep = pmi > 0
    return rows[keep], cols[keep], pmi[keep].astype(np.float32)


def symmetric_svd(matrix: torch.Tensor, rank: int, oversample: int = 10, power_iterations: int = 4,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-`rank` singular vectors and values of a symmetric (n, n) matrix (dense or sparse CSR).

    Randomised range finder with `power_iterations` subspace iterations, each re-orthonormalised (Halko et
    al. 2011, algorithm 4.4), then the exact SVD of the small projection. Signs are fixed so that each
    vector's largest-magnitude entry is positive. Returns u (n, rank) float64, s (rank,) float64 descending.
    """
    n = matrix.shape[0]
    width = min(rank + oversample, n)
    generator = torch.Generator().manual_seed(seed)
    sketch = torch.randn(n, width, generator=generator, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ sketch).Q
    for _ in range(power_iterations):   # A is symmetric: A^T Q = A Q
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix @ basis).Q).Q
    projected = (matrix @ basis).T.double()   # B = Q^T A, (width, n)
    small_u, s, _ = torch.linalg.svd(projected, full_matrices=False)
    u = (basis.double() @ small_u)[:, :rank].numpy()
    s = s[:rank].numpy()
    signs = np.sign(u[np.abs(u).argmax(axis=0), np.arange(u.shape[1])])
    return u * np.where(signs == 0, 1.0, signs), s


def _symmetric_csr(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n: int) -> torch.Tensor:
    """(n, n) float32 torch sparse CSR of the upper-triangular entries and their mirror images."""
    full_rows, full_cols = np.concatenate([rows, cols]), np.concatenate([cols, rows])
    order = np.argsort(full_rows * n + full_cols, kind="stable")
    crow = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(full_rows, minlength=n), out=crow[1:])
    with warnings.catch_warnings():   # torch flags sparse CSR as beta on first use; it is what we want
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(full_cols[order]),
                                       torch.from_numpy(np.concatenate([values, values])[order]), (n, n),
                                       dtype=torch.float32, check_invariants=False)


class _PairCounter:
    """Counts of int64 pair keys, added in chunks: each chunk is sorted and run-length counted, and tables of
    similar size are merged (a log-structured merge), so the total work is O(P log P) for P keys."""

    def __init__(self):
        self.tables: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, keys: np.ndarray) -> None:
        self.tables.append(np.unique(keys, return_counts=True))
        while len(self.tables) > 1 and len(self.tables[-2][0]) <= 2 * len(self.tables[-1][0]):
            self.tables.append(_merge(self.tables.pop(), self.tables.pop()))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.tables:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        while len(self.tables) > 1:
            self.tables.append(_merge(self.tables.pop(), self.tables.pop()))
        keys, counts = self.tables[0]
        return keys.astype(np.int64), counts.astype(np.int64)


def _merge(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Sum two sorted (keys, counts) tables into one."""
    keys, counts = np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])
    order = np.argsort(keys, kind="stable")   # two sorted runs: timsort merges them in linear time
    keys, counts = keys[order], counts[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return keys[starts], np.add.reduceat(counts, starts)


def _check_events(user_idx, item_idx, n_items: int, window: int | None) -> tuple[np.ndarray, np.ndarray]:
    user_idx, item_idx = np.asarray(user_idx, dtype=np.int64), np.asarray(item_idx, dtype=np.int64)
    if user_idx.shape != item_idx.shape or user_idx.ndim != 1:
        raise ValueError(f"user_idx {user_idx.shape} and item_idx {item_idx.shape} must be 1-d and of one length.")
    if len(item_idx) and (item_idx.min() < 0 or item_idx.max() >= n_items):
        raise ValueError(f"item_idx holds rows outside 0..{n_items - 1} (min {item_idx.min()}, max "
                         f"{item_idx.max()}): pass the catalogue size as n_items.")
    if window is not None and window < 1:
        raise ValueError(f"window = {window}: pairs are events at most `window` positions apart, so it must be "
                         f">= 1 (or None for every pair of a user's items).")
    return user_idx, item_idx
