"""Step 11: evaluate every model of a run prepared with --cold on its cold-start items (experiments/cold_start.py).

    python experiments/11_cold_start.py --run runs/ml_small_cold [--epsilon 0.1] [--models tiger,semantic_knn]
        [--features RUN/item_features] [--decoder RUN/decoder] [--out RUN/cold] [--overwrite]

Writes OUT/metrics.json (the `cold` section of the run report), OUT/results.md and OUT/cold_epsilon.png.
"""
import sys, pathlib
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, so `experiments`/`modules` import

import argparse
import logging

import torch

from experiments.artifacts import ArtifactError, exit_message
from experiments.cold_start import MODELS, run_cold_start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder prepared with --cold")
    parser.add_argument("--out", help="output folder (default RUN/cold)")
    parser.add_argument("--features", help="fused item features for Semantic-KNN (default RUN/item_features)")
    parser.add_argument("--decoder", help="TIGER's train_decoder.py folder (default RUN/decoder)")
    parser.add_argument("--random-decoder", help="the random-ID TIGER's folder (default RUN/decoder_random_ids)")
    parser.add_argument("--sasrec", help="SASRec checkpoint (default RUN/baselines/sasrec/best.pt)")
    parser.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)} (default: every one trained)")
    parser.add_argument("--epsilon", type=float, default=0.1,
                        help="share of the top-K reserved for cold items (default 0.1: 1 of 10)")
    parser.add_argument("--beam-width", type=int, default=20, help="beam width of TIGER's warm and natural rankings")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random model and of most popular's order among cold items")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--overwrite", action="store_true", help="redo even if a finished output exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    try:
        report = run_cold_start(args.run, args.out, args.features, args.decoder, args.random_decoder, models,
                                args.epsilon, args.beam_width, args.seed, args.overwrite, args.sasrec)
    except (ArtifactError, ValueError) as err:
        sys.exit(exit_message(err))
    print((pathlib.Path(args.out or pathlib.Path(args.run) / "cold") / "results.md").read_text())
    return report


if __name__ == "__main__":
    main()
