"""Benchmark step 5 (fusion) and step 6 (RQ-VAE training) at ML-25M scale on synthetic data.

    python bench/bench_rqvae.py fusion [--items 62423] [--genome-movies 13816] [--poster-dim 2048]
    python bench/bench_rqvae.py train  [--items 62423] [--features 540] [--steps 60] [--threads 1]

`fusion` writes a synthetic ML-25M-sized run + data folder (items.csv, a 15.6M-row genome-scores.csv,
~1.1M-row tags.csv, 62,423 x 2,048 poster features) to a temporary folder, fuses every block with the
ML-25M config, and reports wall time and peak resident memory (this process, psutil). `train` times
RQ-VAE training steps of the ML-25M model (configs/rqvae_ml25m.gin) on random features and reports
items/s. Results are printed as one JSON line; copy them to bench/results/rqvae.md with the command.
"""
import sys, pathlib
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, so `experiments`/`modules` import

import argparse
import json
import logging
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.csv as pacsv
import torch

import train_rqvae
from experiments.ml25m import ML25MItemData

REPO = Path(__file__).resolve().parents[1]


class PeakMemory:
    """Sample this process's RSS every 50 ms in a thread; `peak_gib` after `stop()`."""

    def __init__(self):
        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_gib(self) -> float:
        return self.peak / 2 ** 30


def write_synthetic_ml25m(root: Path, n_items: int, genome_movies: int, poster_dim: int, n_tags: int) -> tuple:
    """Synthetic run + data folder in the pipeline's formats, sized like ML-25M."""
    rng = np.random.default_rng(0)
    run, data, posters = root / "run", root / "data", root / "run" / "poster_features"
    for folder in (run, data, posters):
        folder.mkdir(parents=True)
    movie_ids = np.arange(1, n_items + 1, dtype=np.int64) * 3
    genres = np.array(["Action", "Comedy", "Drama", "Horror", "Sci-Fi", "Romance", "Thriller", "War"])
    genre_strings = ["|".join(genres[rng.random(len(genres)) < 0.25]) or "(no genres listed)" for _ in movie_ids]
    pd.DataFrame({"movieId": movie_ids, "tmdbId": movie_ids, "imdbId": movie_ids, "title": "A movie",
                  "year": rng.integers(1900, 2020, n_items), "genres": genre_strings}).to_csv(run / "items.csv",
                                                                                            index=False)
    np.save(run / "item_ids.npy", movie_ids)
    genome_ids = np.sort(rng.choice(movie_ids, genome_movies, replace=False))
    pacsv.write_csv(pa.table({"movieId": np.repeat(genome_ids, 1128), "tagId": np.tile(np.arange(1, 1129), genome_movies),
                              "relevance": rng.random(genome_movies * 1128, dtype=np.float32)}),
                    data / "genome-scores.csv")
    vocabulary = np.array([f"tag {i}" for i in range(5000)])
    pacsv.write_csv(pa.table({"userId": rng.integers(1, 160000, n_tags), "movieId": rng.choice(movie_ids, n_tags),
                              "tag": vocabulary[rng.zipf(1.5, n_tags) % 5000],
                              "timestamp": rng.integers(10 ** 9, 2 * 10 ** 9, n_tags)}), data / "tags.csv")
    np.save(posters / "features.npy", rng.random((n_items, poster_dim), dtype=np.float32))
    np.save(posters / "movie_ids.npy", movie_ids)
    np.save(posters / "has_poster.npy", rng.random(n_items) < 0.95)
    (posters / "meta.json").write_text(json.dumps({"backbone": "synthetic"}))
    return run, data, posters


def bench_fusion(args) -> dict:
    train_rqvae.parse_config([str(REPO / "configs" / "rqvae_ml25m.gin")])
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        started = time.perf_counter()
        run, data, posters = write_synthetic_ml25m(Path(tmp), args.items, args.genome_movies, args.poster_dim,
                                                   args.tag_rows)
        written = time.perf_counter() - started
        with PeakMemory() as memory:
            started = time.perf_counter()
            fused = ML25MItemData(root=data, poster_feature_path=posters, run=run)
            seconds = time.perf_counter() - started
    return {"bench": "fusion", "items": args.items, "genome_rows": args.genome_movies * 1128,
            "tag_rows": args.tag_rows, "poster_dim": args.poster_dim, "fused_shape": list(fused.features.shape),
            "blocks": {b.name: b.columns for b in fused.blocks}, "fusion_seconds": round(seconds, 1),
            "peak_rss_gib": round(memory.peak_gib, 2), "synthetic_write_seconds": round(written, 1)}


def bench_train(args) -> dict:
    torch.set_num_threads(args.threads)
    train_rqvae.parse_config([str(REPO / "configs" / "rqvae_ml25m.gin")])
    device = train_rqvae.pick_device(args.device)
    features = torch.randn(args.items, args.features, device=device)
    model = train_rqvae.build_model(args.features, device)
    batch_size = train_rqvae.gin.query_parameter("train_rqvae.batch_size")
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    train_rqvae.initialise_codebooks(model, features, train_rqvae.gin.query_parameter("train_rqvae.kmeans_sample"),
                                     generator)
    init_seconds = time.perf_counter() - started
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    for step in range(args.steps + 5):
        if step == 5:  # warm-up steps excluded
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        index = torch.randint(args.items, (batch_size,), generator=generator).to(device)
        train_rqvae.train_step(model, optimizer, features[index], True, generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"bench": "train", "device": str(device), "threads": args.threads, "items": args.items,
            "features": args.features, "batch_size": batch_size, "steps": args.steps,
            "items_per_s": round(args.steps * batch_size / seconds), "kmeans_init_seconds": round(init_seconds, 1),
            "seconds_per_25000_steps_h": round(25000 * seconds / args.steps / 3600, 2)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["fusion", "train"])
    parser.add_argument("--items", type=int, default=62423)
    parser.add_argument("--genome-movies", type=int, default=13816)
    parser.add_argument("--tag-rows", type=int, default=1093360)
    parser.add_argument("--poster-dim", type=int, default=2048)
    parser.add_argument("--features", type=int, default=540, help="fused width (ML-25M config: ~540)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default=None)
    parser.add_argument("--tmp", default=None, help="folder for the synthetic files (default: system temp)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = bench_fusion(args) if args.what == "fusion" else bench_train(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
