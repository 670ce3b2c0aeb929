"""Compare two run folders step by step: where do two runs of the same pipeline start to differ, and by how much?

    python -m experiments.compare_runs RUN_A RUN_B [--json report.json]

For every step whose outputs exist in both folders (a step missing on either side is reported and skipped;
nothing stops the comparison), in pipeline order:

| step                  | files compared                                         | reported                                 |
|-----------------------|--------------------------------------------------------|------------------------------------------|
| 2 prepare             | item_ids.npy, interactions.npz, stats.json             | identical or which arrays / fields differ |
| 4 poster_features     | poster_features/{features,has_poster,movie_ids}.npy    | identical, max abs / max relative / relative L2 difference, rows that differ |
| 5 item_features       | item_features/{features,movie_ids}.npy                 | the same                                  |
| 6 rqvae               | rqvae/{semantic_ids,movie_ids}.npy                     | items whose 3-code ID / full ID / each level differs, unique fraction of both, adjusted Rand index of the level-1 codes (label-free) |
| 7 decoder, decoder_random_ids | <folder>/metrics.json                          | valid/test recall, ndcg, nll of both and their difference |
| 7b baselines          | baselines/metrics.json                                 | the same per baseline model               |

Per-item arrays are compared only when both runs hold the same movie_ids.npy (the row contract of
docs/pipeline.md); otherwise the step says so. NaN rows (items without a poster) count as equal when both
runs have NaN there. Exit code 0 when every step present in both runs is bit-identical, 1 otherwise, 2 when a
run folder does not exist. See docs/results/reproducibility.md for what to expect between machines.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# Entries of stats.json that describe the machine or the path, not the data.
STATS_IGNORED = ("seconds",)
STATS_IGNORED_NESTED = (("source", "data_dir"),)
METRIC_KEYS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "nll")
DECODER_FOLDERS = ("decoder", "decoder_random_ids")


@dataclass
class StepReport:
    """The comparison of one pipeline step.

    status: 'identical', 'different', 'missing' (the step's files are absent from one run or both),
        or 'incomparable' (present in both, but rows or shapes do not correspond).
    lines: human-readable details, printed under the step's name.
    numbers: the same facts as numbers (for --json and for tests).
    """

    step: str
    status: str
    lines: list[str] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Pure comparisons (arrays and dicts in, numbers out)
# ----------------------------------------------------------------------------------------------------

def array_difference(a: np.ndarray, b: np.ndarray, rows_per_block: int = 4096) -> dict:
    """How far two float arrays of one shape are apart; NaN where both are NaN counts as equal.

    Returns identical (same dtype and the same bytes), nan_mismatch (positions NaN in one only), max_abs,
    max_rel (|a-b| / |a| over elements with |a| >= 1e-3 * max|a|, so that values near 0 do not dominate),
    rel_l2 (||a-b|| / ||a|| over elements finite in both), frac_elements (share of elements that differ) and
    rows_differ (rows, i.e. items, with any difference). Works through `rows_per_block` rows at a time, so a
    memory-mapped ML-25M feature file is never copied whole into float64.
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} against {b.shape}")
    blocks = [slice(start, start + rows_per_block) for start in range(0, max(len(a), 1), rows_per_block)]
    scale = max((float(np.nanmax(np.abs(a[s]), initial=0.0)) for s in blocks if a[s].size), default=0.0)
    totals = dict(identical=a.dtype == b.dtype, nan_mismatch=0, max_abs=0.0, max_rel=0.0, squared_diff=0.0,
                  squared_norm=0.0, differing=0, rows_differ=0)
    for s in blocks:
        block_a, block_b = np.asarray(a[s]), np.asarray(b[s])
        totals["identical"] = totals["identical"] and block_a.tobytes() == block_b.tobytes()
        nan_a, nan_b = np.isnan(block_a), np.isnan(block_b)
        both = ~(nan_a | nan_b)
        diff = np.zeros(block_a.shape, dtype=np.float64)
        diff[both] = np.abs(block_a[both].astype(np.float64) - block_b[both].astype(np.float64))
        magnitude = np.where(both, np.abs(block_a.astype(np.float64)), 0.0)
        big = both & (magnitude >= 1e-3 * scale) & (magnitude > 0)
        differs = (diff > 0) | (nan_a != nan_b)
        totals["nan_mismatch"] += int((nan_a != nan_b).sum())
        totals["max_abs"] = max(totals["max_abs"], float(diff.max(initial=0.0)))
        totals["max_rel"] = max(totals["max_rel"], float((diff[big] / magnitude[big]).max(initial=0.0)))
        totals["squared_diff"] += float((diff ** 2).sum())
        totals["squared_norm"] += float((magnitude ** 2).sum())
        totals["differing"] += int(differs.sum())
        totals["rows_differ"] += int(differs.reshape(len(block_a), -1).any(1).sum()) if block_a.ndim >= 2 \
            else int(differs.sum())
    norm = np.sqrt(totals["squared_norm"])
    return {"identical": bool(totals["identical"]), "nan_mismatch": totals["nan_mismatch"],
            "max_abs": totals["max_abs"], "max_rel": totals["max_rel"],
            "rel_l2": float(np.sqrt(totals["squared_diff"]) / norm) if norm > 0 else float(totals["squared_diff"] > 0),
            "frac_elements": totals["differing"] / a.size if a.size else 0.0, "rows_differ": totals["rows_differ"]}


def adjusted_rand_index(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (N,): 1 = the same partition whatever the label names, ~0 = unrelated.

    Two RQ-VAEs can put the same items together under other code numbers; this sees through the renaming.
    """
    _, a = np.unique(labels_a, return_inverse=True)
    _, b = np.unique(labels_b, return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1), dtype=np.float64)
    np.add.at(table, (a.ravel(), b.ravel()), 1.0)

    def pairs(counts: np.ndarray) -> float:
        return float((counts * (counts - 1) / 2).sum())

    together, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), pairs(np.array([len(a)]))
    expected = rows * cols / total if total else 0.0
    best = (rows + cols) / 2
    return 1.0 if best == expected else (together - expected) / (best - expected)


def unique_fraction(codes: np.ndarray) -> float:
    """Fraction of items whose code tuple (row of codes (N, L)) no other item has (as in rqvae/health.json)."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return float((counts[inverse.ravel()] == 1).mean()) if len(codes) else 0.0


def semantic_id_difference(ids_a: np.ndarray, ids_b: np.ndarray) -> dict:
    """How two (N, L+1) semantic-ID arrays of the same items differ (the last column is TIGER's collision column).

    Returns identical, frac_items_codes (items whose L-code tuple differs), frac_items_ids (whose full ID
    differs), frac_level (per code level), unique_a / unique_b (unique fraction of the L-code tuples) and
    ari_level1 / ari_codes (adjusted Rand index of the level-1 codes and of the L-code tuples).
    """
    ids_a, ids_b = np.asarray(ids_a), np.asarray(ids_b)
    if ids_a.shape != ids_b.shape or ids_a.ndim != 2:
        raise ValueError(f"semantic IDs must be two (N, L+1) arrays of one shape, got {ids_a.shape} and {ids_b.shape}")
    codes_a, codes_b = ids_a[:, :-1], ids_b[:, :-1]
    _, tuple_a = np.unique(codes_a, axis=0, return_inverse=True)
    _, tuple_b = np.unique(codes_b, axis=0, return_inverse=True)
    return {
        "identical": bool(np.array_equal(ids_a, ids_b)),
        "frac_items_codes": float((codes_a != codes_b).any(1).mean()),
        "frac_items_ids": float((ids_a != ids_b).any(1).mean()),
        "frac_level": [float(x) for x in (codes_a != codes_b).mean(0)],
        "unique_a": unique_fraction(codes_a),
        "unique_b": unique_fraction(codes_b),
        "ari_level1": adjusted_rand_index(codes_a[:, 0], codes_b[:, 0]),
        "ari_codes": adjusted_rand_index(tuple_a.ravel(), tuple_b.ravel()),
    }


def metric_differences(metrics_a: dict, metrics_b: dict, keys=METRIC_KEYS) -> dict[str, tuple[float, float, float]]:
    """{'test/ndcg@10': (a, b, b - a), ...} for each split ('valid', 'test') and metric present in both."""
    out = {}
    for split in ("valid", "test"):
        for key in keys:
            a, b = metrics_a.get(split, {}).get(key), metrics_b.get(split, {}).get(key)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)):
                out[f"{split}/{key}"] = (float(a), float(b), float(b) - float(a))
    return out


def dict_differences(a: dict, b: dict, prefix: str = "", ignored=()) -> list[str]:
    """Dotted keys whose values differ between two JSON-like dicts (recursively), `ignored` keys left out."""
    out = []
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}{key}"
        if name in ignored:
            continue
        if key not in a or key not in b:
            out.append(f"{name} (only in {'A' if key in a else 'B'})")
        elif isinstance(a[key], dict) and isinstance(b[key], dict):
            out += dict_differences(a[key], b[key], f"{name}.", ignored)
        elif a[key] != b[key]:
            out.append(name)
    return out


# ----------------------------------------------------------------------------------------------------
# Steps: read the files of one step from both runs and compare them
# ----------------------------------------------------------------------------------------------------

def _missing(step: str, run_a: Path, run_b: Path, files: list[str], producer: str) -> StepReport | None:
    """A 'missing' report naming each absent file and the script that writes it, or None when all exist."""
    absent = [f"{name} is missing in {label} ({run / name})" for label, run in (("A", run_a), ("B", run_b))
              for name in files if not (run / name).is_file()]
    if not absent:
        return None
    return StepReport(step, "missing", absent + [f"written by {producer}; step skipped"])


def _format_array(d: dict, n_rows: int) -> str:
    if d["identical"]:
        return "bit-identical"
    text = (f"max abs {d['max_abs']:.3g}, max rel {d['max_rel']:.3g}, rel L2 {d['rel_l2']:.3g}, "
            f"{d['frac_elements']:.1%} of elements and {d['rows_differ']} of {n_rows} rows differ")
    return text + (f", NaN in one run only at {d['nan_mismatch']} elements" if d["nan_mismatch"] else "")


def compare_prepare(run_a: Path, run_b: Path) -> StepReport:
    """Step 2: item_ids.npy, each array of interactions.npz, stats.json (timing and data path left out)."""
    files = ["item_ids.npy", "interactions.npz", "stats.json"]
    missing = _missing("prepare", run_a, run_b, files, "experiments/02_prepare_interactions.py")
    if missing:
        return missing
    lines, numbers = [], {}
    ids_same = np.array_equal(np.load(run_a / "item_ids.npy"), np.load(run_b / "item_ids.npy"))
    numbers["item_ids_identical"] = ids_same
    lines.append("item_ids.npy " + ("bit-identical" if ids_same else "DIFFERS"))
    with np.load(run_a / "interactions.npz") as za, np.load(run_b / "interactions.npz") as zb:
        names = sorted(set(za.files) | set(zb.files))
        differing = [n for n in names if n not in za.files or n not in zb.files
                     or za[n].shape != zb[n].shape or not np.array_equal(za[n], zb[n])]
    numbers["interactions_differing"] = differing
    lines.append("interactions.npz " + ("bit-identical" if not differing else f"differs in {', '.join(differing)}"))
    stats_a, stats_b = (json.loads((run / "stats.json").read_text()) for run in (run_a, run_b))
    ignored = set(STATS_IGNORED) | {".".join(k) for k in STATS_IGNORED_NESTED}
    stats_diff = dict_differences(stats_a, stats_b, ignored=ignored)
    numbers["stats_differing"] = stats_diff
    lines.append("stats.json " + ("equal (timing and data path not compared)" if not stats_diff
                                  else f"differs in {', '.join(stats_diff)}"))
    same = ids_same and not differing and not stats_diff
    return StepReport("prepare", "identical" if same else "different", lines, numbers)


def compare_per_item_array(step: str, run_a: Path, run_b: Path, folder: str, producer: str,
                           extra: tuple[str, ...] = ()) -> StepReport:
    """Steps 4 and 5: folder/features.npy (float, rows aligned by folder/movie_ids.npy) and `extra` arrays."""
    files = [f"{folder}/features.npy", f"{folder}/movie_ids.npy", *(f"{folder}/{name}" for name in extra)]
    missing = _missing(step, run_a, run_b, files, producer)
    if missing:
        return missing
    if not np.array_equal(np.load(run_a / folder / "movie_ids.npy"), np.load(run_b / folder / "movie_ids.npy")):
        return StepReport(step, "incomparable", [f"{folder}/movie_ids.npy differs: the rows are other items"])
    a = np.load(run_a / folder / "features.npy", mmap_mode="r")
    b = np.load(run_b / folder / "features.npy", mmap_mode="r")
    if a.shape != b.shape:
        return StepReport(step, "incomparable", [f"{folder}/features.npy is {a.shape} in A, {b.shape} in B"])
    diff = array_difference(a, b)
    lines, numbers = [f"{folder}/features.npy {a.shape}: {_format_array(diff, len(a))}"], {"features": diff}
    same = diff["identical"]
    for name in extra:
        equal = np.array_equal(np.load(run_a / folder / name), np.load(run_b / folder / name))
        numbers[name] = equal
        lines.append(f"{folder}/{name} " + ("bit-identical" if equal else "DIFFERS"))
        same = same and equal
    return StepReport(step, "identical" if same else "different", lines, numbers)


def compare_semantic_ids(run_a: Path, run_b: Path) -> StepReport:
    """Step 6: rqvae/semantic_ids.npy, rows aligned by rqvae/movie_ids.npy."""
    files = ["rqvae/semantic_ids.npy", "rqvae/movie_ids.npy"]
    missing = _missing("rqvae", run_a, run_b, files, "train_rqvae.py")
    if missing:
        return missing
    if not np.array_equal(np.load(run_a / "rqvae/movie_ids.npy"), np.load(run_b / "rqvae/movie_ids.npy")):
        return StepReport("rqvae", "incomparable", ["rqvae/movie_ids.npy differs: the rows are other items"])
    ids_a, ids_b = np.load(run_a / "rqvae/semantic_ids.npy"), np.load(run_b / "rqvae/semantic_ids.npy")
    if ids_a.shape != ids_b.shape:
        return StepReport("rqvae", "incomparable", [f"semantic_ids.npy is {ids_a.shape} in A, {ids_b.shape} in B"])
    d = semantic_id_difference(ids_a, ids_b)
    if d["identical"]:
        lines = [f"semantic_ids.npy {ids_a.shape}: bit-identical (unique 3-code fraction {d['unique_a']:.4f})"]
    else:
        levels = ", ".join(f"{x:.1%}" for x in d["frac_level"])
        lines = [f"semantic_ids.npy {ids_a.shape}: {d['frac_items_codes']:.2%} of items have another code tuple, "
                 f"{d['frac_items_ids']:.2%} another full ID (per level: {levels})",
                 f"unique code-tuple fraction {d['unique_a']:.4f} (A) vs {d['unique_b']:.4f} (B); adjusted Rand "
                 f"index of the level-1 codes {d['ari_level1']:.3f}, of the code tuples {d['ari_codes']:.3f} "
                 f"(1 = same grouping under other code numbers)"]
    return StepReport("rqvae", "identical" if d["identical"] else "different", lines, d)


def _metric_lines(differences: dict) -> list[str]:
    return [f"{name:16s} {a:.4f} vs {b:.4f} ({delta:+.4f})" for name, (a, b, delta) in differences.items()]


def compare_metrics_file(step: str, run_a: Path, run_b: Path, path: str, producer: str) -> StepReport:
    """Step 7: one decoder folder's metrics.json (valid/test recall, ndcg, nll)."""
    missing = _missing(step, run_a, run_b, [path], producer)
    if missing:
        return missing
    a, b = (json.loads((run / path).read_text()) for run in (run_a, run_b))
    differences = metric_differences(a, b)
    same = all(delta == 0 for _, _, delta in differences.values())
    lines = [f"{path}: every metric equal" if same else f"{path}:"] + ([] if same else _metric_lines(differences))
    return StepReport(step, "identical" if same else "different", lines, {"metrics": differences})


def compare_baselines(run_a: Path, run_b: Path) -> StepReport:
    """Step 7b: baselines/metrics.json, per model (most-popular, SASRec)."""
    path = "baselines/metrics.json"
    missing = _missing("baselines", run_a, run_b, [path], "experiments/07_train_baselines.py")
    if missing:
        return missing
    a, b = (json.loads((run / path).read_text()).get("models", {}) for run in (run_a, run_b))
    lines, numbers, same = [], {}, True
    for model in sorted(set(a) | set(b)):
        if model not in a or model not in b:
            lines.append(f"{model}: only in {'A' if model in a else 'B'}")
            same = False
            continue
        differences = metric_differences(a[model], b[model])
        numbers[model] = differences
        model_same = all(delta == 0 for _, _, delta in differences.values())
        same = same and model_same
        lines += [f"{model}: every metric equal"] if model_same else [f"{model}:"] + \
            ["  " + line for line in _metric_lines(differences)]
    return StepReport("baselines", "identical" if same else "different", lines, numbers)


def compare_runs(run_a: str | Path, run_b: str | Path) -> list[StepReport]:
    """Every step of two run folders, in pipeline order; a step missing in one run is reported, never fatal."""
    run_a, run_b = Path(run_a), Path(run_b)
    for run in (run_a, run_b):
        if not run.is_dir():
            raise FileNotFoundError(f"run folder {run} does not exist: pass two folders written by `make pipeline` "
                                    f"(or by the numbered scripts), e.g. runs/ml_small.")
    reports = [compare_prepare(run_a, run_b),
               compare_per_item_array("poster_features", run_a, run_b, "poster_features",
                                      "experiments/04_extract_poster_features.py", extra=("has_poster.npy",)),
               compare_per_item_array("item_features", run_a, run_b, "item_features",
                                      "experiments/05_fuse_item_features.py"),
               compare_semantic_ids(run_a, run_b)]
    for folder in DECODER_FOLDERS:
        reports.append(compare_metrics_file(folder, run_a, run_b, f"{folder}/metrics.json",
                                            "train_decoder.py" + (" --random-ids" if "random" in folder else "")))
    reports.append(compare_baselines(run_a, run_b))
    return reports


def format_report(reports: list[StepReport], run_a: Path | str, run_b: Path | str) -> str:
    """The printed report: one block per step, then a one-line summary."""
    out = [f"A = {run_a}", f"B = {run_b}", ""]
    for report in reports:
        out.append(f"[{report.status:>12s}] {report.step}")
        out += [f"               {line}" for line in report.lines]
    compared = [r for r in reports if r.status not in ("missing",)]
    first = next((r.step for r in compared if r.status != "identical"), None)
    out += ["", f"{sum(r.status == 'identical' for r in compared)} of {len(compared)} steps present in both runs are "
                f"identical" + (f"; the first that differs is '{first}'." if first else ".")]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Print the comparison of two run folders; exit 0 when all shared steps are identical, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", help="first run folder")
    parser.add_argument("run_b", help="second run folder")
    parser.add_argument("--json", help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    try:
        reports = compare_runs(args.run_a, args.run_b)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(reports, args.run_a, args.run_b))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in reports], indent=2, default=float) + "\n")
    shared = [r for r in reports if r.status != "missing"]
    return 0 if all(r.status == "identical" for r in shared) else 1


if __name__ == "__main__":
    sys.exit(main())
