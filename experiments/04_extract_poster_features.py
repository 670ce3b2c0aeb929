"""Step 4: extract one feature vector per movie poster, aligned to the run's item_ids.npy.

    python experiments/04_extract_poster_features.py --run runs/ml_small \
        --posters ../shared/data/ml-latest-small-posters/posters --backbone efficientnet_lite0

Writes RUN/poster_features/{features.npy, movie_ids.npy, has_poster.npy, meta.json}; resumes after a kill.
See experiments/poster_features.py for the details.
"""
import sys, pathlib
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, so `experiments`/`modules` import

import argparse
import logging

from experiments.artifacts import ArtifactError
from experiments.poster_features import (BACKBONES, ExtractionSettings, WeightsUnavailableError,
                                         extract_poster_features)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder holding item_ids.npy (written by step 2)")
    parser.add_argument("--posters", required=True, help="folder of {movieId}.jpg posters")
    parser.add_argument("--backbone", default="efficientnet_lite0", choices=sorted(BACKBONES),
                        help="image model (default: efficientnet_lite0, whose weights install offline)")
    parser.add_argument("--weights", default="default", choices=["default", "none"],
                        help="default: pretrained weights (error if unavailable); none: random init, recorded")
    parser.add_argument("--weights-path", default=None, help="local state_dict .pth to load instead")
    parser.add_argument("--image-size", type=int, default=None, help="square input size (default: 224)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding JPEGs")
    parser.add_argument("--chunk-size", type=int, default=2000, help="items per resumable chunk")
    parser.add_argument("--overwrite", action="store_true", help="recompute even if outputs exist")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    settings = ExtractionSettings(batch_size=args.batch_size, workers=args.workers)
    try:
        extract_poster_features(args.run, args.posters, backbone=args.backbone, weights=args.weights,
                                weights_path=args.weights_path, image_size=args.image_size, settings=settings,
                                chunk_size=args.chunk_size, overwrite=args.overwrite)
    except (ArtifactError, WeightsUnavailableError, ImportError) as err:
        raise SystemExit(f"error: {err}") from err  # a sentence for the user, not a traceback


if __name__ == "__main__":
    main()
