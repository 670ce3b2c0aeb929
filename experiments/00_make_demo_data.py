"""Step 0: write the embedded demo dataset (synthetic, ML-25M format, with posters) into a data folder.

    python experiments/00_make_demo_data.py --out dataset/demo [--items 800 --users 1500 --seed 0]

See experiments/demo_data.py for the planted structure (posters carry signal the metadata lacks).
"""
import sys, pathlib
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, so `experiments`/`modules` import

import argparse
import logging

from experiments.demo_data import DemoConfig, make_demo_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="dataset/demo", help="data folder to create")
    parser.add_argument("--items", type=int, default=DemoConfig.n_items)
    parser.add_argument("--users", type=int, default=DemoConfig.n_users)
    parser.add_argument("--groups", type=int, default=DemoConfig.n_groups, help="latent groups (multiple of 4)")
    parser.add_argument("--seed", type=int, default=DemoConfig.seed)
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if the folder exists")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = DemoConfig(n_items=args.items, n_users=args.users, n_groups=args.groups, seed=args.seed)
    try:
        make_demo_dataset(args.out, config, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
