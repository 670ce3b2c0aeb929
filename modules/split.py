"""Leave-one-out split over CSR user histories (RecBole's and TIGER's protocol).

For a user whose time-ordered history `h` has length n (n >= 3):
    train      = h[:n-2]
    validation = target h[n-2], model input h[:n-2]
    test       = target h[n-1], model input h[:n-1]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LeaveOneOut:
    """Positions into the CSR event arrays (`Interactions.item_index`), one per user.

    starts:    (U,) first event of each user.
    valid_pos: (U,) the validation event; the training history is [starts, valid_pos).
    test_pos:  (U,) the test event (the user's last); its input history is [starts, test_pos).
    """

    starts: np.ndarray
    valid_pos: np.ndarray
    test_pos: np.ndarray

    def train_slice(self, user_row: int) -> slice:
        """Events of user `user_row` used for training."""
        return slice(int(self.starts[user_row]), int(self.valid_pos[user_row]))


def leave_one_out(offsets: np.ndarray) -> LeaveOneOut:
    """Split CSR offsets `(U+1,)` into train / validation / test positions.

    Raises ValueError if any user has fewer than 3 events (k-core filtering with a minimum of
    at least 3 guarantees this never happens).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    if len(lengths) and lengths.min() < 3:
        short = int(np.flatnonzero(lengths < 3)[0])
        raise ValueError(f"user row {short} has {int(lengths[short])} interactions; leave-one-out needs at least 3 "
                         "(prepare with min_user_interactions >= 3).")
    return LeaveOneOut(starts=offsets[:-1].copy(), valid_pos=offsets[1:] - 2, test_pos=offsets[1:] - 1)


def tied_with_previous(offsets: np.ndarray, timestamps: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(P,) bool: whether the event at each CSR position has the same timestamp as the user's previous event.

    Inside such a tie the order is the preparation's tie-break, not behaviour; metrics are also
    reported on the targets that are not tied ("untied"). A user's first event is never tied.
    """
    offsets, positions = np.asarray(offsets, dtype=np.int64), np.asarray(positions, dtype=np.int64)
    timestamps = np.asarray(timestamps)
    first = np.isin(positions, offsets[:-1])
    previous = timestamps[np.maximum(positions - 1, 0)]
    return ~first & (timestamps[positions] == previous)
