"""The collaborative item block: co-occurrence counts, shifted PPMI and its SVD (modules/collab.py), and the
'collab' block of step 5 (experiments/ml25m.py), which sees training events only: no validation or test
target and no cold item reaches it."""
from __future__ import annotations

import collections
import itertools
import json

import numpy as np
import pytest
import torch

from experiments import artifacts
from experiments.artifacts import StaleOutputError
from experiments.ml25m import collab_block, fuse_item_features
from experiments.movielens import prepare_interactions
from modules.collab import _symmetric_csr, cooccurrence, pmi_svd, shifted_ppmi, symmetric_svd
from tests.test_fusion import block, fuse, make_fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cosine(vectors: np.ndarray) -> np.ndarray:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit @ unit.T


# ----------------------------------------------------------------------------------------------------
# modules/collab.py
# ----------------------------------------------------------------------------------------------------

def brute_force_counts(users: np.ndarray, items: np.ndarray, window: int | None) -> dict:
    """The co-occurrence of the module doc, by a loop over each user's history."""
    counts = collections.Counter()
    for user in np.unique(users):
        history = items[users == user].tolist()
        if window is None:
            pairs = itertools.combinations(list(dict.fromkeys(history)), 2)
        else:
            pairs = ((history[p], history[q]) for p in range(len(history))
                     for q in range(p + 1, min(len(history), p + window + 1)))
        counts.update((min(a, b), max(a, b)) for a, b in pairs if a != b)
    return dict(counts)


@pytest.mark.parametrize("window", [None, 1, 3, 1000])
@pytest.mark.parametrize("chunk_pairs", [7, 1 << 24])
def test_cooccurrence_counts_equal_a_loop_over_histories(window, chunk_pairs):
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 30, 400), rng.integers(0, 25, 400)   # interleaved users, repeated items
    rows, cols, counts = cooccurrence(users, items, 25, window, chunk_pairs=chunk_pairs)
    assert dict(zip(zip(rows.tolist(), cols.tolist()), counts.tolist())) == brute_force_counts(users, items, window)
    assert (rows < cols).all() and (np.diff(rows * 25 + cols) > 0).all()


def test_shifted_ppmi_known_answer():
    # counts (0,1): 2, (0,2): 1, (1,2): 1 -> marginals 3, 3, 2 and D = 8
    rows, cols, counts = np.array([0, 0, 1]), np.array([1, 2, 2]), np.array([2, 1, 1])
    _, _, plain = shifted_ppmi(rows, cols, counts, 3)
    np.testing.assert_allclose(plain, np.log([16 / 9, 4 / 3, 4 / 3]), rtol=1e-6)
    r, c, shifted = shifted_ppmi(rows, cols, counts, 3, shift=1.5)   # log(4/3) - log(1.5) < 0: dropped
    assert (r.tolist(), c.tolist()) == ([0], [1])
    np.testing.assert_allclose(shifted, np.log([32 / 27]), rtol=1e-6)
    with pytest.raises(ValueError, match="shift"):
        shifted_ppmi(rows, cols, counts, 3, shift=0.5)


def test_symmetric_svd_matches_numpy_on_a_sparse_low_rank_matrix():
    rng = np.random.default_rng(1)
    factors = rng.normal(size=(60, 3)) * np.array([5.0, 3.0, 2.0])
    dense = factors @ factors.T
    dense[np.abs(dense) < 2.0] = 0.0   # sparse, still dominated by three directions
    upper = np.triu_indices(60, 1)
    keep = dense[upper] != 0
    matrix = _symmetric_csr(upper[0][keep], upper[1][keep], dense[upper][keep].astype(np.float32), 60)
    np.testing.assert_allclose(matrix.to_dense().numpy(), dense - np.diag(np.diag(dense)), atol=1e-5)
    rng_state = torch.get_rng_state()
    u, s = symmetric_svd(matrix, 3, seed=5)
    assert torch.equal(torch.get_rng_state(), rng_state)
    ref_u, ref_s, _ = np.linalg.svd(matrix.to_dense().double().numpy())
    np.testing.assert_allclose(s, ref_s[:3], rtol=1e-4)
    np.testing.assert_allclose(np.abs(u.T @ ref_u[:, :3]), np.eye(3), atol=1e-3)
    again, _ = symmetric_svd(matrix, 3, seed=5)
    np.testing.assert_array_equal(u, again)                   # seeded by its own generator
    assert (u[np.abs(u).argmax(axis=0), np.arange(3)] > 0).all()


def two_groups(n_users: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Even users watch 6 of items 0..7, odd users 6 of items 8..15, in random order; item 16 is never watched."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for user in range(n_users):
        group = np.arange(8) + 8 * (user % 2)
        items.extend(rng.permutation(group)[:6])
        users.extend([user] * 6)
    return np.array(users), np.array(items)


@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("dims", [2, 4])
def test_items_watched_by_the_same_users_get_similar_vectors(window, dims):
    """Two disjoint groups make the SPPMI block-diagonal: vectors of different groups are orthogonal; with one
    dimension per group (dims=2) each group's vectors point one way (its leading eigenvector)."""
    users, items = two_groups()
    vectors, has_vector = pmi_svd(users, items, 17, dims=dims, window=window)
    assert vectors.shape == (17, dims) and vectors.dtype == np.float32
    assert has_vector[:16].all() and not has_vector[16]
    assert (vectors[16] == 0).all()                            # no meaningless vector: zeros, and the mask says so
    sim = cosine(vectors[:16])
    same = np.equal.outer(np.arange(16) // 8, np.arange(16) // 8)
    off_diagonal = ~np.eye(16, dtype=bool)
    assert np.abs(sim[~same]).max() < 0.01
    assert sim[same & off_diagonal].min() > (0.999 if dims == 2 else 0.1)


def test_an_item_alone_in_its_histories_gets_no_vector():
    users, items = two_groups()
    users, items = np.r_[users, 99], np.r_[items, 16]   # user 99 watched only item 16: nothing to co-occur with
    _, has_vector = pmi_svd(users, items, 17, dims=4)
    assert not has_vector[16]


def test_bad_arguments_say_what_to_change():
    users, items = two_groups()
    with pytest.raises(ValueError, match="dims between 1 and 16"):
        pmi_svd(users, items, 17, dims=17)
    with pytest.raises(ValueError, match="n_items"):
        pmi_svd(users, items, 10, dims=4)
    with pytest.raises(ValueError, match="window"):
        pmi_svd(users, items, 17, dims=4, window=0)


# ----------------------------------------------------------------------------------------------------
# The 'collab' block of step 5
# ----------------------------------------------------------------------------------------------------

VALID_ONLY, TEST_ONLY, COLD = 30, 31, 35   # item rows of the fixture below


def write_histories(run, movie_ids: np.ndarray, cold_in_training: bool = True, seed: int = 0) -> None:
    """interactions.npz of 24 users over two item groups (rows 0..11 and 12..23), 8 training events each, then a
    validation and a test target from their group. Planted: row VALID_ONLY is only user 0's validation target,
    row TEST_ONLY only user 1's test target, and row COLD (listed in cold_items.npy) sits in user 2's training
    events, as a leaky interactions file would have it."""
    rng = np.random.default_rng(seed)
    histories = []
    for user in range(24):
        group = np.arange(12) + 12 * (user % 2)
        histories.append(rng.permutation(group)[:10])
    histories[0][8] = VALID_ONLY
    histories[1][9] = TEST_ONLY
    if cold_in_training:
        histories[2][3] = COLD
    item_index = np.concatenate(histories).astype(np.int32)
    artifacts.save_npz(run / "interactions.npz", user_ids=np.arange(100, 124), offsets=np.arange(0, 241, 10),
                       item_index=item_index, timestamps=np.arange(len(item_index)) + 10_000,
                       ratings=np.full(len(item_index), 4.0, dtype=np.float32))
    np.save(run / "cold_items.npy", movie_ids[[COLD]])


def test_no_held_out_or_cold_event_reaches_the_block(tmp_path):
    fx = make_fixture(tmp_path)
    run, ids = fx["run"], fx["movie_ids"]
    write_histories(run, ids)
    raw = collab_block(run, ids, dims=4)
    assert raw.mask[:24].all()
    assert not raw.mask[[VALID_ONLY, TEST_ONLY, COLD]].any()
    assert (raw.values[~raw.mask] == 0).all() and raw.mask.sum() == 24
    # the planted items do reach vectors when every event is used: the check above can fail
    inter = artifacts.load_interactions(run)
    _, leaky = pmi_svd(np.repeat(np.arange(24), 10), inter.item_index, len(ids), 4)
    assert leaky[[VALID_ONLY, TEST_ONLY, COLD]].all()
    # other held-out targets (and target times) leave the block unchanged
    inter = artifacts.load_interactions(run)
    item_index, timestamps = inter.item_index.copy(), inter.timestamps.copy()
    item_index[inter.offsets[1:] - 2] = 33
    item_index[inter.offsets[1:] - 1] = (item_index[inter.offsets[1:] - 1] + 5) % 24
    timestamps[inter.offsets[1:] - 1] += 7
    artifacts.save_npz(run / "interactions.npz", user_ids=inter.user_ids, offsets=inter.offsets,
                       item_index=item_index, timestamps=timestamps, ratings=inter.ratings)
    moved = collab_block(run, ids, dims=4)
    np.testing.assert_array_equal(moved.values, raw.values)
    np.testing.assert_array_equal(moved.mask, raw.mask)
    # the two groups stay apart
    sim = cosine(raw.values[:24])
    same = np.equal.outer(np.arange(24) // 12, np.arange(24) // 12)
    assert sim[same & ~np.eye(24, dtype=bool)].mean() > sim[~same].mean() + 0.5


def test_cold_items_of_a_prepared_cold_split_get_the_mask_bit(tiny_demo_data, tmp_path):
    run = tmp_path / "run"
    prepare_interactions(tiny_demo_data, run, cold_fraction=0.2, cold_seed=1)
    cold = artifacts.load_cold(run)
    ids = artifacts.load_item_ids(run)
    raw = collab_block(run, ids, dims=8)
    assert len(cold.items) > 2 and not raw.mask[cold.items].any() and (raw.values[cold.items] == 0).all()
    warm_trained = np.zeros(len(ids), dtype=bool)
    inter = artifacts.load_interactions(run)
    starts, ends = inter.offsets[:-1], inter.offsets[1:] - 2
    for start, end in zip(starts, ends):
        warm_trained[inter.item_index[start:end]] = True
    assert raw.mask.sum() > len(ids) // 2 and not (raw.mask & ~warm_trained).any()


def test_the_block_fuses_with_a_mask_column(tmp_path):
    fx = make_fixture(tmp_path)
    write_histories(fx["run"], fx["movie_ids"])
    data = fuse(fx, blocks=["genres", "collab"], collab_dims=4)
    info = block(data, "collab")
    assert info.feature_columns[1] - info.feature_columns[0] == 4 and info.mask_column == info.columns[1] - 1
    assert (info.n_items_with_block, info.n_items_without_block) == (24, len(fx["movie_ids"]) - 24)
    assert info.standardisation == "block" and info.weight == 1.0
    has = np.zeros(len(fx["movie_ids"]), dtype=bool)
    has[:24] = True
    start, stop = info.feature_columns
    assert (data.features[~has, start:stop] == 0).all() and np.abs(data.features[has, start:stop]).sum() > 0
    mask_column = data.features[:, info.mask_column]
    assert len(np.unique(mask_column[has])) == 1 and len(np.unique(mask_column[~has])) == 1
    assert mask_column[has][0] > mask_column[~has][0]
    # 'block' standardisation over the items that have it, then weight / sqrt(5 columns): 4/5 + 1/5 = weight**2
    assert data.features[has, start:stop].var(axis=0).sum() == pytest.approx(0.8, rel=1e-3)
    assert mask_column.var() == pytest.approx(0.2, rel=1e-3)
    heavy = fuse(fx, blocks=["genres", "collab"], collab_dims=4, block_weights={"collab": 2.0})
    np.testing.assert_allclose(heavy.features[:, info.columns[0]:], 2.0 * data.features[:, info.columns[0]:],
                               rtol=1e-5, atol=1e-6)


def test_a_fused_collab_block_is_not_reused_for_other_dims_or_events(tmp_path):
    fx = make_fixture(tmp_path)
    write_histories(fx["run"], fx["movie_ids"])
    settings = dict(root=fx["data"], blocks=["genres", "collab"], collab_dims=4)
    meta = fuse_item_features(fx["run"], **settings)
    assert {"interactions.npz", "cold_items.npy"} <= set(meta["fingerprint"]["inputs"])
    assert meta["fingerprint"]["config"]["collab_dims"] == 4 and meta["fingerprint"]["config"]["collab_window"] == 50
    assert fuse_item_features(fx["run"], **settings) == json.loads(json.dumps(meta))   # same settings: reused
    with pytest.raises(StaleOutputError, match="config collab_dims: 4 -> 5"):
        fuse_item_features(fx["run"], **{**settings, "collab_dims": 5})
    with pytest.raises(StaleOutputError, match="config collab_window: 50 -> 3"):
        fuse_item_features(fx["run"], **{**settings, "collab_window": 3})
    write_histories(fx["run"], fx["movie_ids"], seed=1)
    with pytest.raises(StaleOutputError, match="input interactions.npz changed"):
        fuse_item_features(fx["run"], **settings)
    write_histories(fx["run"], fx["movie_ids"])
    np.save(fx["run"] / "cold_items.npy", fx["movie_ids"][[COLD, COLD + 1]])
    with pytest.raises(StaleOutputError, match="input cold_items.npy changed"):
        fuse_item_features(fx["run"], **settings)
    other = fuse_item_features(fx["run"], tmp_path / "genres_only", root=fx["data"], blocks=["genres"])
    assert "collab" not in str(other["fingerprint"]) and "interactions.npz" not in other["fingerprint"]["inputs"]


def test_too_many_dims_is_an_error_naming_the_gin_parameter(tmp_path):
    fx = make_fixture(tmp_path)
    write_histories(fx["run"], fx["movie_ids"])
    with pytest.raises(ValueError, match="dims between 1 and 24.*ML25MItemData.collab_dims"):
        fuse(fx, blocks=["collab"], collab_dims=64)
