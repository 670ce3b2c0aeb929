"""Pure-numpy helpers for fusing item feature blocks: standardise, PCA, weight.

A block is an `(N, D)` float matrix plus an optional `(N,)` bool mask of the rows that really have
the block (a movie without a poster, or without tag-genome scores). Statistics are fitted on the
rows that have the block only; rows without it get the neutral value 0 *after* standardisation
(the block mean), so a missing block never looks like a real, extreme feature.
"""
from __future__ import annotations

import numpy as np


def standardise(values: np.ndarray, mask: np.ndarray | None = None, eps: float = 1e-6) -> np.ndarray:
    """Z-score every column over the rows in `mask`; rows outside `mask` become 0.

    values: (N, D) float. mask: (N,) bool or None (all rows). Returns (N, D) float32.
    Constant columns (std < eps) become 0 instead of dividing by ~0.
    """
    values = np.asarray(values, dtype=np.float32)
    mask = np.ones(len(values), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    out = np.zeros_like(values)
    if not mask.any():
        return out
    present = values[mask]
    mean = present.mean(axis=0)
    std = present.std(axis=0)
    scale = np.where(std < eps, 0.0, 1.0 / np.maximum(std, eps)).astype(np.float32)
    out[mask] = (present - mean) * scale
    return out


def centre_and_scale(values: np.ndarray, mask: np.ndarray | None = None, eps: float = 1e-6) -> np.ndarray:
    """Centre over the rows in `mask` and divide the whole block by one scalar so the mean column variance is 1.

    For blocks whose geometry matters as a whole (L2-normalised TF-IDF, genome relevances, text
    embeddings): per-column z-scores would blow a tag seen on 2 movies up to a z of ~20.
    values: (N, D). Returns (N, D) float32 with rows outside `mask` set to 0.
    """
    values = np.asarray(values, dtype=np.float32)
    mask = np.ones(len(values), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    out = np.zeros_like(values)
    if not mask.any():
        return out
    present = values[mask] - values[mask].mean(axis=0)
    out[mask] = present / max(float(np.sqrt(present.var(axis=0).mean())), eps)
    return out


def pca(values: np.ndarray, n_components: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Project `values` onto its top principal components, fitted on the rows in `mask`.

    values: (N, D). Returns (projected (N, k) float32 with k = min(n_components, D, rows in mask),
    explained_variance_ratio (k,) float64). Rows outside `mask` are projected too (callers zero them).
    The covariance is D x D, so this stays cheap for N in the tens of thousands and D ~ 2,048.
    """
    values = np.asarray(values, dtype=np.float64)
    mask = np.ones(len(values), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    present = values[mask]
    if len(present) < 2:
        raise ValueError(f"PCA needs at least 2 rows that have the block, got {len(present)}.")
    mean = present.mean(axis=0)
    centred = present - mean
    covariance = centred.T @ centred / (len(present) - 1)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending order
    order = np.argsort(eigenvalues)[::-1]
    k = int(min(n_components, values.shape[1], len(present)))
    top = eigenvectors[:, order[:k]]
    total = max(float(eigenvalues.clip(min=0).sum()), 1e-12)
    explained = eigenvalues[order[:k]].clip(min=0) / total
    return ((values - mean) @ top).astype(np.float32), explained


def block_scale(weight: float, n_columns: int) -> float:
    """Multiplier that gives a standardised block of `n_columns` a total variance of `weight**2`.

    Each standardised column has unit variance, so a 1,280-column poster block would otherwise
    carry 64x the squared-distance mass of a 20-column genre block; dividing by sqrt(D) makes
    every block count equally before the configured weight is applied.
    """
    return float(weight) / float(np.sqrt(max(n_columns, 1)))
