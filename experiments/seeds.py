"""Headline numbers over seeds: every model of a run trained with seeds 0..k, summarised as mean ± std.

Seed 0 is the pipeline's own run (`make pipeline`): RUN/rqvae, RUN/decoder, RUN/decoder_random_ids,
RUN/baselines. Seed s > 0 lives in RUN/seed<s>/ with the same layout, made from the same prepared data
and fused features: the RQ-VAE (`train_rqvae.seed`), both TIGERs (`train_decoder.seed`; random IDs are
drawn from it too) and SASRec (`train_sasrec.seed`) all take seed s, so the spread covers the semantic
IDs as well as the decoder. Most popular has no seed (one value). Each step is the pipeline's own script
in a subprocess and skips what it already finished, so a killed run resumes.

Outputs: RUN/seeds.json and RUN/seeds.md (test metrics, all targets and untied targets; validation ndcg@10
and target NLL; TIGER's ndcg@10 as a fraction of SASRec's).
"""
from __future__ import annotations

import logging
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from experiments.ablation import run_script
from experiments.artifacts import COLD_FILE, ArtifactError, load_json, save_json, save_text
from experiments.baselines import METRIC_NAMES, check_result_is_current

log = logging.getLogger(__name__)

# model name -> metrics.json inside a seed folder
SOURCES = {"tiger": "decoder/metrics.json", "tiger_random_ids": "decoder_random_ids/metrics.json",
           "sasrec": "baselines/sasrec/metrics.json", "popularity": "baselines/popularity/metrics.json"}


def seed_folder(run: Path, seed: int) -> Path:
    """Where seed `seed` of the run keeps its models: the run itself for 0, RUN/seed<s> otherwise."""
    return Path(run) if seed == 0 else Path(run) / f"seed{seed}"


def train_seeds(run: Path, seeds: list[int], rqvae_config: str, decoder_config: str, sasrec_config: str,
                jobs: int = 1, threads: int | None = None) -> None:
    """Train the RQ-VAE, TIGER, random-ID TIGER and SASRec of every seed s > 0 (seed 0 is `make pipeline`'s).

    The RQ-VAEs run first, one at a time (about a minute each on ml-latest-small); then the models, `jobs`
    at a time, each with `threads` torch threads. The first failure stops the queue.
    """
    py, run = sys.executable, Path(run)
    thread_flag = ["--threads", str(threads)] if threads else []
    tasks = []
    for seed in (s for s in seeds if s != 0):
        folder = seed_folder(run, seed)
        run_script([py, "train_rqvae.py", rqvae_config, "--run", str(run), "--features", str(run / "item_features"),
              "--out", str(folder / "rqvae"), "--gin_param", f"train_rqvae.seed = {seed}"])
        decoder = [py, "train_decoder.py", decoder_config, "--run", str(run), "--semantic-ids", str(folder / "rqvae"),
                   "--gin_param", f"train_decoder.seed = {seed}"] + thread_flag
        tasks += [decoder + ["--out", str(folder / "decoder")],
                  decoder + ["--out", str(folder / "decoder_random_ids"), "--random-ids"],
                  [py, "experiments/07_train_baselines.py", "--run", str(run), "--models", "sasrec",
                   "--sasrec-config", sasrec_config, "--out", str(folder / "baselines"),
                   "--gin_param", f"train_sasrec.seed = {seed}"] + thread_flag]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(run_script, task) for task in tasks]
        for future in futures:
            try:
                future.result()
            except subprocess.CalledProcessError:
                for pending in futures:
                    pending.cancel()
                raise


def collect(run: Path, seeds: list[int], extra: dict[str, str] | None = None) -> dict[str, dict[int, dict]]:
    """{model: {seed: metrics.json}} of every model and seed found; popularity from seed 0 only.

    extra: more decoders to collect, {name: folder inside each seed folder} (e.g. {"tiger_long":
    "decoder_long"} for the long preset trained beside the pipeline's).

    Checks that every result has the same test users, was trained on the run's current interactions, and
    (TIGER) on the semantic IDs its seed folder holds now (`check_result_is_current`).
    """
    run = Path(run)
    results: dict[str, dict[int, dict]] = {}
    n_users = None
    sources = SOURCES | {name: f"{folder}/metrics.json" for name, folder in (extra or {}).items()}
    for seed in seeds:
        for model, relative in sources.items():
            if model == "popularity" and seed != 0:
                continue
            path = seed_folder(run, seed) / relative
            if not path.is_file():
                raise ArtifactError(f"{path} is missing: " + ("run make pipeline first (seed 0 is its run)."
                                    if seed == 0 else f"train seed {seed} first (make seeds, or "
                                    "experiments/10_seeds.py --train)."))
            result = load_json(path, "experiments/10_seeds.py")
            if n_users is not None and result["n_test_users"] != n_users:
                raise ArtifactError(f"{path} has {result['n_test_users']} test users, other seeds {n_users}: "
                                    "they come from different runs.")
            n_users = result["n_test_users"]
            check_result_is_current(result, path, run, seed_folder(run, seed) / "rqvae")
            results.setdefault(model, {})[seed] = result
    return results


def _mean_std(values: list[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "values": [float(v) for v in array]}


def summarise(results: dict[str, dict[int, dict]]) -> dict:
    """Mean and sample std (ddof=1) over seeds of each model's test metrics (all and untied targets), validation
    ndcg@10, and the NLL of the test target where the model reports it."""
    summary = {"models": {}}
    for model, by_seed in results.items():
        seeds = sorted(by_seed)
        row = {"seeds": seeds, "n_test_users": by_seed[seeds[0]]["n_test_users"],
               "n_untied_users": by_seed[seeds[0]]["test"]["untied"]["n_users"]}
        for name in METRIC_NAMES:
            row[name] = _mean_std([by_seed[s]["test"][name] for s in seeds])
            row[f"untied {name}"] = _mean_std([by_seed[s]["test"]["untied"][name] for s in seeds])
        row["valid ndcg@10"] = _mean_std([by_seed[s]["valid"]["ndcg@10"] for s in seeds])
        if all("nll" in by_seed[s]["test"] for s in seeds):
            row["test nll"] = _mean_std([by_seed[s]["test"]["nll"] for s in seeds])
        summary["models"][model] = row
    for model in (m for m in results if m.startswith("tiger") and "random" not in m):
        if "sasrec" in results:
            common = sorted(set(results[model]) & set(results["sasrec"]))
            summary[f"{model}_over_sasrec_ndcg@10"] = _mean_std(
                [results[model][s]["test"]["ndcg@10"] / results["sasrec"][s]["test"]["ndcg@10"] for s in common])
    return summary


def markdown(summary: dict, run: Path) -> str:
    """RUN/seeds.md: model x metric, mean ± std over seeds."""
    def cell(stat: dict | None) -> str:
        if stat is None:
            return "-"
        return f"{stat['mean']:.4f}" if len(stat["values"]) == 1 else f"{stat['mean']:.4f} ± {stat['std']:.4f}"

    columns = ["recall@10", "ndcg@10", "untied recall@10", "untied ndcg@10", "valid ndcg@10", "test nll"]
    models = summary["models"]
    first = next(iter(models.values()))
    counts = ", ".join(f"{model}: {len(row['seeds'])}" for model, row in models.items())
    lines = [f"# {run}: test metrics over seeds", "",
             f"Leave-one-out, full ranking, seen items excluded; {first['n_test_users']} test users, "
             f"{first['n_untied_users']} with an untied target. Mean ± sample std over seeds "
             f"({counts}); seed s trains the RQ-VAE, "
             "both TIGERs and SASRec with seed s (experiments/seeds.py).", "",
             "| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for model, row in models.items():
        lines.append(f"| {model} | " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    lines.append("")
    for key, ratio in summary.items():
        if key.endswith("_over_sasrec_ndcg@10"):
            model = key.split("_over_")[0]
            lines.append(f"- {model} test ndcg@10 as a fraction of SASRec's (same seed): {cell(ratio)}")
    return "\n".join(lines) + "\n"


def cold_seeds(run: Path, seeds: list[int], threads: int | None = None) -> dict[int, dict]:
    """On a run prepared with --cold: the cold-start evaluation of every seed's models (seed s's TIGERs and
    SASRec, Semantic-KNN on the run's features, most popular, random) into <seed folder>/cold; {seed: report}."""
    py, reports = sys.executable, {}
    for seed in seeds:
        folder = seed_folder(run, seed)
        run_script([py, "experiments/11_cold_start.py", "--run", str(run), "--decoder", str(folder / "decoder"),
                    "--random-decoder", str(folder / "decoder_random_ids"),
                    "--sasrec", str(folder / "baselines" / "sasrec" / "best.pt"), "--out", str(folder / "cold"),
                    "--seed", str(seed)]
                   + (["--threads", str(threads)] if threads else []))
        reports[seed] = load_json(folder / "cold" / "metrics.json", "experiments/11_cold_start.py")
    return reports


COLD_COLUMNS = ("recall@10", "ndcg@10", "untied recall@10", "warm recall@10", "cold-only recall@10",
                "cold-only ndcg@10", "item-mean cold-only recall@10", "natural cold recall@10")


def summarise_cold(reports: dict[int, dict]) -> dict:
    """Mean ± std over seeds of each model's cold test metrics (epsilon rule), warm recall@10 under the same
    rule, the cold ranking alone (cold-only) and cold recall@10 without the rule (natural)."""
    first = next(iter(reports.values()))
    models = {}
    for model in first["models"]:
        runs = [reports[s]["models"][model] for s in sorted(reports)]
        models[model] = {"recall@10": _mean_std([r["recall@10"] for r in runs]),
                         "ndcg@10": _mean_std([r["ndcg@10"] for r in runs]),
                         "untied recall@10": _mean_std([r["untied"]["recall@10"] for r in runs])
                         if all(r.get("untied") for r in runs) else None,
                         "warm recall@10": _mean_std([r["warm"]["recall@10"] for r in runs]),
                         "cold-only recall@10": _mean_std([r["cold_only"]["recall@10"] for r in runs]),
                         "cold-only ndcg@10": _mean_std([r["cold_only"]["ndcg@10"] for r in runs]),
                         "item-mean cold-only recall@10": _mean_std([r["item_mean"]["cold_only"]["recall@10"]
                                                                     for r in runs])
                         if all(r.get("item_mean") for r in runs) else None,
                         "natural cold recall@10": _mean_std([r["natural"]["cold"]["recall@10"] for r in runs])}
    return {"epsilon": first["epsilon"], "n_cold_items": first["n_cold_items"],
            "n_cold_examples": first["n_cold_examples"], "n_untied_cold_examples": first.get("n_untied_cold_examples"),
            "seeds": sorted(reports), "models": models}


def cold_markdown(cold: dict) -> str:
    lines = ["", f"## Cold start over seeds ({cold['n_cold_items']} cold items, {cold['n_cold_examples']} cold test "
             f"examples, epsilon {cold['epsilon']}; seeds {cold['seeds']})", "",
             "| model | " + " | ".join(COLD_COLUMNS) + " |", "|---|" + "---:|" * len(COLD_COLUMNS)]
    for model, row in cold["models"].items():
        lines.append(f"| {model} | " + " | ".join("n/a" if row[c] is None else f"{row[c]['mean']:.4f} ± {row[c]['std']:.4f}"
                                                  for c in COLD_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def summarise_run(run: Path, seeds: list[int], extra: dict[str, str] | None = None,
                  threads: int | None = None) -> dict:
    """Collect, summarise and write RUN/seeds.json and RUN/seeds.md (with the cold-start table on a run prepared
    with --cold); returns the summary."""
    summary = summarise(collect(run, seeds, extra))
    summary["seeds"] = list(seeds)
    text = markdown(summary, Path(run))
    if (Path(run) / COLD_FILE).is_file():
        summary["cold"] = summarise_cold(cold_seeds(Path(run), seeds, threads))
        text += cold_markdown(summary["cold"])
    save_json(Path(run) / "seeds.json", summary)
    save_text(Path(run) / "seeds.md", text)
    return summary
