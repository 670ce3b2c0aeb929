"""The embedded demo dataset: deterministic, in MovieLens format, with the planted structure it promises."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from experiments.demo_data import STYLES, make_demo_dataset
from tests.conftest import TINY_DEMO


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def test_same_seed_same_bytes_other_seed_differs(tiny_demo_data, tmp_path):
    again = make_demo_dataset(tmp_path / "again", TINY_DEMO)
    for name in ("movies.csv", "ratings.csv", "links.csv", "tags.csv", "genome-scores.csv", "tmdb/details.jsonl"):
        assert (again / name).read_bytes() == (tiny_demo_data / name).read_bytes(), name
    first_poster = sorted((tiny_demo_data / "posters").iterdir())[0].name
    assert (again / "posters" / first_poster).read_bytes() == (tiny_demo_data / "posters" / first_poster).read_bytes()
    other = make_demo_dataset(tmp_path / "other", type(TINY_DEMO)(**{**TINY_DEMO.__dict__, "seed": 4}))
    assert (other / "ratings.csv").read_bytes() != (tiny_demo_data / "ratings.csv").read_bytes()


def test_movielens_format_with_crlf(tiny_demo_data):
    raw = (tiny_demo_data / "ratings.csv").read_bytes()
    assert raw.startswith(b"userId,movieId,rating,timestamp\r\n")
    movies = pd.read_csv(tiny_demo_data / "movies.csv")
    assert list(movies.columns) == ["movieId", "title", "genres"] and movies["movieId"].is_unique
    ratings = pd.read_csv(tiny_demo_data / "ratings.csv")
    assert ratings["rating"].between(0.5, 5.0).all() and ratings["movieId"].isin(movies["movieId"]).all()
    assert not ratings.duplicated(["userId", "movieId"]).any()   # a MovieLens user rates a movie once
    links = pd.read_csv(tiny_demo_data / "links.csv", dtype={"imdbId": str})
    assert links["imdbId"].str.len().eq(7).all()


def test_genres_reveal_family_not_group(tiny_demo_data):
    movies = pd.read_csv(tiny_demo_data / "movies.csv").merge(pd.read_csv(tiny_demo_data / "demo_truth.csv"))
    genres = [set(g.split("|")) for g in movies["genres"]]
    fam, grp = movies["family"].to_numpy(), movies["group"].to_numpy()
    same_family_other_group, other_family = [], []
    for i in range(len(movies)):
        for j in range(i + 1, len(movies)):
            if fam[i] == fam[j] and grp[i] != grp[j]:
                same_family_other_group.append(_jaccard(genres[i], genres[j]))
            elif fam[i] != fam[j]:
                other_family.append(_jaccard(genres[i], genres[j]))
    assert np.mean(same_family_other_group) > np.mean(other_family) + 0.3


def test_poster_colour_reveals_style(tiny_demo_data):
    truth = pd.read_csv(tiny_demo_data / "demo_truth.csv")
    palette = np.array([c for c, _ in STYLES], dtype=float)
    correct = total = 0
    for mid, style in zip(truth["movieId"], truth["style"]):
        path = tiny_demo_data / "posters" / f"{mid}.jpg"
        if not path.exists() or Image.open(path).mode != "RGB":   # grayscale posters carry layout only
            continue
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=float).reshape(-1, 3)
        chroma = pixels.max(1) - pixels.min(1)
        colourful = pixels[chroma > np.percentile(chroma, 75)].mean(0)   # skip grey "text" blocks
        guess = np.argmin(((palette / palette.sum(1, keepdims=True) - colourful / colourful.sum()) ** 2).sum(1))
        correct += int(guess == style)
        total += 1
    assert total > 40 and correct / total > 0.9


def test_existing_folder_from_other_settings_is_not_reused(tiny_demo_data, tmp_path):
    target = make_demo_dataset(tmp_path / "d", TINY_DEMO)
    assert make_demo_dataset(target, TINY_DEMO) == target          # same settings: skipped
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_demo_dataset(target, type(TINY_DEMO)(**{**TINY_DEMO.__dict__, "seed": 9}))
