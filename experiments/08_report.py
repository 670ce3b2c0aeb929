"""Step 8: merge the baselines and the TIGER decoder results of a run into RUN/metrics.json and RUN/results.md.

    python experiments/08_report.py --run runs/ml_small
    python experiments/08_report.py --run runs/ml_small --decoders decoder,decoder_random_ids,decoder_no_posters

Reads RUN/baselines/metrics.json and RUN/<folder>/metrics.json for each decoder folder (default: decoder
and decoder_random_ids, as written by train_decoder.py [--random-ids], each when present). Fails, naming
the file, when results disagree on n_test_users.
"""
import sys, pathlib
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, so `experiments`/`modules` import

import argparse
import logging

from experiments.artifacts import ArtifactError
from experiments.baselines import write_run_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder")
    parser.add_argument("--decoders", help="comma-separated decoder folders (relative to RUN, or absolute); "
                                           "each must hold metrics.json. Default: decoder,decoder_random_ids, "
                                           "each if present")
    parser.add_argument("--overwrite", action="store_true", help="rewrite even if the report is up to date")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    decoders = [d.strip() for d in args.decoders.split(",") if d.strip()] if args.decoders else None
    try:
        write_run_report(args.run, decoders, overwrite=args.overwrite)
    except (ArtifactError, ValueError) as err:
        sys.exit(f"error: {err}")
    print((pathlib.Path(args.run) / "results.md").read_text())


if __name__ == "__main__":
    main()
