"""The poster ablation: feature sets x seeds, each through fusion -> RQ-VAE -> TIGER, summarised.

Every cell runs the pipeline's own scripts in a subprocess (so gin state never leaks between cells) and
each script skips work it already finished, so a killed ablation resumes where it stopped.

Layout under `<out>` (default `<run>/ablation/`):
    <set>/item_features/            fused features of that feature set (seed-independent)
    <set>/seed<k>/rqvae/            semantic ids for that seed
    <set>/seed<k>/decoder/          TIGER trained on them; metrics.json holds valid/test metrics
    <set>/seed<k>/cold/             on a run prepared with --cold: TIGER and Semantic-KNN (on the set's
                                    features) on the cold items (experiments/cold_start.py)
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

from experiments.artifacts import COLD_FILE, ArtifactError, load_json, save_figure, save_json, save_text

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
    """The ablation's sets; the tag genome joins the metadata blocks where the data has one, and the TMDB text
    block the text/all sets `with_text`. collab adds the collaborative block (modules/collab.py) to genres+year,
    all_collab to all."""
    meta = ("tags", "genome") if (Path(data_dir) / "genome-scores.csv").is_file() else ("tags",)
    text = ("text",) if with_text else ()
    # blocks in the pipeline's order (make pipeline: the preset's blocks, then text), so that with the ml_small
    # and demo presets `all` fuses exactly the pipeline's item matrix (the ml25m preset leaves the genome out)
    return {s.name: s for s in (
        FeatureSet("genres_year", "genres+year", ("genres", "year")),
        FeatureSet("text", "+ tags/text" if with_text else "+ tags", ("genres", "year") + meta + text),
        FeatureSet("poster", "+ poster", ("genres", "year", "poster")),
        FeatureSet("all", "all", ("genres", "year") + meta + ("poster",) + text),
        FeatureSet("collab", "+ collab", ("genres", "year", "collab")),
        FeatureSet("all_collab", "all + collab", ("genres", "year") + meta + ("poster",) + text + ("collab",)),
    )}


def run_script(cmd: list[str]) -> None:
    """Run one pipeline script from the repository root, logged; a failure raises CalledProcessError."""
    log.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=True, cwd=REPO)


def fuse_set(run: Path, data: Path, poster_features: Path, out: Path, fset: FeatureSet, rqvae_config: str,
             tmdb_details: Path | None = None) -> None:
    """The fused item features of one feature set (skipped when already written); tmdb_details overrides the
    gin file's ML25MItemData.tmdb_details for the text block."""
    run_script([sys.executable, "experiments/05_fuse_item_features.py", rqvae_config, "--run", str(run),
                "--data", str(data), "--posters-features", str(poster_features), "--blocks", ",".join(fset.blocks),
                "--out", str(out / fset.name / "item_features")]
               + (["--tmdb-details", str(tmdb_details)] if tmdb_details else []))


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
    result = load_json(cell / "decoder" / "metrics.json", "train_decoder.py")
    health = load_json(cell / "rqvae" / "health.json", "train_rqvae.py")
    result = {**result, "semantic_ids_health": {k: health[k] for k in ("unique_fraction", "max_collision_group")
                                                if k in health}}
    if (run / COLD_FILE).is_file():
        run_script([py, "experiments/11_cold_start.py", "--run", str(run), "--decoder", str(cell / "decoder"),
                    "--features", str(out / fset.name / "item_features"), "--models", "tiger,semantic_knn",
                    "--out", str(cell / "cold")] + (["--threads", str(threads)] if threads else []))
        result = {**result, "cold": load_json(cell / "cold" / "metrics.json", "experiments/11_cold_start.py")}
    return result


def _stat(values) -> dict:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0}


# columns beside the four test metrics, each read from a decoder's metrics.json where every seed reports it
EXTRA_COLUMNS = {"untied ndcg@10": ("test", "untied", "ndcg@10"), "test nll": ("test", "nll"),
                 "valid ndcg@10": ("valid", "ndcg@10"), "valid nll": ("valid", "nll"),
                 "unique IDs": ("semantic_ids_health", "unique_fraction")}


def _lookup(result: dict, keys: tuple[str, ...]):
    for key in keys:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def summarise(results: dict[str, dict[int, dict]], sets: dict[str, FeatureSet]) -> dict:
    """Mean and sample std over seeds of each test metric, per feature set, and of EXTRA_COLUMNS (untied
    targets, NLL, validation) where every seed's metrics.json has them."""
    summary = {}
    for name, by_seed in results.items():
        values = {m: np.array([by_seed[s]["test"][m] for s in sorted(by_seed)]) for m in METRICS}
        summary[name] = {"label": sets[name].label, "blocks": list(sets[name].blocks), "seeds": sorted(by_seed),
                         "n_test_users": next(iter(by_seed.values()))["n_test_users"],
                         "mean": {m: float(v.mean()) for m, v in values.items()},
                         "std": {m: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for m, v in values.items()},
                         "per_seed": {str(s): {m: by_seed[s]["test"][m] for m in METRICS} for s in sorted(by_seed)}}
        extra = {}
        for column, keys in EXTRA_COLUMNS.items():
            found = [_lookup(by_seed[s], keys) for s in sorted(by_seed)]
            if all(v is not None for v in found):
                extra[column] = _stat(found)
                for s, v in zip(sorted(by_seed), found):
                    summary[name]["per_seed"][str(s)][column] = v
        summary[name]["extra"] = extra
        if all("cold" in r for r in by_seed.values()):
            summary[name]["cold"] = cold_summary(by_seed)
    return summary


# (with, without): paired by seed, since seed s trains both cells' RQ-VAE and TIGER
CONTRASTS = (("poster", "genres_year"), ("all", "text"), ("text", "genres_year"), ("collab", "genres_year"),
             ("all_collab", "all"))


def contrasts(summary: dict) -> list[dict]:
    """Per-seed differences (test and validation ndcg@10) of each CONTRASTS pair present with seeds in common,
    with how many seeds the difference is positive on: an effect whose sign holds across seeds is one that
    every seed shows. The label names the blocks added and the set they are added to."""
    out = []
    for with_, without in CONTRASTS:
        if with_ not in summary or without not in summary:
            continue
        seeds = sorted(set(summary[with_]["per_seed"]) & set(summary[without]["per_seed"]), key=int)
        if not seeds:
            continue
        added = [b for b in summary[with_]["blocks"] if b not in summary[without]["blocks"]]
        row = {"with": with_, "without": without, "seeds": [int(s) for s in seeds],
               "label": f"+{'+'.join(added)} over {', '.join(summary[without]['blocks'])}"}
        for column in ("ndcg@10", "valid ndcg@10"):
            if not all(column in summary[n]["per_seed"][s] for n in (with_, without) for s in seeds):
                continue
            deltas = [summary[with_]["per_seed"][s][column] - summary[without]["per_seed"][s][column] for s in seeds]
            row[column] = {**_stat(deltas), "per_seed": deltas, "n_positive": sum(d > 0 for d in deltas)}
        out.append(row)
    return out


def reference_sasrec(run: Path, seeds: list[int]) -> dict[int, dict]:
    """SASRec's metrics.json of each seed the run has one for (make pipeline: seed 0, make seeds: the others),
    checked against the run's current interactions. Optional: a missing, stale or zero-ndcg result is left
    out with a warning (the ablation's own table does not depend on it)."""
    from experiments.seeds import SOURCES, seed_folder
    from experiments.baselines import check_result_is_current
    found = {}
    for seed in seeds:
        path = seed_folder(run, seed) / SOURCES["sasrec"]
        if not path.is_file():
            continue
        try:
            result = load_json(path, "experiments/07_train_baselines.py")
            check_result_is_current(result, path, run)
        except ArtifactError as err:
            log.warning("no SASRec reference for seed %d: %s", seed, err)
            continue
        if not result["test"]["ndcg@10"] > 0:
            log.warning("no SASRec reference for seed %d: %s has test ndcg@10 0", seed, path)
            continue
        found[seed] = result
    return found


def add_reference(summary: dict, sasrec: dict[int, dict]) -> None:
    """SASRec's row, and each set's test ndcg@10 as a fraction of SASRec's of the same seed where SASRec has
    every seed of the set."""
    if not sasrec:
        return
    for row in feature_rows(summary).values():
        if all(s in sasrec for s in row["seeds"]):
            row["extra"]["÷ SASRec ndcg@10"] = _stat([row["per_seed"][str(s)]["ndcg@10"] / sasrec[s]["test"]["ndcg@10"]
                                                      for s in row["seeds"]])
    seeds = sorted(sasrec)
    summary_sasrec = {"label": "SASRec-CE (reference)", "seeds": seeds,
                      "mean": {m: float(np.mean([sasrec[s]["test"][m] for s in seeds])) for m in METRICS},
                      "std": {m: _stat([sasrec[s]["test"][m] for s in seeds])["std"] for m in METRICS},
                      "extra": {c: _stat([_lookup(sasrec[s], k) for s in seeds]) for c, k in EXTRA_COLUMNS.items()
                                if all(_lookup(sasrec[s], k) is not None for s in seeds)}}
    summary["_reference"] = {"sasrec": summary_sasrec}


COLD_MODELS = ("tiger", "semantic_knn")


def cold_summary(by_seed: dict[int, dict]) -> dict:
    """Mean and std over seeds of the cold test metrics (epsilon rule) and of the validation sweep's cold
    recall@10, for TIGER and Semantic-KNN on the set's features."""
    first = next(iter(by_seed.values()))["cold"]
    out = {"epsilon": first["epsilon"], "n_cold_examples": first["n_cold_examples"], "models": {}}
    for model in COLD_MODELS:
        runs = [by_seed[s]["cold"] for s in sorted(by_seed)]
        cold = {m: np.array([r["models"][model][m] for r in runs]) for m in METRICS}
        warm = np.array([r["models"][model]["warm"]["recall@10"] for r in runs])
        cold_only = {m: np.array([r["models"][model]["cold_only"][m] for r in runs]) for m in ("recall@10", "ndcg@10")}
        if all("item_mean" in r["models"][model] for r in runs):
            cold_only["item_mean_recall@10"] = np.array([r["models"][model]["item_mean"]["cold_only"]["recall@10"]
                                                         for r in runs])
        epsilons = list(runs[0]["sweep"][model])
        sweep = {e: np.array([r["sweep"][model][e]["cold"]["recall@10"] for r in runs]) for e in epsilons}
        out["models"][model] = {
            "mean": {m: float(v.mean()) for m, v in cold.items()},
            "std": {m: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for m, v in cold.items()},
            "warm_recall@10": {"mean": float(warm.mean()), "std": float(warm.std(ddof=1)) if len(warm) > 1 else 0.0},
            "cold_only": {m: {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
                          for m, v in cold_only.items()},
            "valid_sweep_recall@10": {e: {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
                                      for e, v in sweep.items()}}
    return out


def cold_markdown_table(summary: dict) -> str:
    """Feature set x (TIGER, Semantic-KNN) cold test metrics, mean ± std over seeds."""
    rows = [r for r in feature_rows(summary).values() if "cold" in r]
    if not rows:
        return ""
    first = rows[0]["cold"]
    lines = [f"Cold-start test examples ({first['n_cold_examples']}), epsilon {first['epsilon']}; mean ± std over "
             "seeds. Semantic-KNN uses the same feature set (it has no seed: its spread is 0).", "",
             "| feature set | model | recall@10 | ndcg@10 | warm recall@10 | cold-only recall@10 | cold-only ndcg@10 | "
             "item-mean cold-only recall@10 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        for model, m in row["cold"]["models"].items():
            item_mean = m["cold_only"].get("item_mean_recall@10")
            lines.append(f"| {row['label']} | {model} | {m['mean']['recall@10']:.4f} ± {m['std']['recall@10']:.4f} | "
                         f"{m['mean']['ndcg@10']:.4f} ± {m['std']['ndcg@10']:.4f} | "
                         f"{m['warm_recall@10']['mean']:.4f} ± {m['warm_recall@10']['std']:.4f} | "
                         f"{m['cold_only']['recall@10']['mean']:.4f} ± {m['cold_only']['recall@10']['std']:.4f} | "
                         f"{m['cold_only']['ndcg@10']['mean']:.4f} ± {m['cold_only']['ndcg@10']['std']:.4f} | "
                         + (f"{item_mean['mean']:.4f} ± {item_mean['std']:.4f} |" if item_mean else "n/a |"))
    return "\n".join(lines) + "\n"


def cold_plot(summary: dict, path: Path) -> None:
    """Validation cold recall@10 against epsilon per feature set and model (mean ± std over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for row in feature_rows(summary).values():
        for model, style in zip(COLD_MODELS, ("-", "--")):
            sweep = row["cold"]["models"][model]["valid_sweep_recall@10"]
            eps = [float(e) for e in sweep]
            ax.errorbar(eps, [v["mean"] for v in sweep.values()], yerr=[v["std"] for v in sweep.values()],
                        linestyle=style, marker="o", capsize=2, label=f"{model}, {row['label']}")
    ax.set(xlabel="epsilon (share of the top-10 reserved for cold items)", ylabel="cold recall@10 (validation)",
           title="Cold start by feature set")
    ax.legend(fontsize=7)
    save_figure(path, fig, dpi=120)


def _cell(stat: dict, n: int = 2) -> str:
    """mean ± std, or the value alone when it comes from one seed."""
    return f"{stat['mean']:.4f}" if n == 1 else f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def feature_rows(summary: dict) -> dict:
    """The summary's feature-set rows (without the `_reference` and `_contrasts` entries)."""
    return {k: v for k, v in summary.items() if not k.startswith("_")}


def markdown_table(summary: dict) -> str:
    """Feature set x metric, mean ± std over seeds (test split; validation and NLL columns where reported),
    SASRec's reference row when the run has it, and the paired per-seed contrasts."""
    rows = feature_rows(summary)
    seeds = {len(v["seeds"]) for v in rows.values()}
    extras = [c for c in list(EXTRA_COLUMNS) + ["÷ SASRec ndcg@10"] if all(c in r.get("extra", {}) for r in rows.values())]
    columns = list(METRICS) + extras
    lines = [f"TIGER test metrics by item-feature set, mean ± std over {'/'.join(map(str, sorted(seeds)))} seed(s); "
             "leave-one-out, full ranking, seen items excluded.", "",
             "| feature set | blocks | " + " | ".join(columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for row in rows.values():
        cells = [_cell({"mean": row["mean"][m], "std": row["std"][m]}) for m in METRICS]
        cells += [_cell(row["extra"][c]) for c in extras]
        lines.append(f"| {row['label']} | {', '.join(row['blocks'])} | " + " | ".join(cells) + " |")
    reference = summary.get("_reference", {}).get("sasrec")
    if reference:
        n = len(reference["seeds"])
        cells = [_cell({"mean": reference["mean"][m], "std": reference["std"][m]}, n) for m in METRICS]
        cells += [_cell(reference["extra"][c], n) if c in reference["extra"] else "-" for c in extras]
        lines.append(f"| {reference['label']}, seeds {','.join(map(str, reference['seeds']))} | - | "
                     + " | ".join(cells) + " |")
    paired = contrasts(rows)
    if paired:
        lines += ["", "Paired differences (same seed): mean ± std over seeds, each seed's difference, and on how "
                  "many seeds it is positive:", "",
                  "| difference | test ndcg@10 | per seed | > 0 | valid ndcg@10 | per seed | > 0 |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row in paired:
            cells = []
            for column in ("ndcg@10", "valid ndcg@10"):
                stat = row.get(column)
                cells += ([f"{stat['mean']:+.4f} ± {stat['std']:.4f}", " / ".join(f"{d:+.4f}" for d in stat["per_seed"]),
                           f"{stat['n_positive']}/{len(row['seeds'])}"] if stat else ["-", "-", "-"])
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fusion_comparison(summaries: dict[str, dict], set_name: str) -> dict:
    """One feature set under several fusions ({fusion: ablation.json summary}): per fusion the test and
    validation ndcg@10 over seeds, and the adaptive fusion (any but 'concat') chosen by the higher mean
    validation ndcg@10, as the protocol chooses; the test split plays no part in the choice."""
    rows = {}
    for fusion, summary in summaries.items():
        if set_name not in summary:
            raise ValueError(f"feature set {set_name!r} is not in the {fusion} ablation (it has {list(feature_rows(summary))}).")
        row = summary[set_name]
        rows[fusion] = {"seeds": row["seeds"], "test ndcg@10": {"mean": row["mean"]["ndcg@10"], "std": row["std"]["ndcg@10"]},
                        **{c: row["extra"][c] for c in ("untied ndcg@10", "valid ndcg@10", "÷ SASRec ndcg@10")
                           if c in row.get("extra", {})}}
    adaptive = [f for f in rows if f != "concat" and "valid ndcg@10" in rows[f]]
    chosen = max(adaptive, key=lambda f: rows[f]["valid ndcg@10"]["mean"]) if adaptive else None
    return {"set": set_name, "fusions": rows, "chosen_adaptive": chosen}


def fusion_markdown(comparison: dict) -> str:
    columns = ["test ndcg@10", "untied ndcg@10", "valid ndcg@10", "÷ SASRec ndcg@10"]
    rows = comparison["fusions"]
    columns = [c for c in columns if all(c in r for r in rows.values())]
    lines = [f"Feature set `{comparison['set']}` under each fusion, mean ± std over seeds; the adaptive fusion "
             f"chosen on validation ndcg@10: **{comparison['chosen_adaptive']}**.", "",
             "| fusion | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for fusion, row in rows.items():
        lines.append(f"| {fusion} | {','.join(map(str, row['seeds']))} | "
                     + " | ".join(_cell(row[c], len(row["seeds"])) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def bar_plot(summary: dict, path: Path) -> None:
    """Grouped bars (recall@10, ndcg@10) per feature set with ±std error bars, and SASRec's means as dashed
    lines when the summary has its reference."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = summary.get("_reference", {}).get("sasrec")
    summary = feature_rows(summary)
    labels = [row["label"] for row in summary.values()]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 2, 3.6))
    for offset, metric in ((-0.2, "recall@10"), (0.2, "ndcg@10")):
        bars = ax.bar(x + offset, [r["mean"][metric] for r in summary.values()], 0.4,
                      yerr=[r["std"][metric] for r in summary.values()], capsize=3, label=metric)
        if reference:
            ax.axhline(reference["mean"][metric], color=bars.patches[0].get_facecolor(), linestyle="--", linewidth=1,
                       label=f"SASRec {metric}")
    ax.set_xticks(x, labels)
    ax.set_ylabel("test metric")
    ax.set_title("TIGER: does the poster block help?")
    ax.legend(fontsize=8)
    save_figure(path, fig, dpi=120)


def run_ablation(run: Path, data: Path, poster_features: Path, set_names: list[str], seeds: list[int],
                 rqvae_config: str, decoder_config: str, out: Path | None = None, with_text: bool = False,
                 jobs: int = 1, tmdb_details: Path | None = None) -> dict:
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
    sasrec = reference_sasrec(run, seeds)  # before the cells: a warning about it comes first, not after hours
    for name in set_names:  # once per set, before any cell reads it
        fuse_set(run, data, poster_features, out, sets[name], rqvae_config, tmdb_details)
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
    add_reference(summary, sasrec)
    summary["_contrasts"] = contrasts(feature_rows(summary))
    save_json(out / "ablation.json", summary)
    save_text(out / "ablation.md", markdown_table(summary) + ("\n" + cold_markdown_table(summary)
                                                               if any("cold" in r for r in feature_rows(summary).values())
                                                               else ""))
    bar_plot(summary, out / "ablation.png")
    if all("cold" in r for r in feature_rows(summary).values()):
        cold_plot(summary, out / "ablation_cold.png")
    return summary
