"""The preparation step: known answers on hand-made folders, the split, k-core, errors, real data."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from experiments.artifacts import ArtifactError, check_aligned, load_interactions, load_item_ids, load_items
from experiments.movielens import MovieLensFormatError, prepare_interactions
from modules.kcore import kcore_mask
from modules.split import leave_one_out
from tests.conftest import ML_SMALL, needs_shared, write_movielens

MOVIES = """movieId,title,genres
1,Toy Story (1995),Adventure|Animation
2,"American President, The (1995)",Comedy|Drama
5,Babylon 5,Sci-Fi
7,"Series (2007-)",(no genres listed)
"""
# user 10: 5 events with a timestamp tie (t=100 for movies 5 and 2: movieId breaks the tie -> 2 then 5)
# user 20: 3 events (dropped by the default k-core of 5)
RATINGS = """userId,movieId,rating,timestamp
10,7,4.0,300
10,5,3.5,100
10,2,5.0,100
10,1,1.0,50
20,1,2.0,10
20,2,2.0,20
20,5,2.0,30
10,7,4.5,400
"""


def test_known_answer_order_ties_and_kcore(tmp_path):
    data = write_movielens(tmp_path / "ml", MOVIES, RATINGS.replace("10,7,4.5,400", "10,1,4.5,400"))
    stats = prepare_interactions(data, tmp_path / "run", tie_break="movieid")
    assert stats["tie_break"] == "movieid"
    assert stats["tied_events"] == {"all": 0.2, "test_targets": 0.0}
    assert (stats["users"], stats["items"], stats["interactions"]) == (1, 4, 5)
    assert stats["dropped_users"] == 1 and stats["dropped_interactions"] == 3
    inter = load_interactions(tmp_path / "run")
    ids = load_item_ids(tmp_path / "run")
    assert ids.tolist() == [1, 2, 5, 7]
    assert inter.user_ids.tolist() == [10]
    assert ids[inter.history(0)].tolist() == [1, 2, 5, 7, 1]   # t=50, 100 (id 2 before 5), 100, 300, 400
    assert inter.timestamps.tolist() == [50, 100, 100, 300, 400]
    assert inter.ratings.tolist() == [1.0, 5.0, 3.5, 4.0, 4.5]


def test_item_table_keeps_every_movie_and_parses_years(tmp_path):
    data = write_movielens(tmp_path / "ml", MOVIES, RATINGS)
    prepare_interactions(data, tmp_path / "run", min_user_interactions=3)
    items = load_items(tmp_path / "run")
    assert items["movieId"].tolist() == [1, 2, 5, 7]
    assert items["title"].tolist()[1] == "American President, The (1995)"
    assert items["year"].tolist()[:2] == [1995, 1995]
    assert items["year"].isna().tolist() == [False, False, True, False]
    assert items["year"].iloc[3] == 2007
    assert items["tmdbId"].tolist() == [501, 502, 505, 507]
    assert items["genres"].iloc[3] == "(no genres listed)"


def test_crlf_and_lf_give_identical_artifacts(tmp_path):
    for name, newline in (("lf", "\n"), ("crlf", "\r\n")):
        write_movielens(tmp_path / name, MOVIES, RATINGS, newline=newline)
        prepare_interactions(tmp_path / name, tmp_path / f"run_{name}", min_user_interactions=3)
    assert (tmp_path / "run_lf/items.csv").read_bytes() == (tmp_path / "run_crlf/items.csv").read_bytes()
    a, b = load_interactions(tmp_path / "run_lf"), load_interactions(tmp_path / "run_crlf")
    for field in ("user_ids", "offsets", "item_index", "timestamps", "ratings"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_missing_tmdb_id_is_kept_as_na(tmp_path):
    links = "movieId,imdbId,tmdbId\n1,0114709,862\n2,0112346,\n5,0105946,\n7,0000001,9\n"
    data = write_movielens(tmp_path / "ml", MOVIES, RATINGS, links=links)
    stats = prepare_interactions(data, tmp_path / "run", min_user_interactions=3)
    assert stats["movies_without_tmdb_id"] == 2
    assert load_items(tmp_path / "run")["tmdbId"].isna().tolist() == [False, True, True, False]


def test_rerun_skips_and_other_settings_need_overwrite(tmp_path):
    data = write_movielens(tmp_path / "ml", MOVIES, RATINGS)
    first = prepare_interactions(data, tmp_path / "run", min_user_interactions=3)
    mtime = (tmp_path / "run/interactions.npz").stat().st_mtime_ns
    assert prepare_interactions(data, tmp_path / "run", min_user_interactions=3) == first
    assert (tmp_path / "run/interactions.npz").stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_interactions(data, tmp_path / "run", min_user_interactions=5)
    assert prepare_interactions(data, tmp_path / "run", min_user_interactions=5, overwrite=True)["users"] == 1


def test_rerun_on_a_fresh_copy_of_the_same_files_skips_but_changed_ratings_do_not(tmp_path):
    data = write_movielens(tmp_path / "ml", MOVIES, RATINGS)
    first = prepare_interactions(data, tmp_path / "run", min_user_interactions=3)
    ratings = next(Path(data).glob("ratings.*"))
    os.utime(ratings, ns=(1, 1))  # same bytes, other mtime: e.g. the zip extracted again
    assert prepare_interactions(data, tmp_path / "run", min_user_interactions=3) == first
    text = ratings.read_text()
    ratings.write_text(text.replace(",4.0,", ",5.0,", 1))  # same size, other content
    assert ratings.stat().st_size == len(text)
    with pytest.raises(FileExistsError, match="other inputs"):
        prepare_interactions(data, tmp_path / "run", min_user_interactions=3)


def test_kcore_repeats_until_stable():
    # Items 0 and 1 are popular; item 2 is seen by users 0 and 1 only. With min_item=3, item 2 goes;
    # then user 1 drops below min_user=2, which in turn drops item 1 below 3 -> everything collapses in rounds.
    user = np.array([0, 0, 1, 1, 2, 2, 3])
    item = np.array([0, 2, 1, 2, 0, 1, 0])
    keep = kcore_mask(user, item, n_items=3, min_user=2, min_item=3)
    kept_users = set(user[keep])
    assert 1 not in kept_users and 3 not in kept_users
    counts_u = np.bincount(user[keep], minlength=4)
    counts_i = np.bincount(item[keep], minlength=3)
    assert all(c == 0 or c >= 2 for c in counts_u) and all(c == 0 or c >= 3 for c in counts_i)


@pytest.mark.parametrize("case, match", [
    ("missing_file", r"ratings\.csv is missing"),
    ("missing_column", r"column\(s\) \['timestamp'\] missing"),
    ("non_numeric", r"line 3, column 'movieId': 'abc' is not a number"),
    ("duplicate", r"line 4: the rating \(userId=10, movieId=5, timestamp=100\) appears more than once"),
    ("out_of_range", r"line 2, column 'rating': 7\.0 is outside \[0\.5, 5\.0\]"),
    ("empty", r"ratings\.csv is empty"),
    ("header_only", r"has a header but no ratings"),
    ("unknown_movie", r"line 3: movieId 99 is not in movies\.csv"),
])
def test_bad_input_names_file_row_and_fix(tmp_path, case, match):
    ratings = {
        "missing_column": "userId,movieId,rating\n10,1,4.0\n",
        "non_numeric": "userId,movieId,rating,timestamp\n10,1,4.0,5\n10,abc,4.0,6\n",
        "duplicate": "userId,movieId,rating,timestamp\n10,1,4.0,5\n10,5,4.0,100\n10,5,3.0,100\n",
        "out_of_range": "userId,movieId,rating,timestamp\n10,1,7.0,5\n",
        "empty": "",
        "header_only": "userId,movieId,rating,timestamp\n",
        "unknown_movie": "userId,movieId,rating,timestamp\n10,1,4.0,5\n10,99,4.0,6\n",
    }.get(case, RATINGS)
    data = write_movielens(tmp_path / "ml", MOVIES, "x")
    (data / "ratings.csv").write_text(ratings)
    if case == "missing_file":
        (data / "ratings.csv").unlink()
    with pytest.raises(MovieLensFormatError, match=match):
        prepare_interactions(data, tmp_path / "run", min_user_interactions=3)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_duplicate_movie_row_is_an_error(tmp_path):
    data = write_movielens(tmp_path / "ml", MOVIES + "2,Again (1990),Drama\n", RATINGS)
    with pytest.raises(MovieLensFormatError, match=r"movies\.csv, line 6: movieId 2 appears twice"):
        prepare_interactions(data, tmp_path / "run")


def test_loaders_reject_misaligned_artifacts(tmp_path):
    data = write_movielens(tmp_path / "ml", MOVIES, RATINGS)
    prepare_interactions(data, tmp_path / "run", min_user_interactions=3)
    ids = load_item_ids(tmp_path / "run")
    with pytest.raises(ArtifactError, match="row 0 holds movieId 7, expected 1 \\(4 rows differ\\)"):
        check_aligned(ids[::-1], ids, "features.npy", "step 4")
    with pytest.raises(ArtifactError, match="has 3 rows but the run's item_ids.npy has 4"):
        check_aligned(ids[:3], ids, "features.npy", "step 4")
    with pytest.raises(ArtifactError, match="run experiments/02_prepare_interactions.py"):
        load_items(tmp_path / "elsewhere")


def test_leave_one_out_positions_and_short_users():
    split = leave_one_out(np.array([0, 3, 8]))
    assert split.valid_pos.tolist() == [1, 6] and split.test_pos.tolist() == [2, 7]
    assert split.train_slice(1) == slice(3, 6)
    with pytest.raises(ValueError, match="user row 1 has 2 interactions"):
        leave_one_out(np.array([0, 3, 5]))


def test_prepare_on_demo_dataset(tiny_demo_run):
    stats = json.loads((tiny_demo_run / "stats.json").read_text())
    inter = load_interactions(tiny_demo_run)
    assert stats["items"] == 64 and stats["users"] == inter.n_users > 0
    assert np.all(np.diff(inter.offsets) >= 5)


@needs_shared
def test_ml_latest_small_statistics_and_split(tmp_path):
    stats = prepare_interactions(ML_SMALL, tmp_path / "run")
    assert (stats["users"], stats["items"], stats["interactions"]) == (610, 9742, 100836)
    inter = load_interactions(tmp_path / "run")
    split = leave_one_out(inter.offsets)
    # Time order inside every user, validation strictly before or tied with test.
    same_user = np.repeat(np.arange(inter.n_users), np.diff(inter.offsets))
    assert np.all(np.diff(inter.timestamps)[np.diff(same_user) == 0] >= 0)
    assert np.all(inter.timestamps[split.valid_pos] <= inter.timestamps[split.test_pos])
    for u in range(inter.n_users):  # no test (or validation) item in the user's training prefix
        train = inter.item_index[split.train_slice(u)]
        assert inter.item_index[split.test_pos[u]] not in train
        assert inter.item_index[split.valid_pos[u]] not in train


@pytest.mark.parametrize("timestamp_span", [10**6, 2**62])  # packed uint64 key, and the lexsort fallback
def test_time_order_equals_lexsort(timestamp_span):
    from experiments.movielens import time_order
    rng = np.random.default_rng(0)
    user = rng.integers(1, 50, 5000)
    timestamp = rng.integers(0, 40, 5000) * (timestamp_span // 40)   # many ties
    item = rng.integers(0, 300, 5000).astype(np.int32)
    np.testing.assert_array_equal(time_order(user, timestamp, item, 300), np.lexsort((item, timestamp, user)))


@pytest.mark.parametrize("timestamp_span", [10**6, 2**62])
def test_time_order_with_a_tie_key_equals_lexsort(timestamp_span):
    from experiments.movielens import tie_rank, time_order
    rng = np.random.default_rng(1)
    user = rng.integers(1, 50, 5000)
    timestamp = rng.integers(0, 40, 5000) * (timestamp_span // 40)
    item = rng.integers(0, 300, 5000).astype(np.int32)
    key = tie_rank(user, item * 7 + 1, item, 300, "hash")
    np.testing.assert_array_equal(time_order(user, timestamp, item, 300, key), np.lexsort((key, timestamp, user)))


def test_hash_tie_break_is_fixed_and_unlearnable(tmp_path):
    """Inside ties the default order is the same on every rerun, yet the next movieId is larger only about
    half of the time (with "movieid" it always is: a pattern a sequence model learns)."""
    rng = np.random.default_rng(0)
    movies = "movieId,title,genres\n" + "".join(f"{m},Movie {m} (2000),Drama\n" for m in range(1, 201))
    rows = {(u, m): int(rng.integers(0, 5)) for u in range(1, 41) for m in rng.choice(np.arange(1, 201), 30, replace=False)}
    ratings = "userId,movieId,rating,timestamp\n" + "".join(f"{u},{m},4.0,{t}\n" for (u, m), t in rows.items())
    data = write_movielens(tmp_path / "ml", movies, ratings)
    larger = {}
    for tie_break in ("hash", "movieid"):
        stats = prepare_interactions(data, tmp_path / tie_break, tie_break=tie_break)
        assert stats["tie_break"] == tie_break
        inter = load_interactions(tmp_path / tie_break)
        ids = load_item_ids(tmp_path / tie_break)[inter.item_index]
        same_user = np.repeat(np.arange(inter.n_users), np.diff(inter.offsets))
        tied = (np.diff(inter.timestamps) == 0) & (np.diff(same_user) == 0)
        larger[tie_break] = float((np.diff(ids)[tied] > 0).mean())
    assert larger["movieid"] == 1.0
    assert 0.4 < larger["hash"] < 0.6
    again = prepare_interactions(data, tmp_path / "again")
    np.testing.assert_array_equal(load_interactions(tmp_path / "again").item_index,
                                  load_interactions(tmp_path / "hash").item_index)
    with pytest.raises(FileExistsError, match="other inputs or settings"):
        prepare_interactions(data, tmp_path / "hash", tie_break="movieid")
    with pytest.raises(ValueError, match="tie_break"):
        prepare_interactions(data, tmp_path / "bad", tie_break="random")


def test_tied_with_previous():
    from modules.split import tied_with_previous
    offsets = np.array([0, 3, 6])
    timestamps = np.array([5, 5, 7, 7, 8, 8])
    np.testing.assert_array_equal(tied_with_previous(offsets, timestamps, np.arange(6)),
                                  [False, True, False, False, False, True])  # position 3 starts user 1


def test_dat_release_without_links(tmp_path, caplog):
    """ml-1m style: '::'-separated latin-1 .dat files, no header, no links.csv (tmdbId unknown, said loudly)."""
    data = tmp_path / "ml-1m"
    data.mkdir()
    (data / "movies.dat").write_bytes("1::Toy Story (1995)::Animation|Children's\n"
                                      "2::Café au lait (1993)::Comedy\n".encode("latin-1"))
    (data / "ratings.dat").write_text("".join(f"7::{m}::{r}::{978300760 + t}\n"
                                              for t, (m, r) in enumerate([(2, 5), (1, 3), (2, 4)])))
    stats = prepare_interactions(data, tmp_path / "run", min_user_interactions=3)
    assert (stats["users"], stats["items"], stats["interactions"]) == (1, 2, 3)
    items = load_items(tmp_path / "run")
    assert items["title"].tolist() == ["Toy Story (1995)", "Café au lait (1993)"]
    assert items["tmdbId"].isna().all() and "no links.csv" in caplog.text
