"""Cold-start split and the epsilon rule: items nobody has rated yet, which only content can reach.

A seeded fraction of the rated items is held out as *cold*, in two halves (validation, test). Every event
on a cold item leaves the training data; a user's cold example is their first event on an item of one
half, with their warm events before it as the input history (TIGER section 4.3's setting, built so that a
small dataset still gives hundreds of examples). A ranked list under the epsilon rule keeps the model's
best warm items in its first K - m slots and its best cold items in the last m = floor(epsilon * K + 1/2).

Pure numpy/torch: no I/O, no printing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from modules.metrics import NO_ITEM, per_user_metrics

WARM, COLD_VALID, COLD_TEST = 0, 1, 2
HALVES = {"valid": COLD_VALID, "test": COLD_TEST}


def cold_slots(k: int, epsilon: float) -> int:
    """Slots of a top-k list reserved for cold items: floor(epsilon * k + 1/2) (0.1 of 5 is 1, not 0)."""
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon = {epsilon}: the share of the top-k reserved for cold items must be in [0, 1].")
    return min(k, int(math.floor(epsilon * k + 0.5)))


def choose_cold_items(rated_rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded `fraction` of the rated item rows, as (validation half, test half), each sorted.

    The count is round(fraction * rated), at least 2 so that each half has one item; the validation
    half gets the smaller share when the count is odd.
    """
    rated_rows = np.unique(np.asarray(rated_rows, dtype=np.int64))
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"cold fraction = {fraction}: it must be in (0, 1), e.g. 0.05.")
    n_cold = max(2, int(round(fraction * len(rated_rows))))
    if n_cold >= len(rated_rows):
        raise ValueError(f"cold fraction = {fraction} of {len(rated_rows)} rated items leaves no warm item.")
    chosen = np.random.default_rng([seed, 0xC01D]).permutation(rated_rows)[:n_cold]
    half = n_cold // 2
    return np.sort(chosen[:half]), np.sort(chosen[half:])


def cold_labels(n_items: int, valid_rows: np.ndarray, test_rows: np.ndarray) -> np.ndarray:
    """(N,) int8: WARM, COLD_VALID or COLD_TEST for every item row."""
    labels = np.zeros(n_items, dtype=np.int8)
    labels[np.asarray(valid_rows, dtype=np.int64)] = COLD_VALID
    labels[np.asarray(test_rows, dtype=np.int64)] = COLD_TEST
    if np.intersect1d(valid_rows, test_rows).size:
        raise ValueError("an item is in both cold halves.")
    return labels


@dataclass(frozen=True)
class ColdExamples:
    """One example per (user, half), in the coordinates of the warm CSR arrays.

    user_row (C,): the user's row in the warm histories; end (C,): exclusive end of the input history (the
    warm events before the cold event) in the warm CSR; target (C,): the cold item row; timestamp (C,): the
    cold event's unix seconds (None for splits written before it was recorded).
    """

    user_row: np.ndarray
    end: np.ndarray
    target: np.ndarray
    timestamp: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.target)


@dataclass(frozen=True)
class ColdSplit:
    """Which events and users stay warm, and the cold examples.

    keep (E,) bool: the warm events kept (in the original CSR order); kept_users (U,) bool: users with at
    least `min_warm_events` warm events (the others leave the run); offsets (U'+1,): the warm CSR offsets.
    """

    keep: np.ndarray
    kept_users: np.ndarray
    offsets: np.ndarray
    valid: ColdExamples
    test: ColdExamples
    n_cold_events: int


def split_cold(offsets: np.ndarray, item_index: np.ndarray, labels: np.ndarray, min_warm_events: int = 3,
               min_history: int = 1, timestamps: np.ndarray | None = None) -> ColdSplit:
    """Remove every event on a cold item from time-ordered CSR histories and form the cold examples.

    offsets (U+1,), item_index (E,): the histories; labels (N,): `cold_labels`. A user keeps their warm
    events if they have at least `min_warm_events` (leave-one-out needs 3). A user's example for a half is
    their first event on an item of that half, kept when at least `min_history` warm events precede it;
    its input is those warm events (never a cold item, of either half). timestamps (E,): when given, each
    example records its cold event's (`ColdExamples.timestamp`, for the untied subset of the evaluation).
    """
    offsets, item_index = np.asarray(offsets, dtype=np.int64), np.asarray(item_index)
    lengths = np.diff(offsets)
    user = np.repeat(np.arange(len(lengths)), lengths)
    label = np.asarray(labels)[item_index]
    warm = label == WARM
    warm_count = np.bincount(user[warm], minlength=len(lengths))
    kept_users = warm_count >= min_warm_events
    keep = warm & kept_users[user]
    new_row = np.cumsum(kept_users) - 1
    new_offsets = np.r_[0, np.cumsum(warm_count[kept_users])].astype(np.int64)
    warm_cumsum = np.cumsum(warm)
    warm_before = warm_cumsum - warm - np.repeat(np.r_[0, warm_cumsum][offsets[:-1]], lengths)

    def examples(half: int) -> ColdExamples:
        events = np.flatnonzero((label == half) & kept_users[user])
        first = events[np.r_[True, user[events][1:] != user[events][:-1]]] if len(events) else events
        first = first[warm_before[first] >= min_history]
        rows = new_row[user[first]]
        return ColdExamples(user_row=rows.astype(np.int64), end=new_offsets[rows] + warm_before[first],
                            target=item_index[first].astype(np.int64),
                            timestamp=None if timestamps is None else np.asarray(timestamps)[first].astype(np.int64))

    return ColdSplit(keep=keep, kept_users=kept_users, offsets=new_offsets, valid=examples(COLD_VALID),
                     test=examples(COLD_TEST), n_cold_events=int((~warm).sum()))


def reserve_cold(warm_ranked: np.ndarray, cold_ranked: np.ndarray, k: int, epsilon: float) -> np.ndarray:
    """(B, k) top-k under the epsilon rule: the first k - m best warm items, then the m best cold ones.

    warm_ranked (B, >= k) and cold_ranked (B, >= m): each model's own order inside each group; NO_ITEM pads.
    """
    m = cold_slots(k, epsilon)
    if warm_ranked.shape[1] < k - m or cold_ranked.shape[1] < m:
        raise ValueError(f"need {k - m} warm and {m} cold items per row, got {warm_ranked.shape[1]} and "
                         f"{cold_ranked.shape[1]}.")
    return np.concatenate([warm_ranked[:, :k - m], cold_ranked[:, :m]], axis=1)


def reserved_metrics(warm_ranked: np.ndarray, cold_ranked: np.ndarray, targets: np.ndarray, epsilon: float,
                     ks=(5, 10)) -> dict[str, np.ndarray]:
    """Per-example recall@k / ndcg@k of the epsilon-rule list, one list per k (`reserve_cold`)."""
    out = {}
    for k in ks:
        out |= per_user_metrics(reserve_cold(warm_ranked, cold_ranked, k, epsilon), targets, ks=(k,))
    return out


def top_in_group(scores: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) int64 item rows of the k best `scores` among `allowed` (B, N) items; NO_ITEM past the allowed
    ones. Ties go to the lower item row (a stable, machine-independent order)."""
    masked = scores.float().masked_fill(~allowed, float("-inf"))
    k_eff = min(k, masked.shape[1])
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :k_eff]
    values = masked.gather(1, order)
    order = order.masked_fill(values == float("-inf"), NO_ITEM)
    if k_eff < k:
        order = torch.cat([order, torch.full((len(order), k - k_eff), NO_ITEM, dtype=order.dtype)], dim=1)
    return order


def recent_mean(unit_features: torch.Tensor, histories: list[np.ndarray], n_recent: int) -> torch.Tensor:
    """(B, F) mean of the unit feature rows of each history's last `n_recent` items (Semantic-KNN's query)."""
    if n_recent < 1:
        raise ValueError(f"n_recent = {n_recent} must be >= 1.")
    rows = [torch.as_tensor(np.asarray(h[-n_recent:], dtype=np.int64)) for h in histories]
    if any(len(r) == 0 for r in rows):
        raise ValueError("a Semantic-KNN query needs at least one history item.")
    return torch.stack([unit_features[r].mean(0) for r in rows])


def unit_rows(features: np.ndarray) -> torch.Tensor:
    """Rows centred on the catalogue mean and scaled to unit L2 norm (cosine similarity by dot product).

    A row that is the mean itself (no content at all) is an error, never a silent zero vector."""
    centred = torch.as_tensor(features, dtype=torch.float32)
    centred = centred - centred.mean(0, keepdim=True)
    norms = centred.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError(f"{int((norms == 0).sum())} item feature rows equal the catalogue mean: cosine similarity "
                         "is undefined for them; check the fused features.")
    return centred / norms
