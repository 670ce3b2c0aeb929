"""Benchmark: posters per second against the fake TMDB server with a fixed latency per request.

    .venv/bin/python bench/bench_download_posters.py                      # 50 ms latency, 40 req/s, 8 workers
    .venv/bin/python bench/bench_download_posters.py --rate 0 --movies 400 # no rate limit: the client's own ceiling

Each poster costs two requests (movie details, then the image), so at the default 40 requests/s the
target is about 20 posters/s. Prints one JSON line with the figures and writes it to --out if given.
"""
import sys, pathlib
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, so `experiments`/`tests` import

import argparse
import json
import logging
import tempfile
import time

from experiments.tmdb_posters import DownloadSettings, RetryPolicy, TmdbCredentials, download_posters
from tests.fake_servers import FakeTmdbServer


def main(argv=None) -> dict:
    """Run one timed download of `--movies` posters into a temporary folder; return the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--movies", type=int, default=300)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the fake server waits per request")
    parser.add_argument("--rate", type=float, default=40.0, help="requests/s limit (0: none)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--out", default=None, help="also write the JSON figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    movies = {1000 + m: f"/poster{m}.jpg" for m in range(1, args.movies + 1)}
    with tempfile.TemporaryDirectory() as tmp, FakeTmdbServer(movies, api_key="bench", latency=args.latency) as server:
        data = pathlib.Path(tmp)
        (data / "links.csv").write_text("movieId,imdbId,tmdbId\n" + "".join(f"{m},{m},{1000 + m}\n"
                                                                            for m in range(1, args.movies + 1)))
        settings = DownloadSettings(api_base=server.url, image_base=server.url + "/t/p", workers=args.workers,
                                    rate=args.rate, timeout=10, retry=RetryPolicy(retries=2))
        started = time.monotonic()
        report = download_posters(data, TmdbCredentials(api_key="bench"), failed_log=data / "failed.txt",
                                  settings=settings)
        elapsed = time.monotonic() - started
        n_requests = len(server.requests)
    figures = {"movies": args.movies, "downloaded": report["downloaded"], "latency_s": args.latency,
               "rate_limit": args.rate, "workers": args.workers, "seconds": round(elapsed, 2),
               "posters_per_s": round(report["downloaded"] / elapsed, 2),
               "requests_per_s": round(n_requests / elapsed, 2)}
    print(json.dumps(figures))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
