"""Top-k ranking metrics shared by every model (TIGER, most-popular, SASRec).

Protocol (docs/pipeline.md): leave-one-out, full ranking over the whole catalogue (no sampled
negatives), items already in the user's input history excluded from the ranking. Each user has
exactly one relevant item (the held-out target), so `recall@k` equals the hit rate and
`ndcg@k = 1 / log2(rank + 2)` with the 0-based rank of the target in the top k (0 if absent).

Pure numpy/torch: no I/O, no printing.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[int]]
# A batch of input histories: one item-row array per user, or a CSR pair (offsets (U+1,), indices).
Histories = Union[Sequence[ArrayLike], tuple]

DEFAULT_KS = (5, 10)
METRIC_NAMES = tuple(f"recall@{k}" for k in DEFAULT_KS) + tuple(f"ndcg@{k}" for k in DEFAULT_KS)
NO_ITEM = -1  # padding in ranked lists: "no item at this position"


def _as_numpy(x: ArrayLike) -> np.ndarray:
    """A numpy view of a tensor (moved to CPU) or array-like."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def target_ranks(ranked: ArrayLike, targets: ArrayLike) -> np.ndarray:
    """0-based position of each user's target in its ranked list, -1 when absent.

    ranked:  (U, K) int item rows, best first; NO_ITEM (-1) entries never match.
    targets: (U,) int item rows (>= 0).
    Returns (U,) int64. If an item appears twice in a list, its first position counts
    (a duplicate further down cannot improve the score).
    """
    ranked = _as_numpy(ranked)
    targets = _as_numpy(targets)
    if ranked.ndim != 2:
        raise ValueError(f"ranked must be a (users, K) array of item rows, got shape {ranked.shape}.")
    if targets.ndim != 1 or len(targets) != len(ranked):
        raise ValueError(f"targets must be a (users,) array matching ranked's {len(ranked)} rows, "
                         f"got shape {targets.shape}.")
    if not (np.issubdtype(ranked.dtype, np.integer) and np.issubdtype(targets.dtype, np.integer)):
        raise ValueError(f"ranked and targets must hold integer item rows, got {ranked.dtype} and {targets.dtype}.")
    if len(targets) and targets.min() < 0:
        raise ValueError(f"targets must be item rows >= 0, got {int(targets.min())} "
                         f"(user row {int(np.argmin(targets))}).")
    hits = ranked == targets[:, None]
    first_hit = hits.argmax(axis=1)
    return np.where(hits.any(axis=1), first_hit, -1).astype(np.int64)


def per_user_metrics(ranked: ArrayLike, targets: ArrayLike, ks: Sequence[int] = DEFAULT_KS) -> dict[str, np.ndarray]:
    """recall@k and ndcg@k of every user: {"recall@5": (U,) float64, ...}, all recalls first, then all NDCGs.

    ranked:  (U, K) int item rows, best first, K >= max(ks); -1 means "no item".
    targets: (U,) int, the held-out item row of each user.
    """
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive cutoffs, got {ks}.")
    ranks = target_ranks(ranked, targets)
    n_columns = _as_numpy(ranked).shape[1]
    if n_columns < max(ks):
        raise ValueError(f"ranked has {n_columns} columns but the largest cutoff is {max(ks)}: "
                         f"rank at least max(ks) items per user (pad with -1).")
    found = ranks >= 0
    gain = np.zeros(len(ranks), dtype=np.float64)
    gain[found] = 1.0 / np.log2(ranks[found] + 2.0)
    metrics = {f"recall@{k}": (found & (ranks < k)).astype(np.float64) for k in ks}
    metrics.update({f"ndcg@{k}": np.where(found & (ranks < k), gain, 0.0) for k in ks})
    return metrics


def ranking_metrics(ranked: ArrayLike, targets: ArrayLike, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean recall@k and ndcg@k over users.

    ranked:  (U, K) int item rows, best first, K >= max(ks); -1 means "no item".
    targets: (U,) int, the held-out item row of each user.
    Returns {"recall@5": ..., "recall@10": ..., "ndcg@5": ..., "ndcg@10": ...} for ks=(5, 10),
    all recalls first, then all NDCGs, each key carrying its cutoff.
    """
    per_user = per_user_metrics(ranked, targets, ks)
    if len(next(iter(per_user.values()))) == 0:
        raise ValueError("ranking_metrics got zero users; the mean over no users is undefined.")
    return {name: float(values.mean()) for name, values in per_user.items()}


def paired_bootstrap_ratio(a: ArrayLike, b: ArrayLike, n_resamples: int = 10_000,
                           seed: int = 0) -> tuple[float, np.ndarray]:
    """mean(a) / mean(b) of two models' per-user metrics on the same users, and that ratio over
    `n_resamples` paired bootstrap resamples of the users (each resample draws users with replacement and
    keeps both models' values of each drawn user together).

    a, b: (U,) per-user values (e.g. `per_user_metrics(...)["ndcg@10"]` of two models), user-aligned.
    Returns (ratio, (n_resamples,) float64 resampled ratios); a resample whose mean(b) is 0 gives inf or NaN.
    """
    a, b = _as_numpy(a).astype(np.float64), _as_numpy(b).astype(np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise ValueError(f"paired values need two (U,) arrays of the same users, got shapes {a.shape} and {b.shape}.")
    if b.mean() == 0:
        raise ValueError("the reference model's mean is 0: the ratio is undefined.")
    rng, ratios = np.random.default_rng(seed), np.empty(n_resamples)
    chunk = max(1, 2 ** 22 // len(a))  # resamples drawn at once: ~32 MiB of indices, whatever the user count
    with np.errstate(divide="ignore", invalid="ignore"):
        for start in range(0, n_resamples, chunk):
            rows = rng.integers(0, len(a), (min(chunk, n_resamples - start), len(a)))
            ratios[start:start + len(rows)] = a[rows].mean(1) / b[rows].mean(1)
    return float(a.mean() / b.mean()), ratios


def paired_summary(a: ArrayLike, b: ArrayLike) -> dict:
    """Means, standard errors of the means (sample std / sqrt(U)) and the Pearson correlation of two models'
    per-user metrics on the same users (a, b: (U,), user-aligned, U >= 2). The correlation is NaN when either
    model gives every user the same value (it is undefined there), never a silent 0."""
    a, b = _as_numpy(a).astype(np.float64), _as_numpy(b).astype(np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) < 2:
        raise ValueError(f"paired values need two (U,) arrays of the same users, U >= 2, got shapes {a.shape} "
                         f"and {b.shape}.")
    constant = np.ptp(a) == 0 or np.ptp(b) == 0  # exact: a constant array's std can round to ~1e-17
    return {"mean": (float(a.mean()), float(b.mean())),
            "standard_error": tuple(float(v.std(ddof=1) / np.sqrt(len(v))) for v in (a, b)),
            "correlation": float("nan") if constant else float(np.corrcoef(a, b)[0, 1])}


def with_untied(ranked: ArrayLike, targets: ArrayLike, untied: ArrayLike, ks: Sequence[int] = DEFAULT_KS) -> dict:
    """`ranking_metrics` over all users, plus "untied": the same over the users whose `untied` (U,) bool is
    True (their target's timestamp differs from the previous event's), with their count "n_users"
    (NaN means when there are none, never a silent 0)."""
    per_user = per_user_metrics(ranked, targets, ks)
    untied = _as_numpy(untied).astype(bool)
    if len(untied) != len(targets):
        raise ValueError(f"untied has {len(untied)} entries for {len(targets)} users.")
    if len(untied) == 0:
        raise ValueError("with_untied got zero users; the mean over no users is undefined.")
    n = int(untied.sum())
    subset = {name: float(values[untied].mean()) if n else float("nan") for name, values in per_user.items()}
    return {name: float(values.mean()) for name, values in per_user.items()} | {"untied": subset | {"n_users": n}}


def seen_mask(histories: Histories, n_users: int, n_items: int,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """(n_users, n_items) bool, True where the item is in the user's input history.

    histories: a list of n_users item-row arrays, or a tuple (offsets (n_users+1,), indices)
    in CSR form (user u owns indices[offsets[u]:offsets[u+1]]; offsets need not start at 0).
    """
    rows, cols = _history_coordinates(histories, n_users)
    if len(cols) and (cols.min() < 0 or cols.max() >= n_items):
        raise ValueError(f"histories hold item rows outside 0..{n_items - 1} "
                         f"(min {int(cols.min())}, max {int(cols.max())}); they must index the score columns.")
    mask = torch.zeros(n_users, n_items, dtype=torch.bool, device=device)
    mask[torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device)] = True
    return mask


def _history_coordinates(histories: Histories, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat (user row, item row) pairs of every history event, built without a per-item loop."""
    if isinstance(histories, tuple):
        if len(histories) != 2:
            raise ValueError("a tuple of histories is read as CSR (offsets, indices); "
                             "pass a list of per-user arrays instead.")
        offsets = _as_numpy(histories[0]).astype(np.int64)
        indices = _as_numpy(histories[1])
        if offsets.ndim != 1 or len(offsets) != n_users + 1:
            raise ValueError(f"CSR offsets must have n_users + 1 = {n_users + 1} entries, got shape "
                             f"{offsets.shape}; to pass one array per user use a list, not a tuple.")
        lengths = np.diff(offsets)
        if len(lengths) and lengths.min() < 0:
            raise ValueError("CSR offsets must be non-decreasing.")
        if offsets[-1] > len(indices):
            raise ValueError(f"CSR offsets end at {int(offsets[-1])} but indices has {len(indices)} entries.")
        cols = indices[offsets[0]:offsets[-1]]
    else:
        if len(histories) != n_users:
            raise ValueError(f"got {len(histories)} histories for {n_users} score rows; pass one per user.")
        arrays = [_as_numpy(h).reshape(-1) for h in histories]
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        cols = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    rows = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    return rows, cols.astype(np.int64, copy=False)


def topk_unseen(scores: torch.Tensor, histories: Histories, k: int) -> torch.Tensor:
    """The k best-scoring items per user that are not in the user's input history.

    scores:    (U, N) float tensor, higher is better, one column per item row.
    histories: the users' input histories (see `seen_mask`); those items are never returned.
    Returns (U, k) int64 on scores' device, best first. Ties are broken by the lower item row, so
    results are reproducible. When fewer than k items are unseen (or k > N), the tail is -1.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (users, items), got shape {tuple(scores.shape)}.")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    n_users, n_items = scores.shape
    if n_items == 0:
        raise ValueError("scores have zero item columns; there is nothing to rank.")
    scores = scores.detach().float()
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; the model diverged or produced invalid logits.")
    seen = seen_mask(histories, n_users, n_items, device=scores.device)
    # A model's own -inf becomes the lowest finite value so that seen items rank strictly below it.
    masked = scores.clamp(min=torch.finfo(torch.float32).min).masked_fill(seen, float("-inf"))
    n_kept = min(k, n_items)
    ranked = _deterministic_topk(masked, n_kept)
    ranked_scores = masked.gather(1, ranked)
    ranked = ranked.masked_fill(ranked_scores == float("-inf"), NO_ITEM)
    if n_kept < k:
        padding = torch.full((n_users, k - n_kept), NO_ITEM, dtype=ranked.dtype, device=ranked.device)
        ranked = torch.cat([ranked, padding], dim=1)
    return ranked


def _deterministic_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(U, k) column indices of the top-k scores, ties broken by the lower column.

    torch.topk alone picks arbitrarily among tied values (popularity counts tie a lot); a full
    stable sort is ~50x slower on CPU. So: take topk's k-th value as a threshold, keep every
    column above it plus the lowest tied columns to fill k, then stably sort those k.
    """
    threshold = scores.topk(k, dim=1).values[:, -1:]
    above = scores > threshold
    tied = scores == threshold
    room = k - above.sum(dim=1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(dim=1) <= room))
    columns = chosen.nonzero()[:, 1].view(scores.shape[0], k)  # ascending column order per row
    order = scores.gather(1, columns).argsort(dim=1, descending=True, stable=True)
    return columns.gather(1, order)
