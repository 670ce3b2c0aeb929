"""Cold-start evaluation: every model of a run prepared with --cold, on the cold examples and under the epsilon rule.

Protocol (README, "Cold start"): the run's cold items have no event in any training input; each cold example
is a user's first event on a cold item of one half (validation or test) with their warm events before it as
input. Every model ranks the full catalogue with the input's items excluded, in two groups: its best warm
items and its best cold items. Under the epsilon rule the top-K holds the first K - m warm ones and then the
m = floor(epsilon * K + 1/2) best cold ones (`modules.cold_start.reserve_cold`); "natural" is the model's
own ranking of the whole catalogue without the rule. How each model ranks cold items:

- tiger (and tiger_random_ids): the trained decoder scores every cold item's semantic ID exactly (a beam as
  wide as the cold catalogue over the cold items' trie); cold items are ranked by the log-probability of
  their first d codes (the prefix the decoder generates), ties by the full ID's, either as beam search scores
  them ("joint") or under generation restricted to cold IDs ("constrained", each level renormalised over the
  cold codes that exist); d and the scoring are chosen on validation.
- semantic_knn: cosine similarity of an item's fused content features to the mean of the user's last n
  items' (TIGER's Semantic-KNN baseline); n is chosen on validation.
- sasrec: its scores; cold items' embeddings never met a positive target (the softmax only pushed them down).
- popularity: training counts; cold items have none: they rank below every warm item, in a seeded random
  order among themselves (not movieId order, which on MovieLens tracks popularity).
- random: seeded uniform scores.

Every choice (d, n) is made on the validation half; the test half is read once. The epsilon sweep is reported
on validation only.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from experiments import artifacts
from experiments.baselines import check_result_is_current, load_sasrec
from modules.beam_search import SemanticIdTrie, beam_search, renormalise_over_trie
from modules.cold_start import cold_slots, recent_mean, reserved_metrics, top_in_group, unit_rows
from modules.metrics import DEFAULT_KS, METRIC_NAMES, NO_ITEM, per_user_metrics, seen_mask
from modules.popularity import item_popularity
from modules.sasrec import left_padded_windows
from modules.sequences import encode_histories, history_windows
from modules.split import leave_one_out

log = logging.getLogger(__name__)

COLD_SCRIPT = "experiments/11_cold_start.py"
EPSILONS = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0)
N_RECENT = (1, 5, 20)
MODELS = ("tiger", "tiger_random_ids", "semantic_knn", "sasrec", "popularity", "random")
TOP = max(DEFAULT_KS)
EVALUATION_VERSION = 4  # bump when a change to this module changes any number it writes (fingerprinted)


@dataclass(frozen=True)
class Examples:
    """Evaluation examples: user row, input history [start, end) in the warm CSR, target item row."""

    user_row: np.ndarray
    start: np.ndarray
    end: np.ndarray
    target: np.ndarray
    name: str = ""                      # e.g. "cold valid": salts the random model's stream
    untied: np.ndarray | None = None    # (E,) bool: the input's last event is strictly earlier than the target

    def __len__(self) -> int:
        return len(self.target)

    def histories(self, item_index: np.ndarray, rows: slice) -> list[np.ndarray]:
        return [item_index[s:e] for s, e in zip(self.start[rows], self.end[rows])]


def warm_examples(interactions: artifacts.Interactions, split: str) -> Examples:
    """The leave-one-out examples of `split` ('valid' or 'test'): every user's held-out warm event."""
    loo = leave_one_out(interactions.offsets)
    ends = loo.valid_pos if split == "valid" else loo.test_pos
    users = np.arange(interactions.n_users)
    return Examples(users, loo.starts.copy(), ends, interactions.item_index[ends].astype(np.int64), f"warm {split}")


def cold_examples(interactions: artifacts.Interactions, cold: artifacts.ColdSet, split: str) -> Examples:
    """The cold examples of `split`: a user's first event on a cold item of that half. `untied` marks those
    whose input's last event is strictly earlier than the cold event (None when the split has no times):
    inside a second MovieLens' order is arbitrary, so a same-second input event may be a batch-rating
    neighbour of the target."""
    ex = cold.examples[split]
    untied = None if ex.timestamp is None else interactions.timestamps[ex.end - 1] < ex.timestamp
    return Examples(ex.user_row, interactions.offsets[ex.user_row], ex.end, ex.target, f"cold {split}", untied)


# ----------------------------------------------------------------------------------------------------
# Rankers: rank(examples, groups, choices) -> {group: {choice: (E, TOP) item rows}}, groups among
# "warm" (warm items only), "cold" (cold items only) and "natural" (the whole catalogue); seen items excluded.
# ----------------------------------------------------------------------------------------------------

@dataclass
class Ranker:
    """A model under evaluation: its ranking function and the values of its one validation-chosen setting.

    choices: candidate settings (Semantic-KNN's n, TIGER's prefix depth d), (None,) for models without one.
    cold_only_choice: the setting only changes the cold group's order (TIGER), not the warm or natural one.
    """

    rank: Callable
    choices: tuple = (None,)
    setting: str | None = None
    cold_only_choice: bool = False


def score_ranker(score: Callable, interactions, is_cold: torch.Tensor, choices=(None,), setting=None,
                 batch_size: int = 256) -> Ranker:
    """A Ranker from score(examples, rows, choice) -> (B, N) scores over the whole catalogue."""
    def rank(examples: Examples, groups, choices) -> dict:
        out = {g: {c: [] for c in choices} for g in groups}
        for lo in range(0, len(examples), batch_size):
            rows = slice(lo, lo + batch_size)
            histories = examples.histories(interactions.item_index, rows)
            seen = seen_mask(histories, len(histories), len(is_cold))
            allowed = {"warm": ~seen & ~is_cold, "cold": is_cold & ~seen, "natural": ~seen}
            for choice in choices:
                scores = score(examples, rows, choice)
                for group in groups:
                    out[group][choice].append(top_in_group(scores, allowed[group], TOP).numpy())
        return {g: {c: _stack(v) for c, v in by.items()} for g, by in out.items()}
    return Ranker(rank, tuple(choices), setting)


def _stack(parts: list) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, TOP), np.int64)


def sasrec_scorer(checkpoint: Path, interactions):
    model = load_sasrec(checkpoint, interactions)

    @torch.no_grad()
    def score(examples: Examples, rows: slice, choice) -> torch.Tensor:
        tokens = left_padded_windows(interactions.item_index, examples.start[rows], examples.end[rows], model.max_len)
        return model.score_next(torch.from_numpy(tokens)).float()
    return score


def popularity_scorer(interactions, is_cold: np.ndarray, seed: int):
    """Training counts; cold items have none, so they rank below every warm item, in a seeded random order.

    (Not in movieId order: MovieLens movieIds follow the catalogue's history, so the lowest-id cold item is
    often a famous old film, and movieId order would smuggle popularity in; on ml-latest-small it put most
    popular's cold recall@10 at 0.093 against random's 0.003.)"""
    counts = torch.as_tensor(item_popularity(interactions.item_index, leave_one_out(interactions.offsets),
                                             len(is_cold)), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    counts[torch.as_tensor(is_cold)] = -torch.rand(int(is_cold.sum()), generator=generator) - 1.0
    return lambda examples, rows, choice: counts.expand(len(examples.target[rows]), -1)


def random_scorer(n_items: int, seed: int):
    def score(examples: Examples, rows: slice, choice) -> torch.Tensor:
        salt = int.from_bytes(hashlib.sha1(examples.name.encode()).digest()[:4], "little")
        generator = torch.Generator().manual_seed(seed * 1_000_003 + salt * 65_537 + (rows.start or 0))
        return torch.rand(len(examples.target[rows]), n_items, generator=generator)
    return score


def knn_scorer(features: np.ndarray, interactions):
    """Semantic-KNN: choice = n, the number of recent history items whose mean feature row is the query."""
    unit = unit_rows(features)

    def score(examples: Examples, rows: slice, n_recent: int) -> torch.Tensor:
        return recent_mean(unit, examples.histories(interactions.item_index, rows), n_recent) @ unit.T
    return score


def tiger_ranker(out_dir: Path, run: Path, is_cold: np.ndarray, beam_width: int, batch_size: int = 64) -> Ranker:
    """A trained decoder's rankings: beam search over the warm items' trie ("warm") and over every item's
    ("natural"); "cold" scores every cold item exactly and ranks by the first d codes (`cold_order`).
    Refuses a decoder trained on another run folder or on other interactions than the run's."""
    from experiments.decoder_diagnostics import load_trained
    model, data, trained_run = load_trained(out_dir)
    if Path(trained_run).resolve() != Path(run).resolve():
        raise artifacts.ArtifactError(f"{out_dir} was trained on the run folder {trained_run}, not {run}: a model from "
                                      "another run may have trained on this run's cold items; train it on this run.")
    check_result_is_current(artifacts.load_json(out_dir / "metrics.json", "train_decoder.py"), out_dir / "metrics.json",
                            run)
    codes, sizes = torch.as_tensor(data.semantic_ids), data.vocab.codebook_sizes
    if len(codes) != len(is_cold):
        raise artifacts.ArtifactError(f"{out_dir} was trained on {len(codes)} items, the run has {len(is_cold)}.")
    members = {"natural": None, "warm": np.flatnonzero(~is_cold), "cold": np.flatnonzero(is_cold)}
    tries = {g: SemanticIdTrie(codes if m is None else codes[m], sizes) for g, m in members.items()}
    inter = data.interactions
    cold_batch = max(1, min(batch_size, 32768 // max(len(members["cold"]), 1)))

    def encoder_inputs(examples: Examples, rows: slice) -> torch.Tensor:
        users = examples.user_row[rows]
        windows = history_windows(inter.item_index, inter.offsets[users], examples.end[rows], data.max_history)
        return torch.as_tensor(encode_histories(windows, data.user_tokens[users], data.item_tokens))

    @torch.no_grad()
    def rank(examples: Examples, groups, choices) -> dict:
        out = {g: [] for g in groups}
        step = cold_batch if "cold" in groups else batch_size
        for lo in tqdm(range(0, len(examples), step), desc=f"tiger {out_dir.name}", leave=False):
            rows = slice(lo, lo + step)
            src = encoder_inputs(examples, rows)
            seen = seen_mask(examples.histories(inter.item_index, rows), src.shape[0], data.n_items)
            for group in groups:
                if group == "cold":
                    out[group].append(cold_order(model, src, tries["cold"], members["cold"], choices))
                    continue
                kept = members[group]
                result = beam_search(model, src, tries[group], beam_width, TOP,
                                     seen=seen if kept is None else seen[:, torch.as_tensor(kept)])
                out[group].append(_to_rows(result.items.numpy(), kept))
        return {g: ({d: _stack([p[d] for p in parts]) for d in choices} if g == "cold"
                    else {c: _stack(parts) for c in choices}) for g, parts in out.items()}
    choices = tuple((depth, scoring) for scoring in SCORINGS for depth in range(1, len(sizes) + 1))
    return Ranker(rank, choices, "prefix_depth, scoring", cold_only_choice=True)


def _to_rows(items: np.ndarray, members: np.ndarray | None) -> np.ndarray:
    """Item indices of a sub-catalogue's trie -> item rows of the run."""
    if members is None:
        return items
    return np.where(items >= 0, members[np.clip(items, 0, None)], NO_ITEM)


SCORINGS = ("joint", "constrained")


def cold_order(model, src: torch.Tensor, trie: SemanticIdTrie, members: np.ndarray, choices) -> dict:
    """{(d, scoring): (B, TOP) cold item rows}, ranked by the decoder's log-probability of their first d codes,
    ties by the full ID's. Every cold item is scored exactly (a beam as wide as the cold catalogue).

    scoring "joint": each level's log-softmax over its whole code slice (beam search's score);
    "constrained": each level renormalised over the cold items' codes that exist below the prefix
    (`renormalise_over_trie`), i.e. the probability that generation restricted to cold IDs produces them.
    """
    result = beam_search(model, src, trie, trie.n_items, trie.n_items)
    if (result.items < 0).any():
        raise AssertionError("the exhaustive beam over the cold trie lost an item: the cold ranking would misalign.")
    in_item_order = torch.argsort(result.items, dim=1)   # the beam holds every cold item once
    joint = result.prefix_scores.float().gather(1, in_item_order[:, :, None].expand(-1, -1, len(trie.codebook_sizes)))
    per_level = torch.diff(joint, dim=2, prepend=torch.zeros_like(joint[:, :, :1]))
    cumulative = {"joint": joint, "constrained": renormalise_over_trie(trie, per_level).cumsum(2)}
    ranked = {}
    for depth, scoring in choices:
        scores = cumulative[scoring]
        by_full = torch.sort(scores[:, :, -1], dim=1, descending=True, stable=True).indices
        by_prefix = torch.sort(scores[:, :, depth - 1].gather(1, by_full), dim=1, descending=True, stable=True).indices
        rows = members[by_full.gather(1, by_prefix[:, :TOP]).numpy()]
        # fewer cold items than TOP: pad like `top_in_group`, so every ranking has TOP columns
        ranked[(depth, scoring)] = np.pad(rows, ((0, 0), (0, TOP - rows.shape[1])), constant_values=NO_ITEM)
    return ranked


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------

def _mean(per_example: dict) -> dict:
    return {name: float(np.mean(per_example[name])) if len(per_example[name]) else float("nan")
            for name in METRIC_NAMES}


def _pooled(on_cold: dict, on_warm: dict) -> dict:
    return {"cold": _mean(on_cold), "warm": _mean(on_warm),
            "all": _mean({n: np.concatenate([on_cold[n], on_warm[n]]) for n in METRIC_NAMES})}


def epsilon_metrics(warm_rank: np.ndarray, warm_targets: np.ndarray, cold_rank: np.ndarray,
                    cold_targets: np.ndarray, epsilon: float) -> dict:
    """{"cold", "warm", "all"} mean metrics under the epsilon rule. A warm example's cold slots cannot hit
    its target and a cold example's warm slots cannot, so each is ranked against an empty other group."""
    empty = lambda n: np.full((n, TOP), NO_ITEM, dtype=np.int64)  # noqa: E731
    return _pooled(reserved_metrics(empty(len(cold_targets)), cold_rank, cold_targets, epsilon),
                   reserved_metrics(warm_rank, empty(len(warm_targets)), warm_targets, epsilon))


def untied_metrics(cold_rank: np.ndarray, examples: Examples, epsilon: float) -> dict | None:
    """Cold metrics under the epsilon rule on the examples whose input ends strictly before the target
    (`Examples.untied`), with their count; None when the split records no times."""
    if examples.untied is None:
        return None
    empty = np.full((len(examples), TOP), NO_ITEM, dtype=np.int64)
    per_example = reserved_metrics(empty, cold_rank, examples.target, epsilon)
    return {"n_examples": int(examples.untied.sum()),
            **_mean({n: per_example[n][examples.untied] for n in METRIC_NAMES})}


def item_mean_metrics(cold_rank: np.ndarray, targets: np.ndarray, epsilon: float) -> dict:
    """Cold metrics averaged per distinct target item, then over items (every cold movie weighs the same
    however many examples it has: a few popular cold movies cannot carry the number), under the epsilon rule
    ("epsilon") and for the cold ranking alone ("cold_only"); n_items = the distinct targets."""
    empty = np.full((len(targets), TOP), NO_ITEM, dtype=np.int64)
    items, inverse = np.unique(targets, return_inverse=True)

    def by_item(per_example: dict) -> dict:
        return {n: float((np.bincount(inverse, per_example[n], len(items)) / np.bincount(inverse)).mean())
                for n in ("recall@10", "ndcg@10")}
    return {"n_items": int(len(items)), "epsilon": by_item(reserved_metrics(empty, cold_rank, targets, epsilon)),
            "cold_only": by_item(per_user_metrics(cold_rank, targets))}


def natural_metrics(warm_natural: np.ndarray, warm_targets: np.ndarray, cold_natural: np.ndarray,
                    cold_targets: np.ndarray, is_cold: np.ndarray) -> dict:
    """Metrics of the model's own whole-catalogue ranking, and the share of its top-10 slots holding cold items."""
    result = _pooled(per_user_metrics(cold_natural, cold_targets), per_user_metrics(warm_natural, warm_targets))
    both = np.concatenate([warm_natural, cold_natural])
    valid = both >= 0
    result["cold_share_of_top10"] = float(is_cold[np.clip(both, 0, None)][valid].mean()) if valid.any() else 0.0
    return result


def evaluate_ranker(ranker: Ranker, warm: dict, cold: dict, is_cold: np.ndarray, epsilon: float) -> dict:
    """Validation (every choice, the epsilon sweep) and test (the chosen setting only) of one model.

    warm / cold: {"valid": Examples, "test": Examples}."""
    valid_cold = ranker.rank(cold["valid"], ("cold",), ranker.choices)["cold"]
    by_choice = {c: per_user_metrics(r, cold["valid"].target)["ndcg@10"].mean() for c, r in valid_cold.items()}
    chosen = max(ranker.choices, key=lambda c: (by_choice[c], -ranker.choices.index(c)))
    entry = {"setting": None if ranker.setting is None else {ranker.setting: list(chosen) if isinstance(chosen, tuple)
                                                             else chosen,
             "valid_cold_ndcg@10_by_choice": {str(c): float(v) for c, v in by_choice.items()}}}
    for split in ("valid", "test"):
        warm_choices = (None,) if ranker.cold_only_choice else (chosen,)
        w = ranker.rank(warm[split], ("warm", "natural"), warm_choices)
        c = ranker.rank(cold[split], ("cold", "natural"), (chosen,))
        cold_rank = c["cold"][chosen]
        warm_rank, warm_natural = w["warm"][warm_choices[0]], w["natural"][warm_choices[0]]
        cold_natural = c["natural"][chosen]
        at = epsilon_metrics(warm_rank, warm[split].target, cold_rank, cold[split].target, epsilon)
        entry[split] = {**at["cold"], "warm": at["warm"], "all": at["all"],
                        "untied": untied_metrics(cold_rank, cold[split], epsilon),
                        "item_mean": item_mean_metrics(cold_rank, cold[split].target, epsilon),
                        "cold_only": _mean(per_user_metrics(cold_rank, cold[split].target)),
                        "natural": natural_metrics(warm_natural, warm[split].target, cold_natural,
                                                   cold[split].target, is_cold)}
        if split == "valid":
            entry["sweep"] = {str(e): epsilon_metrics(warm_rank, warm[split].target, cold_rank, cold[split].target, e)
                              for e in EPSILONS}
            entry["epsilon_best_on_valid"] = max(EPSILONS, key=lambda e: entry["sweep"][str(e)]["all"]["recall@10"])
    return entry


# ----------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------

def build_rankers(run: Path, models: list[str], decoders: dict[str, Path], features_dir: Path | None,
                  sasrec: Path, interactions, is_cold: np.ndarray, beam_width: int, seed: int) -> tuple[dict, dict]:
    """The requested models as Rankers, and the input files each reads (for the fingerprint)."""
    rankers, inputs = {}, {}
    cold_t = torch.as_tensor(is_cold)
    for name in models:
        if name in ("tiger", "tiger_random_ids"):
            folder = decoders[name]
            rankers[name] = tiger_ranker(folder, run, is_cold, beam_width)
            inputs |= {f"{name}/metrics.json": folder / "metrics.json", f"{name}/best.pt": folder / "best.pt"}
        elif name == "semantic_knn":
            if features_dir is None:
                raise ValueError("semantic_knn needs --features (the fused item features of step 5).")
            from experiments.ml25m import load_item_features
            features, meta = load_item_features(features_dir, run)
            check_features_current(meta, features_dir, run)
            rankers[name] = score_ranker(knn_scorer(features, interactions), interactions, cold_t, N_RECENT, "n_recent")
            inputs["semantic_knn/features.npy"] = features_dir / "features.npy"
        elif name == "sasrec":
            check_result_is_current(artifacts.load_json(sasrec.parent / "metrics.json", "experiments/07_train_baselines.py"),
                                    sasrec.parent / "metrics.json", run)
            rankers[name] = score_ranker(sasrec_scorer(sasrec, interactions), interactions, cold_t)
            inputs["sasrec/best.pt"] = sasrec
        elif name == "popularity":
            rankers[name] = score_ranker(popularity_scorer(interactions, is_cold, seed), interactions, cold_t)
        elif name == "random":
            rankers[name] = score_ranker(random_scorer(len(is_cold), seed), interactions, cold_t)
        else:
            raise ValueError(f"unknown cold-start model {name!r}: choose from {list(MODELS)}.")
    return rankers, inputs


def check_features_current(meta: dict, features_dir: Path, run: Path) -> None:
    """Refuse fused features made from other run files than the run's current ones, and, on a cold run,
    features with a block of user activity (tags, genome) made without its cold items."""
    recorded = (meta.get("fingerprint") or {}).get("inputs", {})
    for name in (artifacts.INTERACTIONS_FILE, artifacts.ITEM_IDS_FILE, artifacts.ITEMS_FILE, artifacts.COLD_ITEMS_FILE):
        current = run / name
        if name in recorded and (not current.is_file() or recorded[name]["sha1"] != artifacts.file_digest(current)["sha1"]):
            raise artifacts.ArtifactError(f"{features_dir / 'blocks.json'} was fused from another {name} than {current}: "
                                          "re-run experiments/05_fuse_item_features.py for this run.")
    blocks = {b["name"] for b in meta.get("blocks", [])}
    activity = blocks & {"tags", "genome", "collab"}
    if (run / artifacts.COLD_ITEMS_FILE).is_file() and activity and artifacts.COLD_ITEMS_FILE not in recorded:
        raise artifacts.ArtifactError(f"{features_dir} has blocks of user activity ({sorted(activity)}) "
                                      f"fused without the run's {artifacts.COLD_ITEMS_FILE}: they may carry the cold "
                                      "items' tags; re-run experiments/05_fuse_item_features.py on this run.")


def available_models(decoders: dict[str, Path], features_dir: Path | None, sasrec: Path) -> list[str]:
    """Every model whose trained output exists (TIGER is required); the absent ones are logged."""
    present = {"tiger": (decoders["tiger"] / "best.pt").is_file(),
               "tiger_random_ids": (decoders["tiger_random_ids"] / "best.pt").is_file(),
               "semantic_knn": features_dir is not None and (features_dir / "features.npy").is_file(),
               "sasrec": sasrec.is_file(), "popularity": True, "random": True}
    if not present["tiger"]:
        raise artifacts.ArtifactError(f"{decoders['tiger'] / 'best.pt'} is missing: train TIGER first "
                                      "(train_decoder.py, or make pipeline).")
    for name, found in present.items():
        if not found:
            log.warning("cold start: %s is not evaluated (its trained output is missing)", name)
    return [name for name in MODELS if present[name]]


def run_cold_start(run: str | Path, out: str | Path | None = None, features_dir: str | Path | None = None,
                   decoder: str | Path | None = None, random_decoder: str | Path | None = None,
                   models: list[str] | None = None, epsilon: float = 0.1, beam_width: int = 20, seed: int = 0,
                   overwrite: bool = False, sasrec: str | Path | None = None) -> dict:
    """Evaluate every model on the run's cold split; write OUT/{metrics.json, results.md, cold_epsilon.png}.

    Defaults: OUT = RUN/cold, features RUN/item_features, decoders RUN/decoder and RUN/decoder_random_ids,
    SASRec RUN/baselines/sasrec/best.pt. Reuses a finished OUT/metrics.json only for the same inputs and
    settings (its fingerprint)."""
    run = Path(run)
    out = Path(out) if out else run / "cold"
    features_dir = Path(features_dir) if features_dir else run / "item_features"
    decoders = {"tiger": Path(decoder) if decoder else run / "decoder",
                "tiger_random_ids": Path(random_decoder) if random_decoder else run / "decoder_random_ids"}
    sasrec = Path(sasrec) if sasrec else run / "baselines" / "sasrec" / "best.pt"
    cold = artifacts.load_cold(run)
    if cold is None:
        raise artifacts.ArtifactError(f"{run / artifacts.COLD_FILE} is missing: the run was prepared without a "
                                      "cold-start split; prepare it with --cold 0.05 (make ... COLD=0.05).")
    cold_slots(TOP, epsilon)  # validates epsilon
    models = list(models) if models else available_models(decoders, features_dir if features_dir.is_dir() else None,
                                                          sasrec)
    interactions = artifacts.load_interactions(run)
    n_items = len(artifacts.load_item_ids(run))
    is_cold = np.zeros(n_items, dtype=bool)
    is_cold[cold.items] = True
    rankers, model_inputs = build_rankers(run, models, decoders, features_dir, sasrec, interactions, is_cold,
                                          beam_width, seed)
    config = {"version": EVALUATION_VERSION, "models": models, "epsilon": epsilon, "epsilons": list(EPSILONS),
              "beam_width": beam_width, "seed": seed, "n_recent": list(N_RECENT), "tiger_scorings": list(SCORINGS)}
    inputs = {"interactions.npz": run / artifacts.INTERACTIONS_FILE, "cold.npz": run / artifacts.COLD_FILE,
              "item_ids.npy": run / artifacts.ITEM_IDS_FILE, **model_inputs}
    current = artifacts.fingerprint(config, inputs)
    marker = out / "metrics.json"
    if not overwrite:
        done = artifacts.reuse_finished(marker, current, redo=f"pass --overwrite to {COLD_SCRIPT}, or another --out")
        if done is not None:
            log.info("%s exists for the same inputs and settings: skipping", marker)
            return done
    warm = {s: warm_examples(interactions, s) for s in ("valid", "test")}
    colds = {s: cold_examples(interactions, cold, s) for s in ("valid", "test")}
    stats_path = run / artifacts.STATS_FILE
    stats = artifacts.load_json(stats_path, artifacts.PREPARE_SCRIPT).get("cold") if stats_path.is_file() else None
    stats = stats or {}
    report = {"fraction": stats.get("fraction"), "n_cold_items": int(is_cold.sum()),
              "n_cold_examples": len(colds["test"]), "n_cold_valid_examples": len(colds["valid"]),
              "n_warm_examples": len(warm["test"]), "epsilon": epsilon,
              "n_untied_cold_examples": None if colds["test"].untied is None else int(colds["test"].untied.sum()),
              "cold_slots": {str(k): cold_slots(k, epsilon) for k in DEFAULT_KS},
              "examples": stats.get("examples"), "test_targets": target_concentration(colds["test"].target),
              "models": {}, "valid_models": {}, "sweep": {}, "settings": {},
              "epsilon_best_on_valid": {}}
    for name, ranker in rankers.items():
        log.info("cold start: evaluating %s", name)
        entry = evaluate_ranker(ranker, warm, colds, is_cold, epsilon)
        report["models"][name], report["valid_models"][name] = entry["test"], entry["valid"]
        report["sweep"][name], report["settings"][name] = entry["sweep"], entry["setting"]
        report["epsilon_best_on_valid"][name] = entry["epsilon_best_on_valid"]
        log.info("%s: test cold recall@10 %.4f ndcg@10 %.4f | warm recall@10 %.4f (epsilon %.2f)", name,
                 entry["test"]["recall@10"], entry["test"]["ndcg@10"], entry["test"]["warm"]["recall@10"], epsilon)
    report["input_paths"] = {name: str(path) for name, path in inputs.items()}
    report["fingerprint"] = current
    out.mkdir(parents=True, exist_ok=True)
    epsilon_plot(report, out / "cold_epsilon.png")
    artifacts.save_text(out / "results.md", cold_markdown(report))
    artifacts.save_json(marker, report)   # last: marks the step finished
    return report


def target_concentration(targets: np.ndarray) -> dict:
    """How many distinct cold items the examples' targets are, and the share of examples the most frequent
    one and ten of them take (a few popular cold movies can dominate the cold metrics)."""
    counts = np.sort(np.unique(targets, return_counts=True)[1])[::-1]
    return {"distinct": int(len(counts)), "top1_share": float(counts[:1].sum() / max(len(targets), 1)),
            "top10_share": float(counts[:10].sum() / max(len(targets), 1))}


def cold_markdown(report: dict) -> str:
    """The cold section of results.md: cold test examples, warm cost, the validation sweep."""
    names = list(METRIC_NAMES)
    m10 = report["cold_slots"]["10"]
    lines = [f"## Cold start ({report['n_cold_items']} cold items, {report['n_cold_examples']} cold test examples, "
             f"epsilon {report['epsilon']}: {m10} of the top-10 reserved)", "",
             f"Examples: {report['examples']}."
             + (" Their targets are {distinct} distinct cold items; the most frequent is {top1:.0%} of the examples, "
                "the ten most frequent {top10:.0%}.".format(distinct=report["test_targets"]["distinct"],
                                                           top1=report["test_targets"]["top1_share"],
                                                           top10=report["test_targets"]["top10_share"])
                if report.get("test_targets") else ""), "",
             "Cold test examples under the epsilon rule; warm and all = the leave-one-out test users alone and "
             "pooled with the cold examples, under the same rule; cold-only = the cold examples against the "
             "model's cold ranking alone (all 10 slots cold); natural = the model's own ranking, no rule; untied = "
             f"the {report.get('n_untied_cold_examples')} cold test examples whose last input event is strictly "
             "earlier than the target (within a second MovieLens' order is arbitrary).", "",
             "Item-mean = the cold-only recall@10 averaged per distinct target movie first (each cold movie counts "
             "once, however many examples it has).", "",
             "| model | setting | " + " | ".join(names) + " | untied recall@10 | warm recall@10 | all recall@10 | "
             "cold-only recall@10 | cold-only ndcg@10 | item-mean cold-only recall@10 | natural cold recall@10 | "
             "natural warm recall@10 |",
             "|---|---|" + "---:|" * (len(names) + 8)]
    for name, m in report["models"].items():
        setting = report["settings"][name]
        chosen = "" if setting is None else "; ".join(f"{k} = {', '.join(map(str, v)) if isinstance(v, list) else v}"
                                                      for k, v in setting.items() if not k.startswith("valid"))
        untied = f"{m['untied']['recall@10']:.4f}" if m.get("untied") else "n/a"
        lines.append(f"| {name} | {chosen} | " + " | ".join(f"{m[n]:.4f}" for n in names)
                     + f" | {untied} | {m['warm']['recall@10']:.4f} | {m['all']['recall@10']:.4f} | "
                     f"{m['cold_only']['recall@10']:.4f} | {m['cold_only']['ndcg@10']:.4f} | "
                     f"{m['item_mean']['cold_only']['recall@10']:.4f} | "
                     f"{m['natural']['cold']['recall@10']:.4f} | {m['natural']['warm']['recall@10']:.4f} |")
    lines += ["", "Validation sweep over epsilon (cold recall@10 / warm recall@10):", "",
              "| model | " + " | ".join(str(e) for e in EPSILONS) + " | best for all |",
              "|---|" + "---:|" * (len(EPSILONS) + 1)]
    for name, sweep in report["sweep"].items():
        lines.append(f"| {name} | " + " | ".join(f"{sweep[str(e)]['cold']['recall@10']:.3f} / "
                                                 f"{sweep[str(e)]['warm']['recall@10']:.3f}" for e in EPSILONS)
                     + f" | {report['epsilon_best_on_valid'][name]} |")
    return "\n".join(lines + [""])


def epsilon_plot(report: dict, path: Path) -> None:
    """PNG: validation cold recall@10 (solid) and warm recall@10 (dashed) against epsilon, one colour per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (cold_ax, warm_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, sweep in report["sweep"].items():
        cold_ax.plot(EPSILONS, [sweep[str(e)]["cold"]["recall@10"] for e in EPSILONS], marker="o", label=name)
        warm_ax.plot(EPSILONS, [sweep[str(e)]["warm"]["recall@10"] for e in EPSILONS], marker="o", label=name)
    cold_ax.set(xlabel="epsilon (share of the top-10 reserved for cold items)", ylabel="recall@10",
                title=f"cold validation examples ({report['n_cold_valid_examples']})")
    warm_ax.set(xlabel="epsilon", ylabel="recall@10", title="warm validation users: the cost of the reserved slots")
    cold_ax.legend(fontsize=8)
    artifacts.save_figure(path, fig, dpi=110)
