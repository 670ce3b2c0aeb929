"""The poster ablation: feature sets x seeds, each through fusion -> RQ-VAE -> TIGER, summarised.

Every cell runs the pipeline's own scripts in a subprocess (so gin state never leaks between cells) and
each script skips work it already finished, so a killed ablation resumes where it stopped.

Layout under `<out>` (default `<run>/ablation/`):
    <set>/item_features/            fused features of that feature set (seed-independent)
    <set>/seed<k>/rqvae/            semantic ids for that seed
    <set>/seed<k>/decoder/          TIGER trained on them; metrics.json holds valid/test metrics
    ablation.json, ablation.md, ablation.png
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.artifacts import load_json, save_figure, save_json, save_text

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
METRICS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")


@dataclass(frozen=True)
class FeatureSet:
    """A named choice of item-feature blocks (experiments/ml25m.py BLOCK_NAMES)."""

    name: str
    label: str
    blocks: tuple[str, ...]


def feature_sets(data_dir: Path, with_text: bool = False) -> dict[str, FeatureSet]:
    """The ablation's four sets; the tag genome joins the metadata blocks where the data has one."""
    meta = ("tags", "genome") if (Path(data_dir) / "genome-scores.csv").is_file() else ("tags",)
    meta += ("text",) if with_text else ()
    return {s.name: s for s in (
        FeatureSet("genres_year", "genres+year", ("genres", "year")),
        FeatureSet("text", "+ tags/text", ("genres", "year") + meta),
        FeatureSet("poster", "+ poster", ("genres", "year", "poster")),
        FeatureSet("all", "all", ("genres", "year") + meta + ("poster",)),
    )}


def run_script(cmd: list[str]) -> None:
    """Run one pipeline script from the repository root, logged; a failure raises CalledProcessError."""
    log.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=True, cwd=REPO)


def fuse_set(run: Path, data: Path, poster_features: Path, out: Path, fset: FeatureSet, rqvae_config: str) -> None:
    """The fused item features of one feature set (skipped when already written)."""
    run_script([sys.executable, "experiments/05_fuse_item_features.py", rqvae_config, "--run", str(run),
                "--data", str(data), "--posters-features", str(poster_features), "--blocks", ",".join(fset.blocks),
                "--out", str(out / fset.name / "item_features")])


def run_cell(run: Path, out: Path, fset: FeatureSet, seed: int, rqvae_config: str, decoder_config: str,
             threads: int | None = None) -> dict:
    """Train the RQ-VAE and TIGER of one (set, seed) on the set's fused features; return the decoder's metrics.json.

    threads: torch CPU threads of the decoder (None: its default).
    """
    py = sys.executable
    cell = out / fset.name / f"seed{seed}"
    run_script([py, "train_rqvae.py", rqvae_config, "--run", str(run),
                "--features", str(out / fset.name / "item_features"), "--out", str(cell / "rqvae"),
                "--gin_param", f"train_rqvae.seed = {seed}"])
    run_script([py, "train_decoder.py", decoder_config, "--run", str(run), "--semantic-ids", str(cell / "rqvae"),
                "--out", str(cell / "decoder"), "--gin_param", f"train_decoder.seed = {seed}"]
               + (["--threads", str(threads)] if threads else []))
    return load_json(cell / "decoder" / "metrics.json", "train_decoder.py")


def summarise(results: dict[str, dict[int, dict]], sets: dict[str, FeatureSet]) -> dict:
    """Mean and sample std over seeds of each test metric, per feature set."""
    summary = {}
    for name, by_seed in results.items():
        values = {m: np.array([by_seed[s]["test"][m] for s in sorted(by_seed)]) for m in METRICS}
        summary[name] = {"label": sets[name].label, "blocks": list(sets[name].blocks), "seeds": sorted(by_seed),
                         "n_test_users": next(iter(by_seed.values()))["n_test_users"],
                         "mean": {m: float(v.mean()) for m, v in values.items()},
                         "std": {m: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for m, v in values.items()},
                         "per_seed": {str(s): {m: by_seed[s]["test"][m] for m in METRICS} for s in sorted(by_seed)}}
    return summary


def markdown_table(summary: dict) -> str:
    """Feature set x metric, mean ± std over seeds (test split)."""
    seeds = {len(v["seeds"]) for v in summary.values()}
    lines = [f"TIGER test metrics by item-feature set, mean ± std over {'/'.join(map(str, sorted(seeds)))} seed(s); "
             "leave-one-out, full ranking, seen items excluded.", "",
             "| feature set | blocks | " + " | ".join(METRICS) + " |",
             "|---|---|" + "---:|" * len(METRICS)]
    for row in summary.values():
        cells = [f"{row['mean'][m]:.4f} ± {row['std'][m]:.4f}" for m in METRICS]
        lines.append(f"| {row['label']} | {', '.join(row['blocks'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_plot(summary: dict, path: Path) -> None:
    """Grouped bars (recall@10, ndcg@10) per feature set with ±std error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["label"] for row in summary.values()]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 2, 3.6))
    for offset, metric in ((-0.2, "recall@10"), (0.2, "ndcg@10")):
        ax.bar(x + offset, [r["mean"][metric] for r in summary.values()], 0.4,
               yerr=[r["std"][metric] for r in summary.values()], capsize=3, label=metric)
    ax.set_xticks(x, labels)
    ax.set_ylabel("test metric")
    ax.set_title("TIGER: does the poster block help?")
    ax.legend()
    save_figure(path, fig, dpi=120)


def run_ablation(run: Path, data: Path, poster_features: Path, set_names: list[str], seeds: list[int],
                 rqvae_config: str, decoder_config: str, out: Path | None = None, with_text: bool = False,
                 jobs: int = 1) -> dict:
    """Run every (set, seed) cell that is not finished yet, then write the table, JSON and plot.

    Cells run seed by seed (all sets of seed 0 first, so a stopped ablation has comparable rows),
    `jobs` at a time; with jobs > 1 each decoder gets one torch thread.
    """
    run, data = Path(run), Path(data)
    out = Path(out) if out else run / "ablation"
    sets = feature_sets(data, with_text)
    unknown = [s for s in set_names if s not in sets]
    if unknown:
        raise ValueError(f"unknown feature set(s) {unknown}; choose from {list(sets)}.")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}.")
    for name in set_names:  # once per set, before any cell reads it
        fuse_set(run, data, poster_features, out, sets[name], rqvae_config)
    cells = [(name, seed) for seed in seeds for name in set_names]
    pool = ThreadPoolExecutor(max_workers=jobs)
    futures = {pool.submit(run_cell, run, out, sets[name], seed, rqvae_config, decoder_config,
                           1 if jobs > 1 else None): (name, seed) for name, seed in cells}
    results = {name: {} for name in set_names}
    try:
        for future in as_completed(futures):
            name, seed = futures[future]
            results[name][seed] = future.result()
    except BaseException:  # a failed cell or Ctrl-C: start no queued cell, stop at the running ones
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    results = {name: dict(sorted(by_seed.items())) for name, by_seed in results.items()}
    summary = summarise(results, sets)
    save_json(out / "ablation.json", summary)
    save_text(out / "ablation.md", markdown_table(summary))
    bar_plot(summary, out / "ablation.png")
    return summary
