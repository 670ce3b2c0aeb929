"""Step 9: do posters help? Train and evaluate TIGER on several item-feature sets x seeds.

    python experiments/09_ablation.py --run runs/ml_small --data ../shared/data/ml-latest-small \
        --rqvae-config configs/rqvae_ml_small.gin --decoder-config configs/decoder_ml_small.gin \
        --sets genres_year,text,poster,all --seeds 0,1,2 [--jobs 2]

Feature sets: genres_year (genres+year), text (+ tags, tag genome where present, TMDB text with --with-text:
the details file comes from ML25MItemData.tmdb_details of the RQ-VAE gin file),
poster (genres+year+poster), all, collab (genres+year+collab), all_collab (all + collab). Writes <out>/ablation.md (mean ± std table), ablation.json and ablation.png.
Needs the run prepared (step 2) and poster features extracted (step 4). Finished cells are skipped on rerun.

One set under several fusions, from finished ablation folders (the adaptive one chosen on validation):
    python experiments/09_ablation.py --run runs/ml_small --sets all \
        --compare-fusions concat=runs/ml_small/ablation,gated=runs/ml_small/ablation_gated,attention=... [--out F]
"""
import sys, pathlib
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, so `experiments`/`modules` import

import argparse
import logging
import subprocess
from pathlib import Path

from experiments.ablation import fusion_comparison, fusion_markdown, markdown_table, run_ablation
from experiments.artifacts import ArtifactError, load_json, save_json, save_text


def compare_fusions(args) -> None:
    named = dict(item.split("=", 1) for item in args.compare_fusions.split(","))
    if len(args.sets.split(",")) != 1:
        sys.exit("error: --compare-fusions compares one feature set: pass --sets with one name.")
    try:
        comparison = fusion_comparison({fusion: load_json(Path(folder) / "ablation.json", "experiments/09_ablation.py")
                                        for fusion, folder in named.items()}, args.sets)
    except (ValueError, ArtifactError) as err:
        sys.exit(f"error: {err}")
    out = args.out or args.run / "ablation"
    save_json(out / "fusions.json", comparison)
    save_text(out / "fusions.md", fusion_markdown(comparison))
    print(fusion_markdown(comparison))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="prepared run folder with poster_features/")
    parser.add_argument("--data", type=Path, help="MovieLens data folder (tags, genome)")
    parser.add_argument("--poster-features", type=Path, help="default RUN/poster_features")
    parser.add_argument("--rqvae-config")
    parser.add_argument("--decoder-config")
    parser.add_argument("--sets", default="genres_year,text,poster,all", help="comma-separated feature sets")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--with-text", action="store_true", help="add the TMDB text block to the text/all sets "
                        "(reads ML25MItemData.tmdb_details of --rqvae-config)")
    parser.add_argument("--tmdb-details", type=Path, help="TMDB details.jsonl of the text block (overrides "
                        "ML25MItemData.tmdb_details of --rqvae-config)")
    parser.add_argument("--out", type=Path, help="default RUN/ablation")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cells trained at once (each decoder then uses one torch thread); 2 suits 2 CPU cores")
    parser.add_argument("--compare-fusions", metavar="FUSION=FOLDER,...",
                        help="instead of training: one feature set (--sets, one name) under the fusions of finished "
                             "ablation folders, e.g. concat=RUN/ablation,gated=RUN/ablation_gated; writes "
                             "<out>/fusions.md and fusions.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.compare_fusions:
        return compare_fusions(args)
    missing = [f"--{name.replace('_', '-')}" for name in ("data", "rqvae_config", "decoder_config") if not getattr(args, name)]
    if missing:
        parser.error(f"training the ablation needs {', '.join(missing)}")
    try:
        summary = run_ablation(args.run, args.data, args.poster_features or args.run / "poster_features",
                               args.sets.split(","), [int(s) for s in args.seeds.split(",")],
                               args.rqvae_config, args.decoder_config, args.out, args.with_text, args.jobs,
                               args.tmdb_details)
    except (ValueError, subprocess.CalledProcessError) as err:
        sys.exit(f"error: {err}")
    print(markdown_table(summary))


if __name__ == "__main__":
    main()
