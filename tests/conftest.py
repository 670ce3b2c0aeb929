"""Shared fixtures: tiny MovieLens folders written in tmp_path, and the location of ../shared."""
from __future__ import annotations

from pathlib import Path

import pytest

from experiments.demo_data import DemoConfig, make_demo_dataset
from experiments.movielens import prepare_interactions

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ML_SMALL = SHARED / "data" / "ml-latest-small"
ML_SMALL_POSTERS = SHARED / "data" / "ml-latest-small-posters" / "posters"

needs_shared = pytest.mark.skipif(not ML_SMALL.is_dir(),
                                  reason=f"real MovieLens data not found at {ML_SMALL} (../shared is absent)")

TINY_DEMO = DemoConfig(n_items=64, n_users=60, n_groups=4, seed=3, min_history=6, max_history=20,
                       poster_size=(48, 72))


def write_movielens(folder: Path, movies: str, ratings: str, links: str | None = None, newline: str = "\n") -> Path:
    """Write a hand-made MovieLens folder; `links` defaults to one tmdbId per movie."""
    folder.mkdir(parents=True, exist_ok=True)
    if links is None:
        ids = [line.split(",")[0] for line in movies.strip().splitlines()[1:]]
        links = "movieId,imdbId,tmdbId\n" + "".join(f"{i},{1000 + int(i):07d},{500 + int(i)}\n" for i in ids)
    for name, text in (("movies.csv", movies), ("ratings.csv", ratings), ("links.csv", links)):
        (folder / name).write_bytes(text.strip("\n").replace("\n", newline).encode() + newline.encode())
    return folder


@pytest.fixture
def one_torch_thread():
    """Tiny tensors on a shared machine: thread synchronisation costs more than it saves (3x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_demo_data(tmp_path_factory) -> Path:
    """A tiny demo dataset (64 movies, 60 users) in ML-25M format with posters."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "tiny", TINY_DEMO)


@pytest.fixture(scope="session")
def tiny_demo_run(tiny_demo_data, tmp_path_factory) -> Path:
    """The tiny demo dataset, prepared into a run folder (items.csv, interactions.npz, stats.json)."""
    run = tmp_path_factory.mktemp("run") / "tiny"
    prepare_interactions(tiny_demo_data, run)
    return run
