"""Training examples for the generative retrieval decoder: semantic-ID tokens, history windows, users.

Token layout (one shared vocabulary for encoder and decoder inputs, TIGER section 3.2):

    0                        PAD
    1                        BOS (first decoder input)
    2 + level_offset[l] + c  code c of level l, one slice per level, the collision column included
    2 + sum(K) + b           user bucket b (the hashing trick of TIGER section 4.1)

The decoder's output head covers the code tokens only; position `l` of a target is scored
against the slice of level `l`.

Pure numpy: no I/O, no printing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modules.hashing import splitmix64
from modules.semantic_ids import add_collision_column

PAD_TOKEN = 0
BOS_TOKEN = 1
N_SPECIAL_TOKENS = 2
NO_ITEM = -1  # padding in history windows: "no item at this position"


@dataclass(frozen=True)
class Vocabulary:
    """Sizes of the token slices.

    codebook_sizes: (K_1, ..., K_L, C) one size per semantic-ID column, the collision column last.
    n_user_buckets: number of hashed user tokens.
    """

    codebook_sizes: tuple[int, ...]
    n_user_buckets: int

    def __post_init__(self):
        if len(self.codebook_sizes) < 1 or min(self.codebook_sizes) < 1:
            raise ValueError(f"codebook_sizes must be positive, got {self.codebook_sizes}.")
        if self.n_user_buckets < 1:
            raise ValueError(f"n_user_buckets must be >= 1, got {self.n_user_buckets}.")

    @property
    def n_levels(self) -> int:
        """Columns of a semantic ID (code levels plus the collision column)."""
        return len(self.codebook_sizes)

    @property
    def level_offsets(self) -> np.ndarray:
        """(n_levels,) int64, start of each level's slice inside the code tokens (0-based)."""
        return np.concatenate([[0], np.cumsum(self.codebook_sizes)[:-1]]).astype(np.int64)

    @property
    def n_code_tokens(self) -> int:
        """Number of code tokens (the size of the decoder's output head)."""
        return int(sum(self.codebook_sizes))

    @property
    def user_token_offset(self) -> int:
        """Token id of user bucket 0."""
        return N_SPECIAL_TOKENS + self.n_code_tokens

    @property
    def size(self) -> int:
        """Total number of token ids."""
        return self.user_token_offset + self.n_user_buckets


def check_semantic_ids(semantic_ids: np.ndarray, codebook_sizes: tuple[int, ...]) -> None:
    """Raise ValueError unless `semantic_ids` (N, L+1) is integer, in range per column and unique per row."""
    if semantic_ids.ndim != 2 or not np.issubdtype(semantic_ids.dtype, np.integer):
        raise ValueError(f"semantic ids must be a 2-d integer array, got {semantic_ids.dtype} {semantic_ids.shape}.")
    if semantic_ids.shape[1] != len(codebook_sizes):
        raise ValueError(f"semantic ids have {semantic_ids.shape[1]} columns but codebook_sizes lists "
                         f"{len(codebook_sizes)} sizes {list(codebook_sizes)}.")
    for level, size in enumerate(codebook_sizes):
        column = semantic_ids[:, level]
        if len(column) and (column.min() < 0 or column.max() >= size):
            raise ValueError(f"semantic id column {level} holds codes {int(column.min())}..{int(column.max())} "
                             f"outside 0..{size - 1} (codebook_sizes[{level}] = {size}).")
    n_unique = len(np.unique(semantic_ids, axis=0))
    if n_unique != len(semantic_ids):
        raise ValueError(f"semantic ids are not unique: {len(semantic_ids) - n_unique} rows repeat another row; "
                         "every item needs its own full ID (the collision column makes them unique).")


def semantic_id_tokens(semantic_ids: np.ndarray, vocab: Vocabulary) -> np.ndarray:
    """(N, L+1) codes -> (N, L+1) int64 token ids (each column shifted into its level's slice)."""
    check_semantic_ids(semantic_ids, vocab.codebook_sizes)
    return semantic_ids.astype(np.int64) + N_SPECIAL_TOKENS + vocab.level_offsets[None, :]


def matched_random_ids(n_items: int, code_sizes: tuple[int, ...], seed: int) -> np.ndarray:
    """(n_items, L+1) int64 IDs of the random-ID control (TIGER section 4.4): L random codes, then the
    collision column by the same rule as the RQ-VAE IDs (`add_collision_column`).

    code_sizes: (K_1, ..., K_L), the code levels only. Each code is uniform in 0..K_l-1, drawn
    independently per item; the collision column is 0 unless another item drew the same tuple, as for
    real IDs, so the control spends no capacity on a per-item code that the real IDs do not have.
    """
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, int(k), n_items) for k in code_sizes], axis=1)
    return add_collision_column(codes)


def random_semantic_ids(n_items: int, codebook_sizes: tuple[int, ...], seed: int) -> np.ndarray:
    """(n_items, L+1) int64 distinct random IDs, column l uniform in 0..K_l-1, collision column included.

    Draws n_items distinct points of the mixed-radix code space without replacement: test and benchmark
    fixtures. Not the random-ID control (its collision column is uniform where real ones are mostly 0:
    `matched_random_ids`).
    """
    space = int(np.prod([int(k) for k in codebook_sizes], dtype=object))
    if space < n_items:
        raise ValueError(f"codebook sizes {list(codebook_sizes)} give only {space} distinct IDs for {n_items} items.")
    if space >= 2 ** 63:
        raise ValueError(f"codebook sizes {list(codebook_sizes)} span more than 2**63 IDs; cannot draw them.")
    flat = np.random.default_rng(seed).choice(space, size=n_items, replace=False).astype(np.int64)
    codes = np.empty((n_items, len(codebook_sizes)), dtype=np.int64)
    for level in reversed(range(len(codebook_sizes))):
        codes[:, level] = flat % codebook_sizes[level]
        flat //= codebook_sizes[level]
    return codes


def hash_users(user_ids: np.ndarray, n_buckets: int) -> np.ndarray:
    """(U,) raw user ids -> (U,) int64 bucket in 0..n_buckets-1 (splitmix64 finaliser, platform independent)."""
    return (splitmix64(user_ids) % np.uint64(n_buckets)).astype(np.int64)


def first_training_targets(starts: np.ndarray, valid_pos: np.ndarray, min_history: int = 1,
                           max_targets_per_user: int | None = None) -> np.ndarray:
    """(U,) int64 earliest training target position of each user.

    A user's training events are [starts[u], valid_pos[u]) (modules.split); a target needs at least
    `min_history` earlier events. With max_targets_per_user, only the user's most recent that many
    targets train (heavy raters weigh less, recent behaviour more; SASRec's `max_windows_per_user`
    caps the same way in windows of max_len targets, so it matches max_windows_per_user * max_len).
    A user with no target gets valid_pos or later (no window).
    """
    if max_targets_per_user is not None and max_targets_per_user < 1:
        raise ValueError(f"max_targets_per_user = {max_targets_per_user} must be >= 1 (or None for every target).")
    first = np.asarray(starts, dtype=np.int64) + min_history
    if max_targets_per_user is not None:
        first = np.maximum(first, np.asarray(valid_pos, dtype=np.int64) - max_targets_per_user)
    return first


def training_windows(first_target: np.ndarray, valid_pos: np.ndarray, targets_per_window: int) -> np.ndarray:
    """Last target position of every training window holding `targets_per_window` (s) consecutive targets.

    A user's targets are [first_target[u], valid_pos[u]) (`first_training_targets`). Counted back from
    the user's last one, they are cut into groups of s, the oldest group possibly shorter, so every
    target is in exactly one window. Returns (W,) int64, users in row order, time order within a
    user; with s = 1, every target is its own window.
    """
    if targets_per_window < 1:
        raise ValueError(f"targets_per_window must be >= 1, got {targets_per_window}.")
    first = np.asarray(first_target, dtype=np.int64)
    last = np.asarray(valid_pos, dtype=np.int64) - 1
    counts = -(-np.maximum(last - first + 1, 0) // targets_per_window)  # windows per user (ceil)
    user_of = np.repeat(np.arange(len(counts)), counts)
    from_end = np.repeat(np.cumsum(counts), counts) - 1 - np.arange(counts.sum(), dtype=np.int64)
    return last[user_of] - from_end * targets_per_window


def window_targets(last_pos: np.ndarray, first_target: np.ndarray, max_history: int,
                   targets_per_window: int) -> tuple[np.ndarray, np.ndarray]:
    """The targets of windows ending at `last_pos` and how many of the window's items each may see.

    The window's encoder input is the `max_history` (H) items before last_pos (`history_windows`);
    its s targets are the events last_pos-s+1 .. last_pos. Target q may see the window slots before
    it: H - (last_pos - q) items. first_target (W,) is the earliest allowed target position of each
    window's user (`first_training_targets`); earlier ones are absent.
    Returns positions (W, s) int64 (clipped to a valid event where absent) and visible (W, s) int64,
    -1 where absent.
    """
    if not 1 <= targets_per_window <= max_history:
        raise ValueError(f"targets_per_window = {targets_per_window} must be in 1..max_history ({max_history}).")
    back = np.arange(targets_per_window - 1, -1, -1, dtype=np.int64)  # oldest target first
    positions = np.asarray(last_pos, dtype=np.int64)[:, None] - back[None, :]
    present = positions >= np.asarray(first_target, dtype=np.int64)[:, None]
    visible = np.where(present, max_history - back[None, :], -1)
    return np.where(present, positions, np.asarray(last_pos, dtype=np.int64)[:, None]), visible


def user_of_positions(offsets: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(B,) user row owning each event position, for CSR `offsets` (U+1,)."""
    return np.searchsorted(offsets, positions, side="right") - 1


def history_windows(item_index: np.ndarray, user_starts: np.ndarray, target_pos: np.ndarray,
                    max_history: int) -> np.ndarray:
    """The last `max_history` items before each target, oldest first, left-padded with NO_ITEM.

    item_index:  (E,) item row of every event (CSR, users contiguous, time order).
    user_starts: (B,) first event of each target's user.
    target_pos:  (B,) event position of each target; its history is [user_starts, target_pos).
    Returns (B, max_history) int64. Left padding keeps the most recent item at the last position.
    """
    target_pos = np.asarray(target_pos, dtype=np.int64)
    positions = target_pos[:, None] - max_history + np.arange(max_history)[None, :]
    inside = positions >= np.asarray(user_starts, dtype=np.int64)[:, None]
    items = item_index[np.clip(positions, 0, None)].astype(np.int64)
    return np.where(inside, items, NO_ITEM)


def encode_histories(windows: np.ndarray, user_tokens: np.ndarray, item_tokens: np.ndarray) -> np.ndarray:
    """Encoder input: [user token, tokens of item 1, ..., tokens of item H].

    windows:     (B, H) item rows, NO_ITEM for padding.
    user_tokens: (B,) token id of each example's user bucket.
    item_tokens: (N, L+1) token ids of every item (semantic_id_tokens).
    Returns (B, 1 + H*(L+1)) int64, PAD_TOKEN where the window is padding.
    """
    n_levels = item_tokens.shape[1]
    tokens = np.where(windows[:, :, None] >= 0, item_tokens[np.clip(windows, 0, None)], PAD_TOKEN)
    return np.concatenate([np.asarray(user_tokens, dtype=np.int64)[:, None],
                           tokens.reshape(len(windows), windows.shape[1] * n_levels)], axis=1)
