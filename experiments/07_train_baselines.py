"""Step 7b: most-popular and SASRec baselines on a prepared run folder (same split and metrics as TIGER).

    python experiments/07_train_baselines.py --run runs/ml_small --sasrec-config configs/sasrec_ml_small.gin

Writes RUN/baselines/metrics.json (valid and test metrics per model) plus SASRec's checkpoints, log and
resolved config under RUN/baselines/sasrec/. A finished model is reused only for the same inputs and
config (one made from others is refused; --overwrite redoes it); an interrupted SASRec run resumes from
its last epoch.
"""
import sys, pathlib
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, so `experiments`/`modules` import

import argparse
import json
import logging

import torch

from experiments.artifacts import ArtifactError
from experiments.baselines import MODELS, run_baselines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="prepared run folder (item_ids.npy, interactions.npz)")
    parser.add_argument("--sasrec-config", help="gin file for SASRec, e.g. configs/sasrec_ml_small.gin")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--out", help="output folder (default RUN/baselines)")
    parser.add_argument("--overwrite", action="store_true", help="recompute the requested models from scratch")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--gin_param", action="append", default=[],
                        help="extra SASRec gin binding after the config, e.g. 'train_sasrec.seed = 1'")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    try:
        summary = run_baselines(args.run, args.out, models, args.sasrec_config, overwrite=args.overwrite,
                                gin_bindings=args.gin_param)
    except (ArtifactError, ValueError, OSError) as err:
        sys.exit(f"error: {err}")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
