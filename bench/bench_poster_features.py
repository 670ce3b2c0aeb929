"""Benchmark step 4: poster feature extraction speed per backbone, full pipeline vs pure forward.

    .venv/bin/python bench/bench_poster_features.py --backbones efficientnet_lite0,resnet50,vit_b_16 \
        --n-images 256,96,96 --out bench/results/poster_features.md
    .venv/bin/python bench/bench_poster_features.py --synthetic 512 --backbones efficientnet_lite0,resnet50 \
        --weights none --batch-size 128 --workers 8 --out /tmp/posters.md --json /tmp/posters.json

For each backbone, on the same real posters:
- decode:   JPEG decode + resize + crop alone, one process (images/s);
- forward:  the encoder on pre-decoded uint8 tensors (images/s), i.e. the compute floor;
- pipeline: `encode_posters` with DataLoader workers decoding in parallel (images/s).
Target: pipeline time <= 1.3x forward time (decoding hidden behind compute).
efficientnet_lite0 uses its real (offline) weights; the others use --weights none: speed does not depend
on weight values (`--weights none` makes every backbone random, for a machine without the weight files).
Runs on CUDA when present, else CPU; on CUDA both forward and pipeline run under the extraction's bf16
autocast and channels_last layout.

Without a poster folder (say, a GPU machine that has only the repository), `--synthetic N` writes N seeded
synthetic JPEG posters (342 x 513, TMDB's w342 size: colour gradients, blocks, text-like stripes and grain)
into a temporary folder and benchmarks on those; decoding them costs about what real posters cost.
`--json FILE` also writes the rows as JSON.
"""
import sys, pathlib
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, so `experiments`/`modules` import

import argparse
import logging
import os
import shlex
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from experiments.artifacts import save_json, save_text
# _autocast: the forward pass is timed under the very autocast the extraction uses, not a copy of it.
from experiments.poster_features import (ExtractionSettings, _autocast, encode_posters, load_backbone,
                                         load_poster_rgb, pick_device)

DEFAULT_POSTERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small-posters" / "posters"
log = logging.getLogger("bench_poster_features")


SYNTHETIC_SIZE = (342, 513)  # width x height of TMDB's w342 posters, which step 3 downloads


def write_synthetic_posters(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = SYNTHETIC_SIZE) -> list[Path]:
    """Write n seeded synthetic JPEG posters `1.jpg` .. `n.jpg` into folder; returns their paths.

    Each is a vertical two-colour gradient with a few solid blocks, a band of text-like stripes and
    grain, so JPEG has edges and texture to code (a flat image would decode unrealistically fast).
    """
    rng = np.random.default_rng(seed)
    width, height = size
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    paths = []
    for movie_id in range(1, n + 1):
        top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        pixels = np.broadcast_to(top + (bottom - top) * ramp, (height, width, 3)).copy()
        for _ in range(rng.integers(2, 6)):
            x0, y0 = rng.integers(0, width - 20), rng.integers(0, height - 20)
            x1, y1 = x0 + rng.integers(10, width // 2), y0 + rng.integers(10, height // 3)
            pixels[y0:y1, x0:x1] = rng.uniform(0, 255, 3)
        band = rng.integers(0, height - 40)  # a title: short dark and light stripes
        stripes = (np.arange(width) // rng.integers(3, 8)) % 2 == 0
        pixels[band:band + 30, stripes] = 255 - pixels[band:band + 30, stripes]
        pixels += rng.normal(0, 6, pixels.shape)
        path = folder / f"{movie_id}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


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
    """Seconds for the encoder alone over pre-decoded images (after one warm-up batch), with the
    extraction's autocast and memory layout (bf16 and channels_last on CUDA, float32 on CPU)."""
    encoder.to(device)
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    with torch.inference_mode(), _autocast(device):
        encoder(images[:batch_size].to(device).contiguous(memory_format=layout))
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for start in range(0, len(images), batch_size):
            encoder(images[start:start + batch_size].to(device).contiguous(memory_format=layout))
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
                   repeats: int, weights: str = "auto") -> dict:
    """Decode, forward and pipeline rates (images/s) of one backbone; each the fastest of `repeats`
    interleaved runs, since other processes on a shared machine only ever slow a run down.
    weights: "auto" (real weights for efficientnet_lite0, random for the others) or "none" (all random)."""
    weights = "default" if name == "efficientnet_lite0" and weights == "auto" else "none"
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
    source = (f"{args.synthetic} synthetic posters ({SYNTHETIC_SIZE[0]} x {SYNTHETIC_SIZE[1]})"
              if args.synthetic else f"posters from {args.posters}")
    lines = [f"Device: {device}; torch threads {torch.get_num_threads()}; {os.cpu_count()} CPUs; "
             f"batch {args.batch_size}, {args.workers} DataLoader workers, 224 px, fastest of {args.repeats} "
             f"interleaved repeats; {source}. Load before the run: {load}",
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
    parser.add_argument("--n-images", default=None,
                        help="posters per backbone: one number, or a comma list matching --backbones "
                             "(default 256, or N with --synthetic N)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the fastest counts")
    parser.add_argument("--weights", choices=["auto", "none"], default="auto",
                        help="auto: real efficientnet_lite0 weights, random others; none: every backbone random")
    parser.add_argument("--synthetic", type=int, metavar="N",
                        help="benchmark on N synthetic posters written to a temporary folder (--posters unused); "
                             "--n-images then defaults to N")
    parser.add_argument("--device", help="cuda or cpu (default: CUDA when present)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/poster_features.md"))
    parser.add_argument("--json", type=Path, help="also write the rows and settings to this JSON file")
    args = parser.parse_args(argv)
    if args.synthetic is not None and args.synthetic < 1:
        parser.error(f"--synthetic needs a positive number of posters, got {args.synthetic}.")
    device = torch.device(args.device) if args.device else pick_device()
    load = Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else "n/a"
    log.info("device %s, load %s", device, load)
    backbones = args.backbones.split(",")
    counts = [int(n) for n in (args.n_images or str(args.synthetic or 256)).split(",")]
    counts = counts * len(backbones) if len(counts) == 1 else counts
    if len(counts) != len(backbones):
        raise SystemExit(f"--n-images has {len(counts)} values for {len(backbones)} backbones.")
    with tempfile.TemporaryDirectory(prefix="synthetic_posters_") as tmp:
        folder = args.posters
        if args.synthetic:
            folder = Path(tmp)
            started = time.perf_counter()
            write_synthetic_posters(folder, args.synthetic)
            log.info("wrote %d synthetic posters to %s in %.1f s", args.synthetic, folder,
                     time.perf_counter() - started)
        rows = [bench_backbone(name, sample_posters(folder, n), args.batch_size, args.workers, device,
                               args.repeats, args.weights)
                for name, n in zip(backbones, counts)]
    command = "python bench/bench_poster_features.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    save_text(args.out, render(rows, args, device, load, command))
    log.info("wrote %s", args.out)
    if args.json:
        save_json(args.json, {"device": str(device), "load": load, "image_size": 224,
                              "posters": f"synthetic ({args.synthetic})" if args.synthetic else str(args.posters),
                              "batch_size": args.batch_size, "workers": args.workers, "repeats": args.repeats,
                              "precision": (f"{_autocast(device).fast_dtype} autocast" if device.type == "cuda"
                                            else "float32"),
                              "rows": rows, "command": command})
        log.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
