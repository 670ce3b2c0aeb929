"""Baselines (most-popular, SASRec) on a prepared run folder, and the run report that merges them with TIGER.

Protocol (docs/pipeline.md): leave-one-out split (`modules.split`), full ranking over the catalogue,
items in the user's input history excluded, metrics from `modules.metrics`.

Layout written under RUN/baselines/ (a finished output is reused only for the same inputs and config, its
fingerprint; SASRec resumes from its last epoch after a kill):
    popularity/metrics.json
    sasrec/{best.pt, last.pt, config.gin, train.log, metrics.json}
    metrics.json   {"n_test_users": N, "models": {"popularity": {"valid", "test"}, "sasrec": {..., "best_epoch"}}}
The report (`write_run_report`) writes RUN/metrics.json and RUN/results.md.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator, Sequence

import gin
import numpy as np
import torch
from tqdm import tqdm

from experiments.artifacts import (ArtifactError, Interactions, atomic_path, file_digest, fingerprint,
                                   load_interactions, load_item_ids, load_json, reuse_finished, save_json, save_text)
from modules.metrics import DEFAULT_KS, METRIC_NAMES, topk_unseen, with_untied
from modules.semantic_ids import semantic_ids_digest
from modules.popularity import MostPopular, item_popularity
from modules.sasrec import SASRec, left_padded_windows, training_windows
from modules.split import LeaveOneOut, leave_one_out, tied_with_previous

log = logging.getLogger(__name__)

BASELINES_SCRIPT = "experiments/07_train_baselines.py"
REPORT_SCRIPT = "experiments/08_report.py"
MODELS = ("popularity", "sasrec")
PROTOCOL = "leave-one-out, full ranking over the whole catalogue, items in the user's input history excluded"


# ----------------------------------------------------------------------------------------------------
# Shared: device, data, evaluation
# ----------------------------------------------------------------------------------------------------

def pick_device() -> torch.device:
    """CUDA when present, else CPU; logged, never silent."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        log.info("device: cuda (%s), bf16 mixed precision", torch.cuda.get_device_name(device))
    else:
        log.info("device: cpu (float32), %d threads", torch.get_num_threads())
    return device


def load_run(run_dir: str | os.PathLike) -> tuple[Interactions, int, LeaveOneOut]:
    """User histories, catalogue size N and the leave-one-out split of a prepared run folder."""
    interactions = load_interactions(run_dir)
    n_items = len(load_item_ids(run_dir))
    try:
        split = leave_one_out(interactions.offsets)
    except ValueError as err:
        raise ArtifactError(f"{Path(run_dir) / 'interactions.npz'}: {err}") from err
    return interactions, n_items, split


def run_inputs(run_dir: str | os.PathLike) -> dict[str, Path]:
    """The prepared files every baseline reads (for its fingerprint)."""
    return {"item_ids.npy": Path(run_dir) / "item_ids.npy", "interactions.npz": Path(run_dir) / "interactions.npz"}


def split_inputs(interactions: Interactions, split: LeaveOneOut, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Input-history ends (exclusive event positions, one per user) and targets for "valid" or "test".

    valid: input [starts, valid_pos), target at valid_pos; test: input [starts, test_pos), target at test_pos.
    """
    if name == "valid":
        ends = split.valid_pos
    elif name == "test":
        ends = split.test_pos
    else:
        raise ValueError(f"split name must be 'valid' or 'test', got {name!r}.")
    return ends, interactions.item_index[ends].astype(np.int64)


RankBatch = Callable[[np.ndarray, np.ndarray, list], torch.Tensor]


def evaluate_ranker(rank_batch: RankBatch, interactions: Interactions, split: LeaveOneOut, name: str,
                    batch_size: int) -> dict[str, float]:
    """Metrics of a model on one split, users in batches, with "untied" (`modules.metrics.with_untied`):
    the same over the users whose target does not tie in timestamp with their previous event.

    rank_batch(starts (B,), ends (B,), histories: list of B item-row arrays) -> (B, max(ks)) ranked item rows.
    """
    ends, targets = split_inputs(interactions, split, name)
    k = max(DEFAULT_KS)
    ranked = []
    for lo in tqdm(range(0, interactions.n_users, batch_size), desc=f"eval {name}", leave=False):
        starts, batch_ends = split.starts[lo:lo + batch_size], ends[lo:lo + batch_size]
        histories = [interactions.item_index[s:e] for s, e in zip(starts, batch_ends)]
        batch_ranked = rank_batch(starts, batch_ends, histories)
        if tuple(batch_ranked.shape) != (len(histories), k):
            raise RuntimeError(f"ranker returned shape {tuple(batch_ranked.shape)}, expected {(len(histories), k)}.")
        ranked.append(batch_ranked.cpu().numpy())
    untied = ~tied_with_previous(interactions.offsets, interactions.timestamps, ends)
    return with_untied(np.concatenate(ranked), targets, untied, DEFAULT_KS)


# ----------------------------------------------------------------------------------------------------
# Most popular
# ----------------------------------------------------------------------------------------------------

def evaluate_popularity(run_dir: str | os.PathLike, batch_size: int = 1024) -> dict:
    """{"n_test_users", "valid", "test"} of the most-popular ranker (popularity from training events only)."""
    interactions, n_items, split = load_run(run_dir)
    model = MostPopular(item_popularity(interactions.item_index, split, n_items))
    k = max(DEFAULT_KS)
    result = {"n_test_users": interactions.n_users}
    for name in ("valid", "test"):
        result[name] = evaluate_ranker(lambda s, e, histories: model.recommend(histories, k),
                                       interactions, split, name, batch_size)
        log.info("popularity %s: %s", name, _format_metrics(result[name]))
    return result


# ----------------------------------------------------------------------------------------------------
# SASRec
# ----------------------------------------------------------------------------------------------------

@gin.configurable("SASRec")
def sasrec_model_config(hidden_dim: int, n_layers: int, n_heads: int, max_len: int, dropout: float,
                        ffn_dim: int | None = None) -> dict:
    """The SASRec architecture as bound in gin (`SASRec.hidden_dim = 64`, ...); n_items comes from the data."""
    return dict(hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads, max_len=max_len, dropout=dropout,
                ffn_dim=ffn_dim)


def sasrec_ranker(model: SASRec, item_index: np.ndarray, device: torch.device, k: int) -> RankBatch:
    """A `RankBatch` that scores the last max_len input items with SASRec and ranks unseen items."""
    def rank_batch(starts: np.ndarray, ends: np.ndarray, histories: list) -> torch.Tensor:
        tokens = torch.from_numpy(left_padded_windows(item_index, starts, ends, model.max_len)).to(device)
        with _autocast(device):
            scores = model.score_next(tokens)
        return topk_unseen(scores, histories, k)
    return rank_batch


def evaluate_sasrec(model: SASRec, interactions: Interactions, split: LeaveOneOut, name: str,
                    device: torch.device, batch_size: int) -> dict[str, float]:
    """SASRec metrics on "valid" or "test" (model put in eval mode)."""
    model.eval()
    ranker = sasrec_ranker(model, interactions.item_index, device, max(DEFAULT_KS))
    return evaluate_ranker(ranker, interactions, split, name, batch_size)


def load_sasrec(checkpoint: str | os.PathLike, interactions: Interactions) -> SASRec:
    """A trained SASRec (a best.pt of `train_sasrec`) on the CPU in eval mode, checked against the run's items."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    n_items = state["hyperparameters"]["n_items"]
    if interactions.item_index.max() >= n_items:
        raise ArtifactError(f"{checkpoint} scores {n_items} items but the run's events use item row "
                            f"{int(interactions.item_index.max())}: it was trained on another run folder.")
    model = SASRec(n_items=n_items, **state["hyperparameters"]["model"])
    model.load_state_dict(state["model"])
    return model.eval()


@torch.no_grad()
def sasrec_scores(model: SASRec, interactions: Interactions, split: LeaveOneOut, name: str, k: int = 10,
                  batch_size: int = 1024) -> tuple[float, np.ndarray]:
    """Mean NLL (nats) of each user's `name` target under SASRec's full softmax, and its (U, k) top unseen items.

    The NLL does not exclude seen items: the same quantity as TIGER's `nll` (train_decoder.evaluate),
    for comparing likelihoods; the top-k list excludes them, as every ranking here does.
    """
    ends, targets = split_inputs(interactions, split, name)
    total, ranked = 0.0, []
    for lo in range(0, len(ends), batch_size):
        starts, batch_ends = split.starts[lo:lo + batch_size], ends[lo:lo + batch_size]
        tokens = torch.from_numpy(left_padded_windows(interactions.item_index, starts, batch_ends, model.max_len))
        scores = model.score_next(tokens)
        total -= float(scores.log_softmax(-1).gather(1, torch.as_tensor(targets[lo:lo + batch_size])[:, None]).sum())
        histories = [interactions.item_index[s:e] for s, e in zip(starts, batch_ends)]
        ranked.append(topk_unseen(scores, histories, k).numpy())
    return total / len(ends), np.concatenate(ranked)


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (no loss scaling needed), nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _make_optimizer(model: SASRec, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices and embeddings only (not biases or LayerNorm gains)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate)


def train_one_epoch(model: SASRec, windows: np.ndarray, optimizer: torch.optim.Optimizer, batch_size: int,
                    epoch: int, seed: int, device: torch.device) -> float:
    """One pass over the training windows in a seeded order; returns the mean loss.

    Shuffling and dropout are seeded from (seed, epoch), so a resumed run repeats the same epochs.
    """
    model.train()
    torch.manual_seed(seed * 1_000_003 + epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(windows))
    total, n_batches = 0.0, 0
    for lo in tqdm(range(0, len(order), batch_size), desc=f"epoch {epoch}", leave=False):
        batch = torch.from_numpy(windows[order[lo:lo + batch_size]]).to(device)
        with _autocast(device):
            loss = model.loss(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        total += loss.item()
        n_batches += 1
    if not math.isfinite(total):
        raise FloatingPointError(f"SASRec loss became {total} in epoch {epoch}; lower train_sasrec.learning_rate.")
    return total / max(n_batches, 1)


@contextmanager
def _log_to_file(path: Path) -> Iterator[None]:
    """Also send INFO logs to `path` (appending, so a resumed run keeps its history)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    previous_level = root.level
    root.setLevel(min(previous_level, logging.INFO))
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
        handler.close()


def _save_checkpoint(path: Path, state: dict) -> None:
    """torch.save through a temp name, so a kill never leaves a truncated checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


@gin.configurable(denylist=["run_dir", "out_dir", "model_config", "overwrite"])
def train_sasrec(run_dir: str | os.PathLike, out_dir: str | os.PathLike, epochs: int, batch_size: int,
                 learning_rate: float, weight_decay: float, patience: int, seed: int, eval_batch_size: int,
                 monitor: str = "ndcg@10", max_windows_per_user: int | None = None,
                 model_config: dict | None = None, overwrite: bool = False) -> dict:
    """Train SASRec on the training events, pick the epoch with the best validation `monitor`, test it once.

    Each epoch visits every next-item transition of the training events once (or only the most recent
    `max_windows_per_user` windows of max_len of each user).

    Writes out_dir/{best.pt, last.pt, config.gin, train.log, metrics.json}. Resumes from last.pt when it
    exists with the same hyperparameters; returns (and skips to) metrics.json when already finished.
    Returns {"n_test_users", "valid" (at the best epoch), "test", "best_epoch", "epochs_run", "device",
    "train_seconds", "hyperparameters"}.
    """
    out_dir = Path(out_dir)
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    train_config = dict(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, weight_decay=weight_decay,
                        patience=patience, seed=seed, eval_batch_size=eval_batch_size, monitor=monitor,
                        max_windows_per_user=max_windows_per_user)
    model_config = model_config if model_config is not None else sasrec_model_config()
    current = fingerprint({"train": train_config, "model": model_config}, run_inputs(run_dir))
    done = reuse_finished(out_dir / "metrics.json", current, redo=(
        f"pass --overwrite to {BASELINES_SCRIPT} to retrain SASRec, or use another --out folder"))
    if done is not None:
        log.info("SASRec already trained on the same inputs and config: %s (pass --overwrite to retrain)",
                 out_dir / "metrics.json")
        return done
    if monitor not in METRIC_NAMES:
        raise ValueError(f"train_sasrec.monitor must be one of {METRIC_NAMES}, got {monitor!r}.")
    if epochs < 1 or patience < 1:
        raise ValueError(f"train_sasrec.epochs ({epochs}) and train_sasrec.patience ({patience}) must be >= 1: "
                         "the test split is scored with the best validation epoch, so at least one must run.")
    out_dir.mkdir(parents=True, exist_ok=True)
    with _log_to_file(out_dir / "train.log"):
        return _train_sasrec(Path(run_dir), out_dir, train_config, model_config, current)


def _train_sasrec(run_dir: Path, out_dir: Path, train_config: dict, model_config: dict, run_fingerprint: dict) -> dict:
    """The body of `train_sasrec`: build, resume, loop over epochs with early stopping, test the best."""
    started = time.time()
    device = pick_device()
    interactions, n_items, split = load_run(run_dir)
    # The inputs too: a checkpoint of other data (say, re-prepared with another tie-break) never resumes.
    hyperparameters = {"train": train_config, "model": model_config, "n_items": n_items,
                       "inputs": run_fingerprint["inputs"]}
    torch.manual_seed(train_config["seed"])
    model = SASRec(n_items=n_items, **model_config).to(device)
    save_text(out_dir / "config.gin", gin.operative_config_str())
    optimizer = _make_optimizer(model, train_config["learning_rate"], train_config["weight_decay"])
    windows = training_windows(interactions.item_index, split.starts, split.valid_pos, model.max_len,
                               train_config["max_windows_per_user"])
    log.info("SASRec: %d users, %d items, %d training windows of %d tokens, %.2fM parameters",
             interactions.n_users, n_items, len(windows), model.max_len + 1,
             sum(p.numel() for p in model.parameters()) / 1e6)
    if len(windows) == 0:
        raise ArtifactError(f"{run_dir / 'interactions.npz'} gives no training transitions: every user has "
                            "fewer than 4 events; prepare with a larger min_user_interactions.")

    state = {"epoch": 0, "best_epoch": 0, "best_valid": None, "bad_epochs": 0, "history": []}
    if (out_dir / "last.pt").is_file():
        state = _resume(out_dir / "last.pt", model, optimizer, hyperparameters, device)

    while state["epoch"] < train_config["epochs"] and state["bad_epochs"] < train_config["patience"]:
        epoch = state["epoch"] + 1
        loss = train_one_epoch(model, windows, optimizer, train_config["batch_size"], epoch,
                               train_config["seed"], device)
        valid = evaluate_sasrec(model, interactions, split, "valid", device, train_config["eval_batch_size"])
        state["history"].append({"epoch": epoch, "loss": loss, "valid": valid})
        improved = state["best_valid"] is None or valid[train_config["monitor"]] > state["best_valid"][
            train_config["monitor"]]
        if improved:
            state.update(best_epoch=epoch, best_valid=valid, bad_epochs=0)
            _save_checkpoint(out_dir / "best.pt", {"model": model.state_dict(), "epoch": epoch, "valid": valid,
                                                   "hyperparameters": hyperparameters})
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        log.info("epoch %d: loss %.4f, valid %s%s", epoch, loss, _format_metrics(valid),
                 " (best)" if improved else f" (no gain for {state['bad_epochs']} epochs)")
        _save_checkpoint(out_dir / "last.pt", {**state, "model": model.state_dict(),
                                               "optimizer": optimizer.state_dict(),
                                               "hyperparameters": hyperparameters})
    if state["bad_epochs"] >= train_config["patience"]:
        log.info("early stop after epoch %d: no %s gain for %d epochs", state["epoch"], train_config["monitor"],
                 train_config["patience"])

    # Test exactly once, with the checkpoint that validation chose.
    best = torch.load(out_dir / "best.pt", map_location=device, weights_only=True)
    model.load_state_dict(best["model"])
    test = evaluate_sasrec(model, interactions, split, "test", device, train_config["eval_batch_size"])
    log.info("SASRec test (best epoch %d): %s", best["epoch"], _format_metrics(test))
    result = {"n_test_users": interactions.n_users, "valid": best["valid"], "test": test,
              "best_epoch": best["epoch"], "epochs_run": state["epoch"], "device": str(device),
              "train_seconds": round(time.time() - started, 1), "hyperparameters": hyperparameters,
              "history": state["history"], "fingerprint": run_fingerprint}
    save_json(out_dir / "metrics.json", result)
    return result


def _resume(path: Path, model: SASRec, optimizer: torch.optim.Optimizer, hyperparameters: dict,
            device: torch.device) -> dict:
    """Load last.pt into model and optimizer; refuse if it was trained with other hyperparameters."""
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    if checkpoint["hyperparameters"] != hyperparameters:
        raise ArtifactError(f"{path} was trained with {checkpoint['hyperparameters']}, but the current config is "
                            f"{hyperparameters}: pass --overwrite to start over, or restore the old config.")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    log.info("resuming SASRec from %s after epoch %d (best epoch %d)", path, checkpoint["epoch"],
             checkpoint["best_epoch"])
    return {key: checkpoint[key] for key in ("epoch", "best_epoch", "best_valid", "bad_epochs", "history")}


# ----------------------------------------------------------------------------------------------------
# Step 7: all baselines of one run
# ----------------------------------------------------------------------------------------------------

def run_baselines(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                  models: Sequence[str] = MODELS, sasrec_config: str | os.PathLike | None = None,
                  overwrite: bool = False, gin_bindings: Sequence[str] = ()) -> dict:
    """Evaluate the requested baselines and write out_dir/metrics.json (default out_dir: RUN/baselines).

    Each model keeps its own out_dir/<model>/metrics.json (reused when present for the same inputs and
    config, refused for others, redone with overwrite); the combined file lists every model finished in
    out_dir.
    """
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "baselines"
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {list(MODELS)}.")
    if "popularity" in models:
        path = out_dir / "popularity" / "metrics.json"
        current = fingerprint({}, run_inputs(run_dir))
        if not overwrite and reuse_finished(path, current, redo=f"pass --overwrite to {BASELINES_SCRIPT}"):
            log.info("popularity already evaluated on the same inputs: %s (pass --overwrite to redo)", path)
        else:
            started = time.time()
            result = evaluate_popularity(run_dir)
            result["seconds"] = round(time.time() - started, 1)
            save_json(path, result | {"fingerprint": current})
    if "sasrec" in models:
        if sasrec_config is None:
            raise ValueError("SASRec needs a gin config: pass --sasrec-config configs/sasrec_<data>.gin.")
        # Configs include their base as 'configs/<name>.gin': run from the repository root.
        gin.parse_config_files_and_bindings([str(sasrec_config)], list(gin_bindings))
        train_sasrec(run_dir, out_dir / "sasrec", overwrite=overwrite)
    return write_baselines_summary(out_dir)


def write_baselines_summary(out_dir: Path) -> dict:
    """Merge out_dir/<model>/metrics.json of every finished baseline into out_dir/metrics.json."""
    summary = {"n_test_users": None, "models": {}}
    for name in MODELS:
        path = out_dir / name / "metrics.json"
        if not path.is_file():
            continue
        result = load_json(path, BASELINES_SCRIPT)
        summary["n_test_users"] = _same_users(summary["n_test_users"], result["n_test_users"], path)
        entry = {"valid": result["valid"], "test": result["test"], "fingerprint": result.get("fingerprint")}
        if "best_epoch" in result:
            entry["best_epoch"] = result["best_epoch"]
        summary["models"][name] = entry
    save_json(out_dir / "metrics.json", summary)
    return summary


def _same_users(expected: int | None, found: int, path: Path) -> int:
    """n_test_users of a new result, checked against the ones merged so far."""
    if expected is not None and found != expected:
        raise ArtifactError(f"{path} has n_test_users = {found} but the results merged before it have {expected}: "
                            "they come from different runs or splits; re-evaluate it on this run folder.")
    return found


def _format_metrics(metrics: dict) -> str:
    return " ".join(f"{name} {metrics[name]:.4f}" for name in METRIC_NAMES if name in metrics)


# ----------------------------------------------------------------------------------------------------
# Step 8: the run report (baselines + TIGER decoders)
# ----------------------------------------------------------------------------------------------------

# train_decoder.py writes RUN/decoder and, with --random-ids, RUN/decoder_random_ids.
DEFAULT_DECODER_DIRS = ("decoder", "decoder_random_ids")


def _checked_metrics(metrics, path: Path, field: str) -> dict:
    """The four metrics of one result dict and their "untied" subset, or an ArtifactError naming the file
    and the field."""
    if not isinstance(metrics, dict):
        raise ArtifactError(f"{path}: field {field!r} is missing or not a dict of metrics; re-run the step that "
                            "wrote it.")
    missing = [name for name in METRIC_NAMES if name not in metrics]
    untied = metrics.get("untied")
    if not isinstance(untied, dict) or "n_users" not in untied:
        missing.append("untied")
    else:
        missing += [f"untied.{name}" for name in METRIC_NAMES if name not in untied]
    if missing:
        raise ArtifactError(f"{path}: field {field!r} lacks {missing}; it must hold {list(METRIC_NAMES)} and "
                            "'untied' (modules.metrics.with_untied): it was written by an older version; re-run "
                            "the step that wrote it with --overwrite.")
    return {name: float(metrics[name]) for name in METRIC_NAMES} | {
        "untied": {name: float(untied[name]) for name in METRIC_NAMES} | {"n_users": int(untied["n_users"])}}


def collect_results(run_dir: str | os.PathLike, decoder_dirs: Sequence[str] | None = None) -> tuple[list, list]:
    """Every result to merge, as (model, n_test_users, valid, test, source path) tuples, plus missing sources.

    decoder_dirs: folders (relative to the run folder, or absolute) holding a decoder's metrics.json;
    None means the defaults (decoder, decoder_random_ids), each used when present. Folders named explicitly
    must exist.
    """
    run_dir = Path(run_dir)
    explicit = decoder_dirs is not None
    results, missing = [], []
    for folder in (decoder_dirs if explicit else DEFAULT_DECODER_DIRS):
        path = run_dir / folder / "metrics.json"
        if not path.is_file():
            if explicit:
                raise ArtifactError(f"{path} is missing: train that decoder first (train_decoder.py), or drop it "
                                    "from --decoders.")
            missing.append(str(path))
            continue
        result = load_json(path, "train_decoder.py")
        if not isinstance(result.get("model"), str) or "n_test_users" not in result:
            raise ArtifactError(f"{path} needs fields 'model' (a name such as \"tiger\") and 'n_test_users'; "
                                "re-run train_decoder.py.")
        results.append((result["model"], int(result["n_test_users"]),
                        _checked_metrics(result.get("valid"), path, "valid"),
                        _checked_metrics(result.get("test"), path, "test"), path))
        check_result_is_current(result, path, run_dir)
    baselines_path = run_dir / "baselines" / "metrics.json"
    if baselines_path.is_file():
        baselines = load_json(baselines_path, BASELINES_SCRIPT)
        for name, entry in baselines.get("models", {}).items():
            results.append((name, int(baselines["n_test_users"]),
                            _checked_metrics(entry.get("valid"), baselines_path, f"models.{name}.valid"),
                            _checked_metrics(entry.get("test"), baselines_path, f"models.{name}.test"),
                            baselines_path))
            check_result_is_current(entry, baselines_path / name, run_dir)
    else:
        missing.append(str(baselines_path))
    if not results:
        raise ArtifactError(f"nothing to report in {run_dir}: none of {missing} exists; run {BASELINES_SCRIPT} "
                            "and/or train_decoder.py first.")
    return results, missing


@functools.lru_cache(maxsize=8)
def _digest_of(path: Path, size: int, mtime_ns: int) -> str:
    return file_digest(path)["sha1"]


def check_result_is_current(result: dict, path: Path, run_dir: Path, rqvae_dir: Path | None = None) -> None:
    """Refuse a result (any model's metrics.json) trained on other interactions than the run's current
    interactions.npz, and a decoder's trained on other semantic IDs than its folder holds now (the folder it
    recorded, or `rqvae_dir`, default RUN/rqvae, when that path does not resolve from here)."""
    recorded = (result.get("fingerprint") or {}).get("inputs", {}).get("interactions.npz")
    if recorded is None:
        raise ArtifactError(f"{path} records no fingerprint of the interactions it was trained on (an older "
                            "version wrote it), so it cannot be checked against this run: retrain it with "
                            "--overwrite.")
    current = Path(run_dir) / "interactions.npz"
    stat = current.stat()
    if recorded["sha1"] != _digest_of(current, stat.st_size, stat.st_mtime_ns):
        raise ArtifactError(f"{path} was trained on other interactions than the current {current} (the run was "
                            "prepared again since, e.g. with another --tie-break): retrain it with --overwrite, or "
                            "restore the data it was trained on.")
    if "model" in result:   # a decoder
        check_semantic_ids_current(result, path, Path(rqvae_dir) if rqvae_dir else Path(run_dir) / "rqvae")


def check_semantic_ids_current(result: dict, path: Path, rqvae_dir: Path) -> None:
    """Refuse a decoder result trained on other semantic IDs than the ones its folder holds now."""
    if result.get("semantic_ids") == "random":
        return
    folder = Path(str(result.get("semantic_ids", rqvae_dir)))
    if not folder.is_dir():   # recorded relative to another working directory
        log.info("%s: semantic IDs folder %s not found from here; checking %s", path, folder, rqvae_dir)
        folder = rqvae_dir
    ids_path = folder / "semantic_ids.npy"
    if not ids_path.is_file():
        raise ArtifactError(f"{path} was trained on {ids_path}, which is missing: re-run train_rqvae.py and then "
                            "the decoder (train_decoder.py --overwrite).")
    if "semantic_ids_sha1" not in result:
        raise ArtifactError(f"{path} records no semantic_ids_sha1 (an older version wrote it): retrain it "
                            "(train_decoder.py ... --overwrite).")
    if result["semantic_ids_sha1"] != semantic_ids_digest(np.load(ids_path)):
        raise ArtifactError(f"{path} was trained on other semantic IDs than the current {ids_path} (its "
                            "semantic_ids_sha1 differs: the RQ-VAE step was re-run since). Retrain the decoder "
                            "(train_decoder.py ... --overwrite), or restore the IDs it was trained on.")


def merge_results(results: list) -> dict:
    """RUN/metrics.json content: test metrics per model at the top level, validation under valid_models.

    Raises ArtifactError when two results disagree on n_test_users (naming both files) or share a name.
    """
    merged = {"n_test_users": None, "protocol": PROTOCOL, "models": {}, "valid_models": {}, "sources": {}}
    first_source = None
    for model, n_test_users, valid, test, path in results:
        if merged["n_test_users"] is not None and n_test_users != merged["n_test_users"]:
            raise ArtifactError(f"{path} reports n_test_users = {n_test_users} for {model!r}, but {first_source} "
                                f"reports {merged['n_test_users']}: the results come from different runs or splits; "
                                "re-evaluate the odd one on this run folder.")
        if model in merged["models"]:
            raise ArtifactError(f"model name {model!r} appears in both {merged['sources'][model]} and {path}; "
                                "give each decoder run its own model name.")
        merged["n_test_users"], first_source = n_test_users, first_source or path
        merged["models"][model] = test
        merged["valid_models"][model] = valid
        merged["sources"][model] = str(path)
    return merged


def results_markdown(merged: dict, missing: Sequence[str] = ()) -> str:
    """RUN/results.md: model x metrics tables (test, then validation), the protocol and the user count."""
    header = "| model | " + " | ".join(METRIC_NAMES) + " |\n|---|" + "---:|" * len(METRIC_NAMES) + "\n"

    def table(by_model: dict, untied: bool = False) -> str:
        rows = "".join(f"| {model} | " + " | ".join(f"{(m['untied'] if untied else m)[name]:.4f}"
                                                  for name in METRIC_NAMES) + " |\n" for model, m in by_model.items())
        return header + rows

    untied_users = next((m["untied"]["n_users"] for m in merged["models"].values()), 0)
    lines = [
        "# Results", "",
        f"Protocol: {merged['protocol']}. Test users: {merged['n_test_users']} "
        "(one held-out item each, so recall@k is the hit rate).",
        f"Ties in timestamp are ordered by: {merged.get('tie_break', 'unknown')}.",
        "Test metrics use each model's checkpoint with the best validation score.", "",
        "## Test", "", table(merged["models"]),
        f"## Test, untied targets ({untied_users} users whose target does not share its timestamp with the "
        "previous event)", "", table(merged["models"], untied=True),
        "## Validation (second-to-last item)", "", table(merged["valid_models"]),
        "## Sources", "",
        *[f"- {model}: `{path}`" for model, path in merged["sources"].items()],
        *[f"- not found (not run yet): `{path}`" for path in missing],
        "",
    ]
    return "\n".join(lines)


def current_cold_section(path: Path, run_dir: Path) -> dict:
    """RUN/cold/metrics.json less its fingerprint and paths, refused unless every file it was computed from (the
    run's interactions and cold split, each model's checkpoint and metrics, the features) is unchanged."""
    cold = load_json(path, "experiments/11_cold_start.py")
    recorded = (cold.get("fingerprint") or {}).get("inputs", {})
    paths = cold.get("input_paths") or {}
    if not {"interactions.npz", "cold.npz"} <= set(paths) or set(paths) != set(recorded):
        raise ArtifactError(f"{path} does not record the files it was computed from (an older version wrote it): "
                            "re-run experiments/11_cold_start.py --overwrite (or make cold).")
    for name, where in paths.items():
        current = Path(where)
        if not current.is_file() or recorded[name]["sha1"] != file_digest(current)["sha1"]:
            raise ArtifactError(f"{path} was computed from another {name} than the current {current} (retrained or "
                                "re-prepared since): re-run experiments/11_cold_start.py --overwrite (or make cold).")
    return {key: value for key, value in cold.items() if key not in ("fingerprint", "input_paths")}


def write_run_report(run_dir: str | os.PathLike, decoder_dirs: Sequence[str] | None = None,
                     overwrite: bool = False) -> dict:
    """Merge every result of the run into RUN/metrics.json and RUN/results.md.

    Skips writing when both outputs already hold exactly this content, unless overwrite. (Compared by
    content, not mtimes: a report made with other --decoders must not pass for up to date.)
    """
    run_dir = Path(run_dir)
    results, missing = collect_results(run_dir, decoder_dirs)
    outputs = [run_dir / "metrics.json", run_dir / "results.md"]
    merged = merge_results(results)
    stats_path = run_dir / "stats.json"
    merged["tie_break"] = load_json(stats_path, "experiments/02_prepare_interactions.py").get("tie_break") \
        if stats_path.is_file() else None
    cold_path = run_dir / "cold" / "metrics.json"
    if cold_path.is_file():
        merged["cold"] = current_cold_section(cold_path, run_dir)
    markdown = results_markdown(merged, missing)
    if merged.get("cold") is not None:
        markdown += "\n" + (run_dir / "cold" / "results.md").read_text()
    if (not overwrite and all(p.is_file() for p in outputs) and load_json(outputs[0], REPORT_SCRIPT) == merged
            and outputs[1].read_text() == markdown):
        log.info("report is up to date: %s (pass --overwrite to rewrite)", outputs[0])
        return merged
    for path in missing:
        log.warning("not in the report (not found): %s", path)
    save_json(outputs[0], merged)
    save_text(outputs[1], markdown)
    log.info("wrote %s and %s", *outputs)
    return merged
