"""Step 10: every model of a finished pipeline run over several seeds, summarised as mean ± std.

    make seeds DATA=... RUN=runs/ml_small SEEDS=0,1,2            (trains seeds 1 and 2, then summarises)
    python experiments/10_seeds.py --run runs/ml_small --seeds 0,1,2 --train \
        --rqvae-config configs/rqvae_ml_small.gin --decoder-config configs/decoder_ml_small.gin \
        --sasrec-config configs/sasrec_ml_small.gin [--jobs 2 --threads 1]
    python experiments/10_seeds.py --run runs/ml_small --seeds 0,1,2     (summary only)

Seed 0 is the pipeline's run itself; seed s > 0 goes to RUN/seed<s>/ (experiments/seeds.py). Writes
RUN/seeds.json and RUN/seeds.md.
"""
import sys, pathlib
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, so `experiments`/`modules` import

import argparse
import logging
import subprocess

from experiments.artifacts import ArtifactError
from experiments.seeds import summarise_run, train_seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run folder finished by make pipeline (seed 0)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (0 = the pipeline's own models)")
    parser.add_argument("--train", action="store_true", help="train the missing seeds first (needs the configs)")
    parser.add_argument("--rqvae-config", help="e.g. configs/rqvae_ml_small.gin")
    parser.add_argument("--decoder-config", help="e.g. configs/decoder_ml_small.gin")
    parser.add_argument("--sasrec-config", help="e.g. configs/sasrec_ml_small.gin")
    parser.add_argument("--jobs", type=int, default=1, help="models trained at once")
    parser.add_argument("--threads", type=int, help="torch threads per model")
    parser.add_argument("--also", default="", help="more decoders to summarise, name=folder inside each seed "
                                                  "folder, comma-separated (e.g. tiger_long=decoder_long)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    try:
        if args.train:
            if not (args.rqvae_config and args.decoder_config and args.sasrec_config):
                raise ArtifactError("--train needs --rqvae-config, --decoder-config and --sasrec-config.")
            train_seeds(pathlib.Path(args.run), seeds, args.rqvae_config, args.decoder_config, args.sasrec_config,
                        args.jobs, args.threads)
        extra = dict(item.split("=", 1) for item in args.also.split(",") if item.strip())
        summarise_run(pathlib.Path(args.run), seeds, extra, args.threads)
    except subprocess.CalledProcessError as err:
        sys.exit(f"error: a training step failed (exit code {err.returncode}): {' '.join(err.cmd)}")
    except (ArtifactError, ValueError) as err:
        sys.exit(f"error: {err}")
    print((pathlib.Path(args.run) / "seeds.md").read_text())


if __name__ == "__main__":
    main()
