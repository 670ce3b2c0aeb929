"""Step 5 (experiments/ml25m.py, modules/features.py): alignment by movieId, masks, weights, errors,
fingerprints of finished outputs, and the refusal of random poster weights."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gin
import numpy as np
import pandas as pd
import pytest

from experiments.artifacts import ArtifactError, StaleOutputError
from experiments.ml25m import HeldOut, ML25MItemData, fuse_item_features, genome_block, load_item_features, tags_block
from modules.features import centre_and_scale, pca, standardise

REPO = Path(__file__).resolve().parents[1]
GENRES = ["Action", "Comedy", "Drama", "Horror", "Sci-Fi"]
PRETRAINED = "/root/.cache/efficientnet_lite0/efficientnet_lite0.pth"   # what step 4 records for real weights
RANDOM = "none (random init, explicitly requested, seed 0)"              # ... and for --weights none


def poster_meta(movie_ids: np.ndarray, has_poster: np.ndarray, dim: int, weights: str = PRETRAINED) -> dict:
    """meta.json as experiments/poster_features.py writes it (fields and value formats)."""
    return {"backbone": "efficientnet_lite0", "weights": weights, "dim": dim, "image_size": 224,
            "n_items": len(movie_ids), "n_with_poster": int(has_poster.sum()), "n_missing": int((~has_poster).sum()),
            "n_undecodable": 0, "undecodable_movie_ids": [],
            "rows_without_poster": "NaN in features.npy; select rows with has_poster.npy",
            "preprocessing": "v1; normalise mean=[0.498, 0.498, 0.498] std=[0.502, 0.502, 0.502] (0-1 scale)",
            "pooling": "global average pool of the 1280-channel head conv (fc removed)",
            "poster_dir": "dataset/fixture/posters", "device": "cpu", "elapsed_s": 0.1}


def make_fixture(root: Path, n_items: int = 40, poster_dim: int = 12, seed: int = 0,
                 poster_weights: str = PRETRAINED) -> dict:
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
    (posters / "meta.json").write_text(json.dumps(poster_meta(movie_ids, has_poster, poster_dim, poster_weights)))
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
    assert meta["poster_features"] == {"path": str(fx["posters"]), "backbone": "efficientnet_lite0",
                                       "weights": PRETRAINED, "dim": 12, "image_size": 224}
    assert set(meta["fingerprint"]["inputs"]) == {"items.csv", "item_ids.npy", "poster_features/features.npy",
                                                  "poster_features/movie_ids.npy", "poster_features/has_poster.npy",
                                                  "poster_features/meta.json"}
    stamp = (fx["run"] / "item_features" / "features.npy").stat().st_mtime_ns
    again = fuse_item_features(fx["run"], root=fx["data"], poster_feature_path=fx["posters"],
                               blocks=["genres", "year", "poster"])  # finished with the same settings: skipped
    assert again == loaded_meta
    assert (fx["run"] / "item_features" / "features.npy").stat().st_mtime_ns == stamp


# ----------------------------------------------------------------------------------------------------
# Fingerprints: a finished output is reused only for the same settings and inputs
# ----------------------------------------------------------------------------------------------------

FUSED = dict(blocks=["genres", "year", "tags", "poster"])


def _other_blocks(fx):
    return {"blocks": ["genres", "year"]}, "config blocks"


def _other_weight(fx):
    return {"block_weights": {"poster": 2.0}}, "config block_weights"


def _new_poster_features(fx):
    features = np.load(fx["posters"] / "features.npy")
    np.save(fx["posters"] / "features.npy", features + 1.0)
    return {}, "input poster_features/features.npy changed"


def _new_tags(fx):
    with open(fx["data"] / "tags.csv", "a") as handle:
        handle.write(f"3,{fx['movie_ids'][4]},new tag,1500\n")
    return {}, "input tags.csv changed"


@pytest.mark.parametrize("change", [_other_blocks, _other_weight, _new_poster_features, _new_tags],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_finished_fusion_is_never_reused_for_other_settings_or_inputs(tmp_path, change):
    fx = make_fixture(tmp_path)
    settings = dict(root=fx["data"], poster_feature_path=fx["posters"], **FUSED)
    first = fuse_item_features(fx["run"], **settings)
    marker = fx["run"] / "item_features" / "blocks.json"
    written = marker.read_bytes()
    overrides, expected = change(fx)
    settings.update(overrides)
    with pytest.raises(StaleOutputError, match=expected) as stale:
        fuse_item_features(fx["run"], **settings)
    assert "--overwrite" in str(stale.value) and "train_rqvae.py" in str(stale.value)
    assert marker.read_bytes() == written                       # refused, not rebuilt, not returned
    rebuilt = fuse_item_features(fx["run"], overwrite=True, **settings)
    assert rebuilt["fingerprint"] != first["fingerprint"]
    assert json.loads(marker.read_text()) == json.loads(json.dumps(rebuilt))
    assert fuse_item_features(fx["run"], **settings) == json.loads(marker.read_text())   # now it matches


def test_gin_bindings_are_part_of_the_fingerprint(tmp_path):
    fx = make_fixture(tmp_path)
    gin.clear_config()
    try:
        gin.parse_config(["ML25MItemData.tag_vocabulary = 3"])
        meta = fuse_item_features(fx["run"], root=fx["data"], blocks=["genres", "tags"])
        assert meta["fingerprint"]["config"]["tag_vocabulary"] == 3
        gin.clear_config()
        gin.parse_config(["ML25MItemData.tag_vocabulary = 4"])
        with pytest.raises(StaleOutputError, match="config tag_vocabulary: 3 -> 4"):
            fuse_item_features(fx["run"], root=fx["data"], blocks=["genres", "tags"])
    finally:
        gin.clear_config()


def test_a_marker_without_fingerprint_is_not_reused(tmp_path):
    fx = make_fixture(tmp_path)
    fuse_item_features(fx["run"], root=fx["data"], blocks=["genres"])
    marker = fx["run"] / "item_features" / "blocks.json"
    old = json.loads(marker.read_text())
    del old["fingerprint"]
    marker.write_text(json.dumps(old))   # as an older version of the step wrote it
    with pytest.raises(StaleOutputError, match="records no fingerprint"):
        fuse_item_features(fx["run"], root=fx["data"], blocks=["genres"])


def load_fuse_script():
    """Import experiments/05_fuse_item_features.py (its name starts with a digit)."""
    spec = importlib.util.spec_from_file_location("fuse_script", REPO / "experiments" / "05_fuse_item_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_exits_with_the_reason_instead_of_reusing_a_stale_output(tmp_path):
    fx = make_fixture(tmp_path, poster_weights=RANDOM)
    config = tmp_path / "fuse.gin"
    config.write_text("ML25MItemData.blocks = ['genres', 'year', 'poster']\n")
    script = load_fuse_script()

    def fuse_script(*flags):
        gin.clear_config()   # each parse locks the config, as in a fresh process
        script.main([str(config), "--run", str(fx["run"]), "--data", str(fx["data"]),
                     "--posters-features", str(fx["posters"]), *flags])

    try:
        with pytest.raises(SystemExit) as refused:
            fuse_script()
        assert str(refused.value.code).startswith("error: ") and "--allow-random-poster-weights" in refused.value.code
        fuse_script("--allow-random-poster-weights")
        assert (fx["run"] / "item_features" / "blocks.json").is_file()
        with pytest.raises(SystemExit) as stale:
            fuse_script("--allow-random-poster-weights", "--blocks", "genres,year")
        assert str(stale.value.code).startswith("error: ") and "config blocks" in stale.value.code
        assert "pass --overwrite to experiments/05_fuse_item_features.py" in stale.value.code
        fuse_script("--blocks", "genres,year", "--overwrite")
        blocks = json.loads((fx["run"] / "item_features" / "blocks.json").read_text())
        assert blocks["fingerprint"]["config"]["blocks"] == ["genres", "year"] and "poster_features" not in blocks
    finally:
        gin.clear_config()


# ----------------------------------------------------------------------------------------------------
# Random poster weights
# ----------------------------------------------------------------------------------------------------

def test_poster_features_of_random_weights_are_refused_unless_allowed(tmp_path, caplog):
    fx = make_fixture(tmp_path, poster_weights=RANDOM)
    with pytest.raises(ArtifactError, match=r"meta.json says field 'weights' = 'none \(random init") as refused:
        fuse(fx)
    assert "--weights-path" in str(refused.value) and "efficientnet_lite0" in str(refused.value)
    fuse(fx, blocks=["genres", "year"])   # no poster block: nothing to refuse
    data = fuse(fx, allow_random_poster_weights=True)
    assert data.metadata()["poster_features"]["weights"] == RANDOM
    assert any("RANDOMLY INITIALISED" in r.getMessage() for r in caplog.records)


def test_a_finished_fusion_of_random_poster_weights_is_refused_again_unless_allowed(tmp_path):
    fx = make_fixture(tmp_path, poster_weights=RANDOM)
    settings = dict(root=fx["data"], poster_feature_path=fx["posters"], blocks=["genres", "poster"])
    meta = fuse_item_features(fx["run"], allow_random_poster_weights=True, **settings)
    assert meta["poster_features"]["weights"] == RANDOM
    with pytest.raises(ArtifactError, match="allow_random_poster_weights"):
        fuse_item_features(fx["run"], **settings)   # finished, but not silently reused
    # the allowance changes no feature, so it is no part of the fingerprint: allowed again, it is reused
    assert fuse_item_features(fx["run"], allow_random_poster_weights=True, **settings) == json.loads(
        (fx["run"] / "item_features" / "blocks.json").read_text())


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


def test_tags_tied_in_frequency_enter_the_vocabulary_by_first_appearance(tmp_path):
    """Which of two equally frequent tags fits a vocabulary of one is fixed by the data, not by pandas."""
    fx = make_fixture(tmp_path)
    ids = fx["movie_ids"]
    rows = [(7, ids[0], "zebra", 1), (7, ids[2], "zebra", 1), (7, ids[4], "apple", 1), (7, ids[6], "apple", 1)]
    pd.DataFrame(rows, columns=["userId", "movieId", "tag", "timestamp"]).to_csv(fx["data"] / "tags.csv", index=False)
    assert tags_block(fx["data"], ids, vocabulary_size=1, min_movies_per_tag=1).column_names == ["zebra"]
    pd.DataFrame(rows[2:] + rows[:2], columns=["userId", "movieId", "tag", "timestamp"]).to_csv(
        fx["data"] / "tags.csv", index=False)
    assert tags_block(fx["data"], ids, vocabulary_size=1, min_movies_per_tag=1).column_names == ["apple"]
