"""Most-popular baseline: rank every unseen item by how often it occurs in the training events.

Popularity is counted over training events only (leave-one-out: everything but each user's last
two events), so neither validation nor test targets leak into the ranking. Pure numpy/torch.
"""
from __future__ import annotations

import numpy as np
import torch

from modules.metrics import Histories, topk_unseen
from modules.split import LeaveOneOut


def training_event_mask(split: LeaveOneOut, n_events: int) -> np.ndarray:
    """(E,) bool, True for events in some user's training range [starts, valid_pos).

    Built from the ranges themselves (not "all but the last two"), so it stays correct for any split
    that keeps each user's training events contiguous.
    """
    lengths = split.valid_pos - split.starts
    if len(lengths) and lengths.min() < 0:
        raise ValueError("split has a user whose validation position precedes its first event.")
    # Event positions of every training range, concatenated without a per-user loop:
    # position = start of its range + offset inside the range.
    range_starts = np.repeat(split.starts, lengths)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    mask = np.zeros(n_events, dtype=bool)
    mask[range_starts + within] = True
    return mask


def item_popularity(item_index: np.ndarray, split: LeaveOneOut, n_items: int) -> np.ndarray:
    """(N,) int64 number of training events of each item row.

    item_index: (E,) item row of every event (CSR `Interactions.item_index`).
    split:      the leave-one-out positions into those events.
    """
    item_index = np.asarray(item_index)
    train_items = item_index[training_event_mask(split, len(item_index))]
    if len(train_items) and train_items.max() >= n_items:
        raise ValueError(f"training events refer to item row {int(train_items.max())} but the catalogue has "
                         f"{n_items} items.")
    return np.bincount(train_items, minlength=n_items).astype(np.int64)


def popularity_log_likelihood(popularity: np.ndarray, items: np.ndarray, smoothing: float = 1.0) -> np.ndarray:
    """log p(item) of the smoothed popularity distribution (count + smoothing) / (total + N * smoothing).

    popularity: (N,) training-event counts (`item_popularity`); items: item rows -> float64 of items' shape.
    The reference likelihood for a sequential model's (`modules.beam_search.item_log_likelihood`):
    a model that has learned nothing beyond popularity scores about this.
    """
    if smoothing <= 0:
        raise ValueError(f"smoothing = {smoothing} must be > 0: an item unseen in training would get log 0.")
    counts = np.asarray(popularity, dtype=np.float64) + smoothing
    items = np.asarray(items)
    if items.size and (items.min() < 0 or items.max() >= len(counts)):
        raise ValueError(f"item rows must be in 0..{len(counts) - 1}, got {items.min()}..{items.max()}.")
    return np.log(counts[items] / counts.sum())


class MostPopular:
    """Recommends the most frequent training items the user has not seen yet.

    popularity: (N,) training-event count per item row (see `item_popularity`).
    """

    def __init__(self, popularity: np.ndarray):
        self.popularity = torch.as_tensor(np.asarray(popularity), dtype=torch.float32)

    def recommend(self, histories: Histories, k: int) -> torch.Tensor:
        """(U, k) int64 item rows, most popular first, excluding each user's history; ties by lower row."""
        n_users = len(histories[0]) - 1 if isinstance(histories, tuple) else len(histories)
        scores = self.popularity.expand(n_users, -1)
        return topk_unseen(scores, histories, k)
