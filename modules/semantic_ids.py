"""Semantic IDs from RQ-VAE codes: the TIGER collision column and codebook-health statistics (numpy)."""
from __future__ import annotations

import hashlib

import numpy as np

# A level counts as collapsed when one code takes more than this share of the items ...
COLLAPSE_TOP_SHARE = 0.5
# ... or when fewer than this fraction of the codes it could use (min(K, N)) are used.
COLLAPSE_MIN_USAGE = 0.1


def semantic_ids_digest(semantic_ids: np.ndarray) -> str:
    """SHA-1 of (N, L+1) semantic IDs as int64 (the `semantic_ids_sha1` a decoder records)."""
    return hashlib.sha1(np.ascontiguousarray(semantic_ids, dtype=np.int64).tobytes()).hexdigest()


def collision_groups(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group identical code tuples. codes: (N, L) int.

    Returns (group (N,) int64 group index of each row, group_sizes (G,) int64).
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be (N, L), got shape {codes.shape}.")
    _, group, sizes = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return group.reshape(-1).astype(np.int64), sizes.astype(np.int64)


def add_collision_column(codes: np.ndarray) -> np.ndarray:
    """Append TIGER's extra code: 0, 1, 2, ... among rows sharing the same tuple, in row order.

    codes: (N, L) int. Returns (N, L+1) int64 in which every row is unique.
    """
    codes = np.asarray(codes, dtype=np.int64)
    group, sizes = collision_groups(codes)
    order = np.argsort(group, kind="stable")          # rows grouped, row order kept inside a group
    group_start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(len(codes), dtype=np.int64)
    rank[order] = np.arange(len(codes)) - group_start[group[order]]
    return np.concatenate([codes, rank[:, None]], axis=1)


def codebook_sizes(semantic_ids: np.ndarray, codebook_size: int) -> list[int]:
    """Vocabulary per position: [K] * L for the code levels, then the largest collision group C."""
    n_levels = semantic_ids.shape[1] - 1
    return [int(codebook_size)] * n_levels + [int(semantic_ids[:, -1].max()) + 1 if len(semantic_ids) else 0]


def level_statistics(codes: np.ndarray, codebook_size: int) -> dict[str, list[float]]:
    """Per level: usage (fraction of the K codes used), perplexity (exp of the code entropy) and
    top_share (fraction of items on the most common code). codes: (N, L) int."""
    usage, perplexity, top_share = [], [], []
    for level_codes in np.asarray(codes).T:
        counts = np.bincount(level_codes, minlength=codebook_size)
        probs = counts[counts > 0] / len(level_codes)
        usage.append(float((counts > 0).sum() / codebook_size))
        perplexity.append(float(np.exp(-(probs * np.log(probs)).sum())))
        top_share.append(float(counts.max() / len(level_codes)))
    return {"usage": usage, "perplexity": perplexity, "top_share": top_share}


def health(codes: np.ndarray, codebook_size: int) -> dict:
    """Codebook health of codes (N, L): per-level statistics, uniqueness and a collapse verdict.

    unique_fraction: fraction of items whose L-tuple no other item has.
    max_collision_group: largest number of items sharing one tuple.
    collapsed / collapse_reasons: a level whose top code takes > COLLAPSE_TOP_SHARE of the items, or
    that uses < COLLAPSE_MIN_USAGE of the min(K, N) codes it could use.
    """
    codes = np.asarray(codes)
    stats = level_statistics(codes, codebook_size)
    _, sizes = collision_groups(codes)
    reasons = []
    achievable = min(codebook_size, len(codes)) / codebook_size
    for level, (share, used) in enumerate(zip(stats["top_share"], stats["usage"])):
        if share > COLLAPSE_TOP_SHARE:
            reasons.append(f"level {level}: one code holds {share:.0%} of the items")
        if used < COLLAPSE_MIN_USAGE * achievable:
            reasons.append(f"level {level}: only {used:.1%} of the {codebook_size} codes are used")
    return {
        **stats,
        "unique_fraction": float((sizes[np.repeat(np.arange(len(sizes)), sizes)] == 1).mean()) if len(codes) else 0.0,
        "n_collision_groups": int((sizes > 1).sum()),
        "max_collision_group": int(sizes.max()) if len(sizes) else 0,
        "collapsed": bool(reasons),
        "collapse_reasons": reasons,
    }


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Jaccard similarity of two (P, G) bool matrices; two empty sets count as 1."""
    inter = (a & b).sum(1)
    union = (a | b).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def genre_jaccard(genres: np.ndarray, first_codes: np.ndarray, n_pairs: int = 20000, seed: int = 0) -> dict:
    """Do codes mean something? Mean genre Jaccard of item pairs sharing a first-level code vs random pairs.

    genres: (N, G) bool multi-hot; first_codes: (N,) int. Same-code pairs are drawn by picking a random
    item in a code group of size >= 2 and a different random member of its group.
    """
    genres = np.asarray(genres, dtype=bool)
    first_codes = np.asarray(first_codes)
    rng = np.random.default_rng(seed)
    n = len(first_codes)
    order = np.argsort(first_codes, kind="stable")
    _, starts, sizes = np.unique(first_codes[order], return_index=True, return_counts=True)
    group_of_sorted = np.repeat(np.arange(len(sizes)), sizes)
    eligible = np.flatnonzero(sizes[group_of_sorted] >= 2)  # positions in `order`
    if len(eligible) == 0:
        raise ValueError("no two items share a first-level code, so same-code pairs cannot be drawn.")
    left_pos = rng.choice(eligible, n_pairs)
    group = group_of_sorted[left_pos]
    # A different member of the same group: offset 1..size-1 from the left item, wrapped.
    offset = 1 + (rng.random(n_pairs) * (sizes[group] - 1)).astype(np.int64)
    right_pos = starts[group] + (left_pos - starts[group] + offset) % sizes[group]
    same = jaccard(genres[order[left_pos]], genres[order[right_pos]])
    left_random = rng.integers(n, size=n_pairs)
    right_random = (left_random + rng.integers(1, n, size=n_pairs)) % n
    random = jaccard(genres[left_random], genres[right_random])
    return {"same_first_code": float(same.mean()), "random_pairs": float(random.mean()), "n_pairs": int(n_pairs)}
