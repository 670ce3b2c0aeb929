"""Benchmark step 4: poster feature extraction speed per backbone, full pipeline vs pure forward.

    .venv/bin/python bench/bench_poster_features.py --backbones efficientnet_lite0,resnet50,vit_b_16 \
        --n-images 256,96,96 --out bench/results/poster_features.md

For each backbone, on the same real posters:
- decode:   JPEG decode + resize + crop alone, one process (images/s);
- forward:  the encoder on pre-decoded uint8 tensors (images/s), i.e. the compute floor;
- pipeline: `encode_posters` with DataLoader workers decoding in parallel (images/s).
Target: pipeline time <= 1.3x forward time (decoding hidden behind compute).
efficientnet_lite0 uses its real (offline) weights; the others use --weights none: speed does not depend
on weight values. Runs on CUDA when present, else CPU.
"""
import sys, pathlib
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, so `experiments`/`modules` import

import argparse
import logging
import os
import shlex
import time
from pathlib import Path

import numpy as np
import torch

from experiments.artifacts import save_text
from experiments.poster_features import ExtractionSettings, encode_posters, load_backbone, load_poster_rgb, pick_device

DEFAULT_POSTERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small-posters" / "posters"
log = logging.getLogger("bench_poster_features")


def sample_posters(folder: Path, n: int) -> list[Path]:
    """n posters spread evenly over the folder (sorted by movieId), so sizes/modes vary as in the data."""
    paths = sorted(folder.glob("*.jpg"), key=lambda p: int(p.stem))
    if len(paths) < n:
        raise SystemExit(f"{folder} holds {len(paths)} posters, fewer than --n-images {n}.")
    return [paths[i] for i in np.linspace(0, len(paths) - 1, n).astype(int)]


def time_decode(paths: list[Path], image_size: int) -> tuple[float, torch.Tensor]:
    """Seconds to decode all posters in this process, and the decoded (n, 3, S, S) uint8 batch."""
    started = time.perf_counter()
    pixels = [torch.from_numpy(load_poster_rgb(p, image_size)).permute(2, 0, 1) for p in paths]
    return time.perf_counter() - started, torch.stack(pixels)


def time_forward(encoder, images: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Seconds for the encoder alone over pre-decoded images (after one warm-up batch)."""
    encoder.to(device)
    with torch.inference_mode():
        encoder(images[:batch_size].to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for start in range(0, len(images), batch_size):
            encoder(images[start:start + batch_size].to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - started


def time_pipeline(backbone, paths: list[Path], settings: ExtractionSettings) -> float:
    """Seconds for the real extraction path: DataLoader workers decode while the encoder runs."""
    started = time.perf_counter()
    features, decoded = encode_posters(backbone, paths, settings)
    elapsed = time.perf_counter() - started
    assert decoded.all() and np.isfinite(features).all()
    return elapsed


def bench_backbone(name: str, paths: list[Path], batch_size: int, workers: int, device: torch.device,
                   repeats: int) -> dict:
    """Decode, forward and pipeline rates (images/s) of one backbone; each the fastest of `repeats`
    interleaved runs, since other processes on a shared machine only ever slow a run down."""
    weights = "default" if name == "efficientnet_lite0" else "none"
    backbone = load_backbone(name, weights)
    decode_s, images = time_decode(paths, backbone.image_size)
    settings = ExtractionSettings(batch_size=batch_size, workers=workers, device=device)
    forward_s = pipeline_s = float("inf")
    for _ in range(repeats):
        forward_s = min(forward_s, time_forward(backbone.encoder, images, batch_size, device))
        pipeline_s = min(pipeline_s, time_pipeline(backbone, paths, settings))
    n = len(paths)
    row = {"backbone": name, "weights": weights, "n": n, "decode": n / decode_s, "forward": n / forward_s,
           "pipeline": n / pipeline_s, "ratio": pipeline_s / forward_s}
    log.info("%s: decode %.1f img/s, forward %.1f img/s, pipeline %.1f img/s, pipeline/forward time %.2f",
             name, row["decode"], row["forward"], row["pipeline"], row["ratio"])
    return row


def render(rows: list[dict], args, device: torch.device, load: str, command: str) -> str:
    lines = [f"Device: {device}; torch threads {torch.get_num_threads()}; {os.cpu_count()} CPUs; "
             f"batch {args.batch_size}, {args.workers} DataLoader workers, 224 px, fastest of {args.repeats} "
             f"interleaved repeats. Load before the run: {load}",
             "",
             "| backbone | weights | posters | decode only (img/s, 1 proc) | pure forward (img/s) | "
             "full pipeline (img/s) | pipeline / forward time |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['weights']} | {r['n']} | {r['decode']:.1f} | {r['forward']:.1f} | "
                     f"{r['pipeline']:.1f} | {r['ratio']:.2f} |")
    lines += ["", "```", command, "```", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posters", type=Path, default=DEFAULT_POSTERS)
    parser.add_argument("--backbones", default="efficientnet_lite0,resnet50,vit_b_16")
    parser.add_argument("--n-images", default="256",
                        help="posters per backbone: one number, or a comma list matching --backbones")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the fastest counts")
    parser.add_argument("--out", type=Path, default=Path("bench/results/poster_features.md"))
    args = parser.parse_args(argv)
    device = pick_device()
    load = Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else "n/a"
    log.info("device %s, load %s", device, load)
    backbones = args.backbones.split(",")
    counts = [int(n) for n in args.n_images.split(",")]
    counts = counts * len(backbones) if len(counts) == 1 else counts
    if len(counts) != len(backbones):
        raise SystemExit(f"--n-images has {len(counts)} values for {len(backbones)} backbones.")
    rows = [bench_backbone(name, sample_posters(args.posters, n), args.batch_size, args.workers, device,
                           args.repeats)
            for name, n in zip(backbones, counts)]
    command = "python bench/bench_poster_features.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    save_text(args.out, render(rows, args, device, load, command))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
