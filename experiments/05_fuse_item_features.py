"""Step 5: fuse genres, year, tags, genome, poster, collab and TMDB text features into RUN/item_features/.

    python experiments/05_fuse_item_features.py configs/rqvae_ml_small.gin --run runs/ml_small \
        --data ../shared/data/ml-latest-small --posters-features runs/ml_small/poster_features \
        [--blocks genres,year,tags,poster,text | --add-blocks text] [--tmdb-details DATA/tmdb/details.jsonl]
        [--out runs/ml_small/item_features] [--overwrite] [--allow-random-poster-weights]

The gin file is the RQ-VAE config of the run (its `ML25MItemData.*` bindings); flags override it.
A finished output is reused only when its blocks.json records the same settings and input files; otherwise
the script stops (exit code 1) and says what changed: pass --overwrite to rebuild it.
"""
import sys, pathlib
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, so `experiments`/`modules` import

import argparse
import logging

import train_rqvae  # registers every configurable the RQ-VAE gin files bind
from experiments.artifacts import ArtifactError, exit_message
from experiments.ml25m import ML25MItemData, fuse_item_features, gin_effective_parameters


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="+", help="gin file(s), e.g. configs/rqvae_ml_small.gin")
    parser.add_argument("--run", required=True, help="run folder holding items.csv and item_ids.npy (step 2)")
    parser.add_argument("--data", help="MovieLens data folder (overrides ML25MItemData.root)")
    parser.add_argument("--posters-features", help="poster feature folder of step 4 "
                                                   "(overrides ML25MItemData.poster_feature_path)")
    parser.add_argument("--blocks", help="comma-separated blocks, e.g. genres,year,tags,poster "
                                         "(overrides ML25MItemData.blocks)")
    parser.add_argument("--add-blocks", help="comma-separated blocks appended to the configured ones when absent, "
                                             "e.g. text (make adds it when TMDB_DETAILS exists)")
    parser.add_argument("--tmdb-details", help="TMDB details.jsonl for the 'text' block "
                                               "(overrides ML25MItemData.tmdb_details)")
    parser.add_argument("--out", help="output folder (default RUN/item_features)")
    parser.add_argument("--gin_param", action="append", default=[], help="extra gin binding, repeatable")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild even if a finished output exists (needed when its inputs or config changed)")
    parser.add_argument("--allow-random-poster-weights", action="store_true",
                        help="fuse poster features extracted with --weights none (random init; speed tests only; "
                             "sets ML25MItemData.allow_random_poster_weights)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    train_rqvae.parse_config(args.config, args.gin_param)
    overrides = {}
    if args.data:
        overrides["root"] = args.data
    if args.posters_features:
        overrides["poster_feature_path"] = args.posters_features
    if args.tmdb_details:
        overrides["tmdb_details"] = args.tmdb_details
    if args.blocks:
        overrides["blocks"] = [b.strip() for b in args.blocks.split(",") if b.strip()]
    if args.add_blocks:
        configured = overrides.get("blocks") or list(gin_effective_parameters(ML25MItemData, "ML25MItemData")["blocks"])
        added = [b.strip() for b in args.add_blocks.split(",") if b.strip() and b.strip() not in configured]
        overrides["blocks"] = configured + added
        logging.info("blocks %s (%s added to the configured ones)", overrides["blocks"], added or "nothing")
    if args.allow_random_poster_weights:
        overrides["allow_random_poster_weights"] = True
    try:
        meta = fuse_item_features(args.run, args.out, overwrite=args.overwrite, **overrides)
    except (ArtifactError, ValueError) as err:  # a stale or missing input, or a bad setting: no traceback
        sys.exit(exit_message(err))
    for block in meta["blocks"]:
        logging.info("%s: columns %s, %d items without it", block["name"], block["columns"],
                     block["n_items_without_block"])


if __name__ == "__main__":
    main()
