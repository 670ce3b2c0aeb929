"""Iterative k-core filtering of interaction events (pure numpy)."""
from __future__ import annotations

import numpy as np


def kcore_mask(user_code: np.ndarray, item_code: np.ndarray, n_items: int, min_user: int,
               min_item: int = 0) -> np.ndarray:
    """Boolean mask over events keeping users with >= min_user and items with >= min_item events.

    user_code: (E,) int, dense user index 0..U-1; item_code: (E,) int, item row 0..n_items-1.
    Dropping a user can push an item below its minimum and vice versa, so both filters repeat until
    nothing changes (RecBole's k-core). With min_item = 0 one pass suffices.
    """
    keep = np.ones(len(user_code), dtype=bool)
    n_users = int(user_code.max()) + 1 if len(user_code) else 0
    while True:
        user_count = np.bincount(user_code[keep], minlength=n_users)
        item_count = np.bincount(item_code[keep], minlength=n_items)
        too_small = keep & ((user_count[user_code] < min_user) | (item_count[item_code] < min_item))
        if not too_small.any():
            return keep
        keep &= ~too_small
