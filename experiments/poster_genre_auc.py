"""Evidence that poster features carry signal: a linear probe from poster features to each genre.

    python -m experiments.poster_genre_auc --run runs/ml_small --out docs/results/poster_genre_auc.md

Reads RUN/poster_features (step 4) and RUN/items.csv (step 2, genres), keeps movies with a poster, fits one
L2 logistic regression per genre on standardised features (modules/probe.py, 5-fold cross-validation) and
writes per-genre ROC-AUC with positive counts to a markdown file and RUN/poster_genre_auc.json. A control
run with genres shuffled across movies shows what chance looks like with the same probe.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.artifacts import load_items, save_json, save_text
from experiments.poster_features import load_poster_features
from modules.probe import ProbeResult, cross_validated_probe

log = logging.getLogger(__name__)
NO_GENRE = "(no genres listed)"


def genre_matrix(genres: pd.Series) -> pd.DataFrame:
    """'|'-joined genre strings (n,) -> (n, G) bool one-hot frame, '(no genres listed)' dropped."""
    onehot = genres.astype(str).str.get_dummies(sep="|").astype(bool)
    return onehot.drop(columns=[NO_GENRE], errors="ignore")


def run_probe(run: str | Path, n_folds: int, l2: float, l2_grid: list[float], min_positives: int,
              seed: int) -> dict:
    """Probe results for every genre with >= min_positives postered movies, plus controls."""
    posters = load_poster_features(run)
    items = load_items(run)
    keep = posters.has_poster
    features = posters.features[keep]
    genres = genre_matrix(items["genres"][keep])
    genres = genres.loc[:, genres.sum() >= min_positives]
    labels = genres.to_numpy()
    log.info("probe: %d movies with a poster, %d genres, %d-d %s features", len(features), labels.shape[1],
             features.shape[1], posters.meta["backbone"])

    started = time.perf_counter()
    main = cross_validated_probe(features, labels, n_folds=n_folds, l2=l2, seed=seed)
    log.info("mean AUC %.3f (l2=%g) in %.0f s", np.nanmean(main.auc), l2, time.perf_counter() - started)
    shuffled = np.random.default_rng(seed).permutation(len(labels))
    control = cross_validated_probe(features, labels[shuffled], n_folds=n_folds, l2=l2, seed=seed)
    log.info("shuffled-genre control: mean AUC %.3f", np.nanmean(control.auc))
    sensitivity = {}
    for value in l2_grid:
        result = main if value == l2 else cross_validated_probe(features, labels, n_folds, value, seed)
        sensitivity[value] = float(np.nanmean(result.auc))
        log.info("l2=%g: mean AUC %.3f", value, sensitivity[value])
    return {"genres": list(genres.columns), "main": main, "control": control, "sensitivity": sensitivity,
            "n_movies": int(len(features)), "n_items": int(len(keep)), "meta": posters.meta}


def render_markdown(result: dict, args: argparse.Namespace, command: str) -> str:
    """The results page: per-genre table sorted by AUC, controls, and the command."""
    main: ProbeResult = result["main"]
    control: ProbeResult = result["control"]
    meta = result["meta"]
    order = np.argsort(-main.auc)
    lines = [
        "# Do posters carry genre signal? (linear probe, ml-latest-small)",
        "",
        f"Features: `{meta['backbone']}` ({meta['dim']}-d, weights: {meta['weights']}, {meta['image_size']} px), "
        f"{result['n_movies']} of {result['n_items']} movies have a poster (the others are left out, "
        f"never zero-filled).",
        f"Probe: one logistic regression per genre on standardised features (statistics of the training folds), "
        f"L2 = {args.l2} (on the summed squared weights, loss = mean BCE), full-batch L-BFGS, {args.folds}-fold "
        f"cross-validation (seed {args.seed}); ROC-AUC over the pooled out-of-fold scores. "
        f"Genres with fewer than {args.min_positives} postered movies are omitted.",
        "Control: the same probe with genre rows shuffled across movies (features no longer belong to the "
        "labels), i.e. what chance looks like.",
        "",
        "| genre | positives | ROC-AUC | shuffled control |",
        "|---|---:|---:|---:|",
    ]
    for g in order:
        lines.append(f"| {result['genres'][g]} | {int(main.n_positive[g])} | {main.auc[g]:.3f} | "
                     f"{control.auc[g]:.3f} |")
    lines += [
        f"| **mean over {len(order)} genres** | | **{np.nanmean(main.auc):.3f}** | "
        f"{np.nanmean(control.auc):.3f} |",
        "",
    ]
    if len(result["sensitivity"]) > 1:
        lines += ["L2 sensitivity (mean AUC over the same genres): " + ", ".join(
            f"l2={k:g}: {v:.3f}" for k, v in result["sensitivity"].items()) + ".", ""]
    lines += [
        "Commands (from the repository root, after step 2 wrote the run folder):",
        "",
        "```",
        f"python experiments/04_extract_poster_features.py --run {args.run} --posters {meta.get('poster_dir')} "
        f"--backbone {meta['backbone']} --image-size {meta['image_size']}",
        command,
        "```",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder with items.csv and poster_features/")
    parser.add_argument("--out", default="docs/results/poster_genre_auc.md", help="markdown results file")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--l2", type=float, default=1e-2, help="L2 weight of the headline probe")
    parser.add_argument("--l2-grid", default="", help="comma list of extra L2 weights for a sensitivity line")
    parser.add_argument("--min-positives", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    command = "python -m experiments.poster_genre_auc " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    l2_grid = [float(v) for v in args.l2_grid.split(",") if v]
    result = run_probe(args.run, args.folds, args.l2, l2_grid, args.min_positives, args.seed)
    save_text(args.out, render_markdown(result, args, command))
    save_json(Path(args.run) / "poster_genre_auc.json", {
        "genres": result["genres"], "auc": result["main"].auc, "n_positive": result["main"].n_positive,
        "control_auc": result["control"].auc, "mean_auc": float(np.nanmean(result["main"].auc)),
        "l2": args.l2, "folds": args.folds, "seed": args.seed, "l2_sensitivity": result["sensitivity"],
        "backbone": result["meta"]["backbone"], "n_movies": result["n_movies"]})
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
