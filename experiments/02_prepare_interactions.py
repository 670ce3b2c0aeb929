"""Step 2: turn a MovieLens-format folder into the run's item table, user histories and split stats.

    python experiments/02_prepare_interactions.py --data dataset/ml-25m --run runs/ml25m
"""
import sys, pathlib
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, so `experiments`/`modules` import

import argparse
import json
import logging

from experiments.movielens import MovieLensFormatError, prepare_interactions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="MovieLens-format folder (movies.csv, ratings.csv, links.csv)")
    parser.add_argument("--run", required=True, help="run folder to write items.csv, interactions.npz, stats.json")
    parser.add_argument("--min-user-interactions", type=int, default=5, help="k-core minimum per user (>= 3)")
    parser.add_argument("--min-item-interactions", type=int, default=0, help="k-core minimum per item (0: keep all)")
    parser.add_argument("--tie-break", choices=["hash", "movieid"], default="hash",
                        help="order of events with the same timestamp: a keyed hash of (userId, movieId), which no model "
                             "can learn (default), or movieId ascending, as in published MovieLens numbers")
    parser.add_argument("--cold", type=float, default=0.0,
                        help="share of the rated items held out as cold-start items (e.g. 0.05; 0: none); their events "
                             "leave the training data, their content stays (see the README's cold-start section)")
    parser.add_argument("--cold-seed", type=int, default=0, help="seed of the cold-item draw")
    parser.add_argument("--overwrite", action="store_true", help="redo even if the run folder is already prepared")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        stats = prepare_interactions(args.data, args.run, args.min_user_interactions, args.min_item_interactions,
                                     overwrite=args.overwrite, tie_break=args.tie_break,
                                     cold_fraction=args.cold, cold_seed=args.cold_seed)
    except (MovieLensFormatError, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(json.dumps({k: stats[k] for k in ("users", "items", "interactions", "density", "history_length", "cold")},
                     indent=2))


if __name__ == "__main__":
    main()
