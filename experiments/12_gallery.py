"""Step 12: poster galleries of a finished run: the items under first-level codes, TIGER's top-10 for test users.

    python experiments/12_gallery.py --run runs/ml_small --posters dataset/ml-latest-small/posters
        [--decoder RUN/decoder] [--rqvae RUN/rqvae] [--out RUN/gallery] [--codes 12] [--per-code 16] [--code-order largest|random]
        [--users 8] [--history 10] [--seed 0] [--beam-width N] [--threads N]

Writes OUT/codes.png, OUT/users.png, OUT/gallery.md (index with relative links) and OUT/gallery.json (layout)
(experiments/gallery.py). CPU only; seconds once the decoder is loaded.
"""
import sys, pathlib
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, so `experiments`/`modules` import

import argparse
import logging

import torch

from experiments.artifacts import ArtifactError, exit_message
from experiments.gallery import CODE_ORDERS, make_gallery


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="finished run folder (items.csv, rqvae/, decoder/)")
    parser.add_argument("--posters", required=True, help="folder of {movieId}.jpg posters")
    parser.add_argument("--decoder", help="TIGER's train_decoder.py folder (default RUN/decoder)")
    parser.add_argument("--rqvae", help="train_rqvae.py folder of the codes shown (default RUN/rqvae; with users, the "
                                        "one the decoder was trained on)")
    parser.add_argument("--out", help="output folder (default RUN/gallery)")
    parser.add_argument("--codes", type=int, default=12, help="first-level codes to show (default 12)")
    parser.add_argument("--per-code", type=int, default=16, help="posters per code at most (default 16)")
    parser.add_argument("--code-order", choices=CODE_ORDERS, default="largest",
                        help="the most populated codes, or a seeded random sample of the used ones")
    parser.add_argument("--users", type=int, default=8, help="test users to show (default 8; 0: no decoder needed)")
    parser.add_argument("--history", type=int, default=10, help="input events shown per user (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the code, item and user samples")
    parser.add_argument("--beam-width", type=int, help="default: the decoder's train_decoder.beam_width")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = make_gallery(args.run, args.posters, args.out, args.decoder, args.codes, args.per_code, args.users,
                              args.code_order, args.history, args.seed, args.beam_width, args.rqvae)
    except (ArtifactError, ValueError) as err:
        sys.exit(exit_message(err))
    print((pathlib.Path(args.out or pathlib.Path(args.run) / "gallery") / "gallery.md").read_text())
    return report


if __name__ == "__main__":
    main()
