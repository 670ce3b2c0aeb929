"""Benchmark: the preparation step at ML-25M scale (target: <= 60 s and <= 4 GiB peak RSS on 2 cores).

    .venv/bin/python bench/bench_prepare.py [--work /tmp/bench_ml25m] [--ratings 25000095 --users 162541]

Generates (once, cached in --work) a ratings.csv of ML-25M's size and schema, with movieIds drawn from the real
ml-25m links.csv in ../shared (62,423 movies) and per-user activity skewed like MovieLens (>= 20 ratings each).
Then times, each in a fresh process: `experiments/02_prepare_interactions.py` (wall time, peak RSS) and pandas'
default `read_csv` of the same ratings.csv alone. Prints a markdown row for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

REPO = Path(__file__).resolve().parents[1]
LINKS = REPO.parent / "shared" / "data" / "ml-25m-subset" / "links.csv"


def make_ml25m_like(folder: Path, n_ratings: int, n_users: int, seed: int = 0) -> None:
    """movies.csv + links.csv for the real 62,423 ids, and a ratings.csv of `n_ratings` rows."""
    if (folder / "ratings.csv").is_file():
        return
    if not LINKS.is_file():
        sys.exit(f"{LINKS} not found: this benchmark draws movieIds from the real ml-25m links.csv in ../shared.")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    links = pacsv.read_csv(LINKS)
    movie_ids = links.column("movieId").to_numpy()
    pacsv.write_csv(links, folder / "links.csv")
    titles = pa.array([f"Movie {m} ({1900 + m % 120})" for m in movie_ids])
    pacsv.write_csv(pa.table({"movieId": movie_ids, "title": titles,
                              "genres": pa.array(["Drama|Comedy"] * len(movie_ids))}), folder / "movies.csv")
    # Activity: 20 + a heavy tail, scaled so the total is exactly n_ratings.
    extra = rng.pareto(1.2, n_users)
    per_user = 20 + np.floor(extra / extra.sum() * (n_ratings - 20 * n_users)).astype(np.int64)
    per_user[: n_ratings - per_user.sum()] += 1
    users = np.repeat(np.arange(1, n_users + 1), per_user)
    popularity = 1.0 / np.arange(1, len(movie_ids) + 1) ** 0.9
    movies = rng.choice(movie_ids, size=n_ratings, p=popularity / popularity.sum())
    ratings = (rng.integers(1, 11, n_ratings) / 2).astype(np.float32)
    timestamps = rng.integers(789_652_009, 1_574_327_703, n_ratings)
    table = pa.table({"userId": users, "movieId": movies, "rating": ratings, "timestamp": timestamps})
    tmp = folder / "ratings.csv.tmp"
    pacsv.write_csv(table, tmp)
    os.replace(tmp, folder / "ratings.csv")


# Runs a command in a fresh interpreter and reports that process's own peak RSS (ru_maxrss of RUSAGE_CHILDREN
# would be the maximum over every child so far, hiding a smaller second measurement).
_PEAK_WRAPPER = ("import resource, runpy, sys; sys.argv = sys.argv[1:]; "
                 "exec(sys.argv[1]) if sys.argv[0] == '-c' else runpy.run_path(sys.argv[0], run_name='__main__'); "
                 "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")


def timed_child(args: list[str]) -> tuple[float, float]:
    """Run `python <args>` in a fresh process; return (wall seconds, its peak RSS in GiB)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, *args], check=True, cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    peak_kib = int(next(line for line in done.stderr.splitlines() if line.startswith("PEAK_KIB")).split()[1])
    return wall, peak_kib / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_ml25m"))
    parser.add_argument("--ratings", type=int, default=25_000_095)
    parser.add_argument("--users", type=int, default=162_541)
    parser.add_argument("--skip-pandas", action="store_true")
    args = parser.parse_args()
    data = args.work / "data"
    start = time.perf_counter()
    make_ml25m_like(data, args.ratings, args.users)
    print(f"data ready in {time.perf_counter() - start:.0f}s: {(data / 'ratings.csv').stat().st_size / 1e6:.0f} MB")
    run = args.work / "run"
    wall, peak = timed_child(["experiments/02_prepare_interactions.py", "--data", str(data), "--run", str(run),
                              "--overwrite"])
    print(f"| prepare (02_prepare_interactions.py) | {args.ratings:,} ratings | {wall:.1f} s | {peak:.2f} GiB |")
    if not args.skip_pandas:
        wall, peak = timed_child(["-c", f"import pandas; pandas.read_csv({str(data / 'ratings.csv')!r})"])
        print(f"| pandas.read_csv(ratings.csv) alone | {args.ratings:,} ratings | {wall:.1f} s | {peak:.2f} GiB |")
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
