"""Train the TIGER decoder on semantic IDs and evaluate it with constrained beam search (pipeline step 7).

    python train_decoder.py configs/decoder_ml25m.gin --run runs/ml25m [--semantic-ids runs/ml25m/rqvae]
        [--out runs/ml25m/decoder] [--random-ids] [--overwrite] [--threads N] [--gin_param 'train_decoder.iterations = 1000']
    torchrun --nproc_per_node 8 train_decoder.py configs/decoder_ml25m.gin --gin_param "RUN_DIR = 'runs/ml25m'"

(Under torchrun pass the run folder as the RUN_DIR macro, or rely on the config's: torchrun's own parser
takes `--run` for its `--run-path`.)

Reads RUN/item_ids.npy, RUN/interactions.npz and SEMANTIC_IDS/{semantic_ids.npy, movie_ids.npy,
semantic_ids.json}. Writes into OUT: metrics.json, results.md, curves.png, config.gin, train.log,
checkpoint.pt (latest, for resuming) and best.pt (best validation `select_metric`, ndcg@10 as for SASRec).
A finished run (metrics.json present) is reused only for the same inputs and gin bindings (its fingerprint),
refused otherwise, redone with --overwrite; a killed run resumes from checkpoint.pt and ends with the same
weights and metrics as an uninterrupted one (the data order is a function of the seed and the step).

Protocol: leave-one-out (modules.split), full-catalogue ranking, seen items excluded, validation on
the second-to-last item during training, the test item touched once with the best validation weights.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import gin
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from experiments import artifacts
from modules import metrics as ranking
from modules.metrics import METRIC_NAMES
from modules.semantic_ids import semantic_ids_digest
from modules.beam_search import NO_ITEM, SemanticIdTrie, beam_search, item_log_likelihood
from modules.popularity import item_popularity, popularity_log_likelihood
from modules.sequences import (Vocabulary, check_semantic_ids, encode_histories, first_training_targets, hash_users,
                               history_windows, matched_random_ids, semantic_id_tokens, training_windows,
                               user_of_positions, window_targets)
from modules.split import leave_one_out, tied_with_previous
from modules.tiger import Tiger
from modules.tiger_lm import TigerItemLM, TigerLM

log = logging.getLogger("train_decoder")
ConfiguredTiger = gin.external_configurable(Tiger, name="Tiger")
ConfiguredTigerLM = gin.external_configurable(TigerLM, name="TigerLM")
ConfiguredTigerItemLM = gin.external_configurable(TigerItemLM, name="TigerItemLM")
# train_decoder.architecture: the paper's encoder-decoder (gin `Tiger.*`), the decoder-only token stream
# (`TigerLM.*`), or the decoder-only item stream with a per-item code head (`TigerItemLM.*`).
ARCHITECTURES = {"encoder_decoder": ConfiguredTiger, "decoder_only": ConfiguredTigerLM,
                 "item_stream": ConfiguredTigerItemLM}
RQVAE_SCRIPT = "train_rqvae.py (pipeline step 6)"
CHECKPOINT_FILE, BEST_FILE, METRICS_FILE = "checkpoint.pt", "best.pt", "metrics.json"
MIN_HISTORY = 1  # a training target needs at least this many earlier events


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------

@dataclass
class DecoderData:
    """Everything the decoder reads, aligned to the run's item rows.

    semantic_ids: (N, L+1) int64 codes; item_tokens: (N, L+1) their token ids.
    user_tokens:  (U,) token id of each user row's hashed bucket.
    first_target: (U,) earliest training target of each user row (`first_training_targets`).
    train_positions: (W,) CSR position of the last target of every training window; a window holds
                 `targets_per_window` consecutive targets (1: every training target is its own example).
    """

    interactions: artifacts.Interactions
    semantic_ids: np.ndarray
    vocab: Vocabulary
    item_tokens: np.ndarray
    user_tokens: np.ndarray
    valid_pos: np.ndarray
    test_pos: np.ndarray
    first_target: np.ndarray
    train_positions: np.ndarray
    max_history: int
    targets_per_window: int = 1

    @property
    def n_items(self) -> int:
        return len(self.semantic_ids)

    @property
    def ids_digest(self) -> str:
        """SHA-1 of the semantic IDs: a checkpoint only resumes on the IDs it was trained on."""
        return semantic_ids_digest(self.semantic_ids)

    def encoder_inputs(self, target_pos: np.ndarray) -> np.ndarray:
        """(B,) target positions -> (B, 1 + H*(L+1)) encoder tokens of the H items before each target."""
        users = user_of_positions(self.interactions.offsets, target_pos)
        windows = history_windows(self.interactions.item_index, self.interactions.offsets[users], target_pos,
                                  self.max_history)
        return encode_histories(windows, self.user_tokens[users], self.item_tokens)

    def training_batch(self, last_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Windows ending at last_pos -> encoder tokens (B, S), target codes and visible items.

        One target per window: codes (B, L+1) and visible None. Several: codes (B, s, L+1) and
        visible (B, s) (window_targets; -1 for absent targets).
        """
        src = self.encoder_inputs(last_pos)
        if self.targets_per_window == 1:
            return src, self.target_codes(last_pos), None
        users = user_of_positions(self.interactions.offsets, last_pos)
        positions, visible = window_targets(last_pos, self.first_target[users], self.max_history,
                                            self.targets_per_window)
        return src, self.target_codes(positions), visible

    def target_codes(self, target_pos: np.ndarray) -> np.ndarray:
        """(B,) target positions -> (B, L+1) semantic ID of each target item."""
        return self.semantic_ids[self.interactions.item_index[target_pos]]

    def seen_items(self, target_pos: np.ndarray, device: torch.device) -> torch.Tensor:
        """(B, N) bool: every item of the user's history before the target (excluded from rankings)."""
        users = user_of_positions(self.interactions.offsets, target_pos)
        starts = self.interactions.offsets[users]
        lengths = target_pos - starts
        rows = np.repeat(np.arange(len(target_pos)), lengths)
        positions = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths) + np.repeat(starts, lengths)
        seen = torch.zeros(len(target_pos), self.n_items, dtype=torch.bool, device=device)
        seen[torch.as_tensor(rows, device=device),
             torch.as_tensor(self.interactions.item_index[positions].astype(np.int64), device=device)] = True
        return seen


def load_semantic_ids(run_dir: Path, semantic_ids_dir: Path, codebook_sizes: list[int] | None,
                      random_ids: bool, seed: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """The (N, L+1) semantic IDs and codebook sizes of the run, checked against item_ids.npy.

    With random_ids, the codes are replaced by the random-ID control (`matched_random_ids`): random codes
    of the same code-level sizes, which come from semantic_ids.json, or from the gin value
    `train_decoder.codebook_sizes` when the RQ-VAE step has not run yet, and a collision column by the
    RQ-VAE IDs' rule, whose size is then that of the random IDs.
    """
    item_ids = artifacts.load_item_ids(run_dir)
    info_path = semantic_ids_dir / "semantic_ids.json"
    if random_ids and not info_path.is_file() and codebook_sizes is not None:
        log.info("random IDs with codebook sizes %s from the gin config (%s is absent)", codebook_sizes, info_path)
        return random_ids_of(len(item_ids), codebook_sizes, seed)
    info = artifacts.load_json(info_path, RQVAE_SCRIPT)
    if "codebook_sizes" not in info:
        raise artifacts.ArtifactError(f"{info_path} has no field 'codebook_sizes': re-run {RQVAE_SCRIPT}.")
    file_sizes = tuple(int(k) for k in info["codebook_sizes"])
    if codebook_sizes is not None and tuple(codebook_sizes) != file_sizes:
        raise ValueError(f"train_decoder.codebook_sizes = {list(codebook_sizes)} in the gin config disagrees with "
                         f"codebook_sizes = {list(file_sizes)} in {info_path}: remove the gin binding "
                         "(the vocabulary comes from the data) or point --semantic-ids at the matching folder.")
    ids_path, movies_path = semantic_ids_dir / "semantic_ids.npy", semantic_ids_dir / "movie_ids.npy"
    for path in (ids_path, movies_path):
        if not path.is_file():
            raise artifacts.ArtifactError(f"{path} is missing: run {RQVAE_SCRIPT} first.")
    artifacts.check_aligned(np.load(movies_path), item_ids, movies_path, RQVAE_SCRIPT)
    semantic_ids = np.load(ids_path)
    if len(semantic_ids) != len(item_ids):
        raise artifacts.ArtifactError(f"{ids_path} has {len(semantic_ids)} rows but {movies_path} has "
                                      f"{len(item_ids)}: re-run {RQVAE_SCRIPT}.")
    try:
        check_semantic_ids(semantic_ids, file_sizes)
    except ValueError as error:
        raise artifacts.ArtifactError(f"{ids_path} (codebook_sizes from {info_path}): {error} "
                                      f"Re-run {RQVAE_SCRIPT}.") from error
    if random_ids:
        return random_ids_of(len(item_ids), file_sizes, seed)
    return semantic_ids.astype(np.int64), file_sizes


# Bindings that change no output of a finished run (logging, checkpoint cadence, evaluation batching, the run
# folder's name): left out of the fingerprint so that they never force a retraining.
NOT_FINGERPRINTED = ("train_decoder.log_every", "train_decoder.checkpoint_every", "train_decoder.eval_batch_size",
                     "RUN_DIR")


def operative_bindings(config_text: str) -> str:
    """The binding lines of a gin config text (`gin.config_str()`), less comments and NOT_FINGERPRINTED."""
    lines = [line for line in config_text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return "\n".join(line for line in lines if line.split("=")[0].strip() not in NOT_FINGERPRINTED)


def run_fingerprint(run_dir: Path, semantic_ids_dir: Path, random_ids: bool, codebook_sizes) -> dict:
    """The decoder's inputs (the run's histories and item ids, the semantic IDs) and its gin bindings: a
    finished decoder is reused only for the same (`artifacts.reuse_finished`). The random-ID control reads
    only the code-level sizes of the real IDs, not the IDs."""
    inputs = {"item_ids.npy": run_dir / artifacts.ITEM_IDS_FILE, "interactions.npz": run_dir / artifacts.INTERACTIONS_FILE}
    config = {"gin": operative_bindings(gin.config_str())}
    if random_ids:
        info_path = semantic_ids_dir / "semantic_ids.json"
        sizes = artifacts.load_json(info_path, RQVAE_SCRIPT)["codebook_sizes"] if info_path.is_file() else codebook_sizes
        if sizes is None:
            raise artifacts.ArtifactError(f"{info_path} is missing and train_decoder.codebook_sizes is not bound: "
                                          f"the random-ID control needs the codebook sizes; run {RQVAE_SCRIPT} first.")
        config["random_code_sizes"] = [int(k) for k in sizes[:-1]]
    else:
        inputs |= {f"rqvae/{name}": semantic_ids_dir / name
                   for name in ("semantic_ids.json", "semantic_ids.npy", "movie_ids.npy")}
    return artifacts.fingerprint(config, inputs)


def random_ids_of(n_items: int, codebook_sizes, seed: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """The random-ID control for codebook sizes (K_1, ..., K_L, C) of real IDs, and its own sizes."""
    ids = matched_random_ids(n_items, tuple(int(k) for k in codebook_sizes[:-1]), seed)
    return ids, tuple(int(k) for k in codebook_sizes[:-1]) + (int(ids[:, -1].max()) + 1,)


def load_data(run_dir: Path, semantic_ids_dir: Path, codebook_sizes, random_ids: bool, seed: int,
              max_history: int, n_user_buckets: int, targets_per_window: int = 1,
              max_targets_per_user: int | None = None) -> DecoderData:
    """Read the run folder and build the token tables and training windows."""
    semantic_ids, sizes = load_semantic_ids(run_dir, semantic_ids_dir, codebook_sizes, random_ids, seed)
    interactions = artifacts.load_interactions(run_dir)
    split = leave_one_out(interactions.offsets)
    vocab = Vocabulary(sizes, n_user_buckets)
    first_target = first_training_targets(split.starts, split.valid_pos, MIN_HISTORY, max_targets_per_user)
    data = DecoderData(interactions=interactions, semantic_ids=semantic_ids, vocab=vocab,
                       item_tokens=semantic_id_tokens(semantic_ids, vocab),
                       user_tokens=hash_users(interactions.user_ids, n_user_buckets) + vocab.user_token_offset,
                       valid_pos=split.valid_pos, test_pos=split.test_pos, first_target=first_target,
                       train_positions=training_windows(first_target, split.valid_pos, targets_per_window),
                       max_history=max_history, targets_per_window=targets_per_window)
    n_targets = int(np.maximum(split.valid_pos - first_target, 0).sum())
    log.info("%d items, %d users, %d training targets in %d windows of up to %d, codebook sizes %s, "
             "vocabulary %d tokens", data.n_items, interactions.n_users, n_targets, len(data.train_positions),
             targets_per_window, list(sizes), vocab.size)
    return data


class DataOrder:
    """Training targets in a seeded shuffled order, one permutation per epoch.

    Batch `step` is the slice [step*B, (step+1)*B) of the endless stream of epochs, so the order is a
    pure function of (seed, step): resuming at a step needs no saved iterator. Each rank takes every
    world-th example of the global batch (DistributedSampler-like sharding).
    """

    def __init__(self, n_examples: int, seed: int):
        self.n_examples, self.seed = n_examples, seed
        self._epoch, self._permutation = -1, None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(self.n_examples)
        return self._permutation

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> np.ndarray:
        """Indices (into the training targets) of this rank's share of global batch `step`."""
        stream = np.arange(step * batch_size, (step + 1) * batch_size)[rank::world]
        epochs = stream // self.n_examples
        return np.concatenate([self.permutation(int(e))[stream[epochs == e] % self.n_examples]
                               for e in np.unique(epochs)])


# ----------------------------------------------------------------------------------------------------
# Distributed setup, checkpoints
# ----------------------------------------------------------------------------------------------------

@dataclass
class Runtime:
    """Where this process runs: device, rank, world size, mixed precision."""

    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """bf16 autocast on CUDA, nothing on CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values


def setup_runtime() -> Runtime:
    """Join the torchrun process group when WORLD_SIZE > 1; pick CUDA when present, else CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if rank:
        log.setLevel(logging.WARNING)  # one copy of the progress log, from rank 0
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    log.info("device %s (rank %d of %d)%s", device, rank, world,
             ", bf16 autocast" if device.type == "cuda" else "")
    return Runtime(device=device, rank=rank, world=world)


def rng_states() -> dict:
    """Python, numpy and torch (CPU and CUDA) random states of this process."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, history: dict, config: str,
                    runtime: Runtime) -> None:
    """Write model, optimiser, scheduler, step, curves and every rank's RNG states (rank 0 writes)."""
    states = [None] * runtime.world
    if runtime.world > 1:
        dist.all_gather_object(states, rng_states())
    else:
        states = [rng_states()]
    if runtime.is_main:
        with artifacts.atomic_path(path) as tmp:
            torch.save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step, "history": history,
                        "rng": states, "config": config}, tmp)
    if runtime.world > 1:
        dist.barrier()


def unwrap(model: torch.nn.Module) -> Tiger:
    """The Tiger inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def warmup_cosine(warmup_steps: int, total_steps: int, final_fraction: float):
    """LR multiplier: linear warm-up to 1, then cosine decay to `final_fraction` at `total_steps`."""
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
    return multiplier


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: Tiger, data: DecoderData, trie: SemanticIdTrie, target_pos: np.ndarray, runtime: Runtime,
             beam_width: int, top_k: int, batch_size: int, desc: str) -> dict:
    """Recall/NDCG@5,10 of constrained beam search over the full catalogue, seen items excluded, and
    `nll`: the mean negative log-likelihood (nats) of the target item among all real items
    (`item_log_likelihood`; seen items not excluded), a less noisy learning signal than recall
    (on CUDA computed under bf16 autocast, so it differs slightly from a float32 evaluation).

    target_pos: (U,) CSR position of each evaluated user's target; users are sharded across ranks
    and the sums reduced, so every rank returns the same means. "untied" holds the same means over
    the users whose target does not tie in timestamp with the previous event (and their "n_users").
    """
    model.eval()
    mine = target_pos[runtime.rank::runtime.world]
    names = list(METRIC_NAMES) + ["nll"]
    untied = ~tied_with_previous(data.interactions.offsets, data.interactions.timestamps, mine)
    # Sums over all of this rank's users and over its untied ones: counts, then each metric.
    sums = torch.zeros(2, len(names) + 1, dtype=torch.float64, device=runtime.device)
    for start in tqdm(range(0, len(mine), batch_size), desc=desc, disable=not runtime.is_main, leave=False):
        positions = mine[start:start + batch_size]
        src = torch.as_tensor(data.encoder_inputs(positions), device=runtime.device)
        with runtime.autocast():
            result = beam_search(model, src, trie, beam_width, top_k, seen=data.seen_items(positions, runtime.device))
            codes = torch.as_tensor(data.target_codes(positions), device=runtime.device)
            log_likelihood = item_log_likelihood(model, src, codes, trie)
        per_user = ranking.per_user_metrics(result.items.cpu().numpy(), data.interactions.item_index[positions])
        per_user["nll"] = -log_likelihood.double().cpu().numpy()
        values = np.stack([np.ones(len(positions))] + [per_user[n] for n in names], axis=1)
        subset = untied[start:start + batch_size]
        sums += torch.as_tensor(np.stack([values.sum(0), values[subset].sum(0)]), device=runtime.device)
    sums = runtime.all_reduce_sum(sums).cpu().numpy()
    overall = {name: float(sums[0, i + 1] / sums[0, 0]) for i, name in enumerate(names)}
    n_untied = int(sums[1, 0])
    overall["untied"] = {name: float(sums[1, i + 1] / n_untied) if n_untied else float("nan")
                         for i, name in enumerate(names)} | {"n_users": n_untied}
    return overall


@torch.no_grad()
def unconstrained_invalid_rate(model: Tiger, data: DecoderData, trie: SemanticIdTrie, target_pos: np.ndarray,
                               runtime: Runtime, beam_width: int, top_k: int, batch_size: int) -> float:
    """Fraction of the top_k IDs of beam search without the trie that are no real item."""
    model.eval()
    mine = target_pos[runtime.rank::runtime.world]
    counts = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    for start in tqdm(range(0, len(mine), batch_size), desc="unconstrained", disable=not runtime.is_main, leave=False):
        positions = mine[start:start + batch_size]
        src = torch.as_tensor(data.encoder_inputs(positions), device=runtime.device)
        with runtime.autocast():
            items = beam_search(model, src, trie, beam_width, top_k, constrained=False).items
        counts += torch.tensor([(items == NO_ITEM).sum().item(), items.numel()], dtype=torch.float64,
                               device=runtime.device)
    counts = runtime.all_reduce_sum(counts)
    return float(counts[0] / counts[1])


def popularity_nll(data: DecoderData, target_pos: np.ndarray) -> float:
    """Mean NLL (nats) of the targets under training-event popularity: the level a model that has
    learned nothing from the histories sits at (compare with the `nll` of `evaluate`)."""
    counts = item_popularity(data.interactions.item_index, leave_one_out(data.interactions.offsets), data.n_items)
    return -float(popularity_log_likelihood(counts, data.interactions.item_index[target_pos]).mean())


def validation_users(data: DecoderData, max_users: int | None, seed: int) -> np.ndarray:
    """Validation target positions: every user, or a fixed seeded sample of `max_users` of them."""
    if max_users is None or max_users >= len(data.valid_pos):
        return data.valid_pos
    rows = np.sort(np.random.default_rng([seed, 1]).choice(len(data.valid_pos), max_users, replace=False))
    return data.valid_pos[rows]


# ----------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------

def log_to_file(path: Path) -> None:
    """Also append this process's log to `path` (rank 0 only)."""
    if not any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in logging.getLogger().handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(handler)


def write_curves(path: Path, history: dict) -> None:
    """PNG: training loss, validation recall@10 / ndcg@10 and validation NLL per item (against popularity's) over steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (loss_ax, recall_ax, nll_ax) = plt.subplots(1, 3, figsize=(15, 4))
    if history["train_loss"]:
        steps, losses = zip(*history["train_loss"])
        loss_ax.plot(steps, losses)
    loss_ax.set(xlabel="step", ylabel="train loss (mean CE per code)", title="training loss")
    if history["valid"]:
        for name in ("recall@10", "ndcg@10"):
            recall_ax.plot(*zip(*[(s, m[name]) for s, m in history["valid"]]), marker="o", label=name)
        recall_ax.legend()
    recall_ax.set(xlabel="step", ylabel="validation metric", title="validation recall@10 and ndcg@10")
    with_nll = [(s, m["nll"]) for s, m in history["valid"] if "nll" in m]
    if with_nll:
        nll_ax.plot(*zip(*with_nll), marker="o", label="TIGER")
    if history.get("popularity_nll") is not None:
        nll_ax.axhline(history["popularity_nll"], color="gray", linestyle="--", label="most popular")
    nll_ax.set(xlabel="step", ylabel="nats per item (lower is better)", title="validation NLL of the target item")
    nll_ax.legend()
    artifacts.save_figure(path, fig, dpi=100)


def training_layout(report: dict) -> str:
    """One sentence on the architecture and how a training window is used."""
    if report.get("architecture") == "decoder_only":
        return (f"decoder-only token stream (TigerLM), the last {report['targets_per_window']} items of each window "
                "trained in one causal pass.")
    if report.get("architecture") == "item_stream":
        return (f"decoder-only item stream with a code head (TigerItemLM), the last {report['targets_per_window']} "
                "items of each window trained in one causal pass.")
    if report["targets_per_window"] == 1 and not report["causal_encoder"]:
        return "the paper's (bidirectional encoder, one target per example)."
    return f"causal encoder, up to {report['targets_per_window']} targets per encoder window."


def results_markdown(report: dict) -> str:
    """A one-table markdown summary of metrics.json."""
    names = ["recall@5", "recall@10", "ndcg@5", "ndcg@10"]
    lines = [f"# {report['model']} on {report['dataset']}", "",
             f"Leave-one-out, full-catalogue ranking, seen items excluded; beam {report['beam_width']}, "
             f"best validation {report['select_metric']} at step {report['best_step']}, {report['n_test_users']} test users.", "",
             "Training layout: " + training_layout(report),
             "",
             "| split | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for split in ("valid", "test"):
        lines.append(f"| {split} | " + " | ".join(f"{report[split][n]:.4f}" for n in names) + " |")
    untied = report["test"]["untied"]
    lines.append(f"| test, untied targets ({untied['n_users']} users) | "
                 + " | ".join(f"{untied[n]:.4f}" for n in names) + " |")
    lines += ["", f"NLL of the target item among all items (nats; most popular in brackets): valid "
                  f"{report['valid']['nll']:.3f} ({report['popularity_nll']['valid']:.3f}), test "
                  f"{report['test']['nll']:.3f} ({report['popularity_nll']['test']:.3f})."]
    lines += ["", f"Invalid IDs in unconstrained top-{report['top_k']} beam search: "
                  f"{100 * report['invalid_rate_unconstrained']:.2f}%", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------

@gin.configurable("train_decoder", denylist=["run_dir", "semantic_ids_dir", "out_dir", "overwrite", "stop_at_step"])
def train(run_dir: str, semantic_ids_dir: str | None = None, out_dir: str | None = None, *,
          dataset: str = gin.REQUIRED, iterations: int = gin.REQUIRED, architecture: str = "encoder_decoder",
          batch_size: int = 256,
          learning_rate: float = 3e-4, weight_decay: float = 0.035, warmup_steps: int = 1000,
          final_lr_fraction: float = 0.1, grad_clip: float = 1.0, max_history: int = 20,
          targets_per_window: int = 1, max_targets_per_user: int | None = None, n_user_buckets: int = 2000,
          codebook_sizes: list[int] | None = None, random_ids: bool = False,
          seed: int = 0, select_metric: str = "ndcg@10", beam_width: int = 20, top_k: int = 10, log_every: int = 50, eval_every: int = 1000,
          checkpoint_every: int = 1000, eval_batch_size: int = 256, valid_max_users: int | None = None,
          overwrite: bool = False, stop_at_step: int | None = None) -> dict | None:
    """Train TIGER on RUN's histories, keep the best validation checkpoint, evaluate it once on test.

    Folders: run_dir (item_ids.npy, interactions.npz), semantic_ids_dir (default RUN/rqvae),
    out_dir (default RUN/decoder, or RUN/decoder_random_ids). batch_size is the global batch (all ranks)
    in windows; each window trains `targets_per_window` consecutive targets from one encoder pass
    (1 = the paper's one example per target; more needs Tiger.causal_encoder = True).
    architecture: 'encoder_decoder' (modules.tiger, the paper's, sizes from gin `Tiger.*`), 'decoder_only'
    (modules.tiger_lm.TigerLM, one causal pass per window over its items' code tokens, `TigerLM.*`) or
    'item_stream' (modules.tiger_lm.TigerItemLM, one position per item and a code head, `TigerItemLM.*`).
    max_targets_per_user: train only each user's most recent that many targets (None: all of them).
    select_metric: the validation metric that picks the checkpoint tested (SASRec's monitor is the same).
    stop_at_step stops after that many steps with a checkpoint (to test resuming); returns None then.
    Returns the metrics.json dict.
    """
    run_dir = Path(run_dir)
    semantic_ids_dir = Path(semantic_ids_dir) if semantic_ids_dir else run_dir / "rqvae"
    out_dir = Path(out_dir) if out_dir else run_dir / ("decoder_random_ids" if random_ids else "decoder")
    runtime = setup_runtime()
    current = run_fingerprint(run_dir, semantic_ids_dir, random_ids, codebook_sizes)
    if not overwrite:
        done = artifacts.reuse_finished(out_dir / METRICS_FILE, current, redo=(
            f"pass --overwrite to train_decoder.py to retrain into {out_dir}, or give it another --out"))
        if done is not None:
            log.info("%s exists for the same inputs and config: skipping (pass --overwrite to retrain)",
                     out_dir / METRICS_FILE)
            return done
    if overwrite and runtime.is_main:
        for name in (CHECKPOINT_FILE, BEST_FILE, METRICS_FILE, "train.log", "curves.png", "results.md"):
            (out_dir / name).unlink(missing_ok=True)
    if runtime.world > 1:
        dist.barrier()
    if batch_size % runtime.world:
        raise ValueError(f"train_decoder.batch_size = {batch_size} must be divisible by the {runtime.world} ranks.")

    if architecture not in ARCHITECTURES:
        raise ValueError(f"train_decoder.architecture = {architecture!r}: use one of {sorted(ARCHITECTURES)}.")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed + runtime.rank)  # different dropout masks per rank, same initial weights below
    data = load_data(run_dir, semantic_ids_dir, codebook_sizes, random_ids, seed, max_history, n_user_buckets,
                     targets_per_window, max_targets_per_user)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ARCHITECTURES[architecture](vocab=data.vocab, max_history=max_history).to(runtime.device)
    if not 1 <= targets_per_window <= max_history:
        raise ValueError(f"train_decoder.targets_per_window = {targets_per_window} must be in 1..max_history "
                         f"({max_history}): a window's targets are its last items.")
    if targets_per_window > 1 and not model.causal_encoder:
        raise ValueError(f"train_decoder.targets_per_window = {targets_per_window} needs Tiger.causal_encoder = True "
                         "(a bidirectional encoder would show each target the window's later items); "
                         "set it in the gin config, or targets_per_window = 1.")
    log.info("%s (%s): %.2fM parameters", type(model).__name__, architecture, sum(p.numel() for p in model.parameters()) / 1e6)
    # Resume only on the same config, IDs and input files.
    config = gin.config_str() + f"\n# semantic ids sha1 {data.ids_digest}\n# inputs {json.dumps(current['inputs'])}\n"
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        folders = f"# run_dir: {run_dir}\n# semantic_ids_dir: {semantic_ids_dir}\n# out_dir: {out_dir}\n\n"
        artifacts.save_text(out_dir / "config.gin", folders + gin.operative_config_str())
        log_to_file(out_dir / "train.log")
    trie = SemanticIdTrie(torch.as_tensor(data.semantic_ids), data.vocab.codebook_sizes).to(runtime.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, iterations, final_lr_fraction))
    if select_metric not in METRIC_NAMES:
        raise ValueError(f"train_decoder.select_metric = {select_metric!r}: use one of {list(METRIC_NAMES)} "
                         "(SASRec's train_sasrec.monitor is the same choice).")
    history = {"train_loss": [], "valid": [], "best_step": None, "best_value": -1.0, "loss_window": [0.0, 0]}
    start_step, history = resume(out_dir / CHECKPOINT_FILE, model, optimizer, scheduler, config, runtime, history)
    ddp_model = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[runtime.device] if runtime.device.type == "cuda" else None)
                 if runtime.world > 1 else model)
    order = DataOrder(len(data.train_positions), seed)
    valid_targets = validation_users(data, valid_max_users, seed)
    history["popularity_nll"] = popularity_nll(data, valid_targets)
    log.info("reference: most-popular NLL of the validation items %.3f nats (uniform over the catalogue %.3f)",
             history["popularity_nll"], math.log(data.n_items))
    eval_args = dict(beam_width=beam_width, top_k=top_k, batch_size=eval_batch_size)

    progress = tqdm(range(start_step, iterations), initial=start_step, total=iterations, desc="train",
                    disable=not runtime.is_main)
    for step in progress:
        if stop_at_step is not None and step == stop_at_step:
            save_checkpoint(out_dir / CHECKPOINT_FILE, model, optimizer, scheduler, step, history, config, runtime)
            log.info("stopped at step %d as asked (stop_at_step); run again to resume", step)
            return None
        loss = train_step(ddp_model, optimizer, scheduler, data, order.batch(step, batch_size, runtime.rank, runtime.world),
                          grad_clip, runtime)
        done = step + 1
        history["loss_window"][0] += loss
        history["loss_window"][1] += 1
        if done % log_every == 0 or done == iterations:
            window = runtime.all_reduce_sum(torch.tensor(history["loss_window"], dtype=torch.float64, device=runtime.device))
            history["train_loss"].append([done, float(window[0] / window[1])])
            history["loss_window"] = [0.0, 0]
            progress.set_postfix(loss=f"{history['train_loss'][-1][1]:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if done % eval_every == 0 or done == iterations:
            validate(model, data, trie, valid_targets, runtime, eval_args, done, history, out_dir, select_metric)
        if done % checkpoint_every == 0 or done == iterations:
            save_checkpoint(out_dir / CHECKPOINT_FILE, model, optimizer, scheduler, done, history, config, runtime)
    return finish(model, data, trie, runtime, eval_args, history, out_dir, dataset=dataset, random_ids=random_ids,
                  select_metric=select_metric, fingerprint=current, seed=seed,
                  iterations=iterations, semantic_ids_dir=semantic_ids_dir, causal_encoder=model.causal_encoder,
                  architecture=architecture,
                  targets_per_window=targets_per_window, max_targets_per_user=max_targets_per_user)


def train_step(model, optimizer, scheduler, data: DecoderData, example_indices: np.ndarray, grad_clip: float,
               runtime: Runtime) -> float:
    """One optimiser step on this rank's share of the batch; returns the local loss."""
    model.train()
    src, targets, visible = data.training_batch(data.train_positions[example_indices])
    src, targets = torch.as_tensor(src, device=runtime.device), torch.as_tensor(targets, device=runtime.device)
    with runtime.autocast():
        if visible is None:
            loss = model(src, targets)
        else:
            loss = model(src, targets, torch.as_tensor(visible, device=runtime.device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.item()


def validate(model: Tiger, data, trie, valid_targets, runtime: Runtime, eval_args: dict, step: int, history: dict,
             out_dir: Path, select_metric: str) -> None:
    """Validation metrics at `step`; keep best.pt when `select_metric` improves (ties keep the earlier step)."""
    metrics = evaluate(model, data, trie, valid_targets, runtime, desc=f"valid@{step}", **eval_args)
    history["valid"].append([step, metrics])
    log.info("step %d validation %s", step, format_metrics(metrics))
    if metrics[select_metric] > history["best_value"]:
        history["best_value"], history["best_step"] = metrics[select_metric], step
        if runtime.is_main:
            with artifacts.atomic_path(out_dir / BEST_FILE) as tmp:
                torch.save({"model": model.state_dict(), "step": step}, tmp)
    if runtime.is_main:
        write_curves(out_dir / "curves.png", history)


def format_metrics(metrics: dict) -> str:
    """'recall@5=0.1234 ... nll=7.8901 | untied recall@5=...' for the log."""
    flat = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    untied = metrics.get("untied")
    return flat + (f" | untied ({untied['n_users']} users) " + format_metrics(untied) if untied else "")


def resume(path: Path, model, optimizer, scheduler, config: str, runtime: Runtime, history: dict) -> tuple[int, dict]:
    """Restore a checkpoint if one exists; returns (its step, its curves), or (0, history) when starting fresh."""
    if not path.is_file():
        return 0, history
    # Load on the CPU: the saved RNG states must stay CPU ByteTensors (torch.set_rng_state rejects CUDA
    # tensors); load_state_dict moves weights and optimiser state to the parameters' device.
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if checkpoint["config"] != config:
        raise ValueError(f"{path} was written with another gin config or other semantic IDs; pass --overwrite "
                         "to start again, or restore the config and IDs it was trained with (see config.gin beside it).")
    if len(checkpoint["rng"]) != runtime.world:
        raise ValueError(f"{path} was written by {len(checkpoint['rng'])} ranks, this run has {runtime.world}: "
                         "resume with the same number of processes, or --overwrite.")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    set_rng_states(checkpoint["rng"][runtime.rank])
    log.info("resumed from %s at step %d", path, checkpoint["step"])
    return int(checkpoint["step"]), checkpoint["history"]


def finish(model: Tiger, data: DecoderData, trie, runtime: Runtime, eval_args: dict, history: dict, out_dir: Path,
           **info) -> dict:
    """Load the best validation weights, evaluate valid and test once, write metrics.json and results.md."""
    if runtime.world > 1:
        dist.barrier()  # rank 0 wrote best.pt
    best = torch.load(out_dir / BEST_FILE, map_location=runtime.device, weights_only=False)
    model.load_state_dict(best["model"])
    valid = evaluate(model, data, trie, data.valid_pos, runtime, desc="valid", **eval_args)
    test = evaluate(model, data, trie, data.test_pos, runtime, desc="test", **eval_args)
    invalid = unconstrained_invalid_rate(model, data, trie, data.test_pos, runtime, **eval_args)
    report = {"model": "tiger_random_ids" if info["random_ids"] else "tiger", "dataset": info["dataset"],
              "n_test_users": len(data.test_pos), "valid": valid, "test": test,
              "invalid_rate_unconstrained": invalid, "best_step": best["step"], "iterations": info["iterations"],
              "select_metric": info["select_metric"], "seed": info["seed"],
              "popularity_nll": {"valid": popularity_nll(data, data.valid_pos),
                                 "test": popularity_nll(data, data.test_pos)},
              "beam_width": eval_args["beam_width"], "top_k": eval_args["top_k"],
              "semantic_ids": "random" if info["random_ids"] else str(info["semantic_ids_dir"]),
              "semantic_ids_sha1": data.ids_digest,
              "architecture": info["architecture"],
              "causal_encoder": info["causal_encoder"], "targets_per_window": info["targets_per_window"],
              "max_targets_per_user": info["max_targets_per_user"], "fingerprint": info["fingerprint"]}
    log.info("test %s; unconstrained invalid-ID rate %.4f", format_metrics(test), invalid)
    if runtime.is_main:
        write_curves(out_dir / "curves.png", history)
        artifacts.save_text(out_dir / "results.md", results_markdown(report))
        artifacts.save_json(out_dir / METRICS_FILE, report)
    return report


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="+", help="gin config file(s), e.g. configs/decoder_ml25m.gin")
    parser.add_argument("--run", help="run folder with item_ids.npy and interactions.npz (default: the RUN_DIR macro of the config)")
    parser.add_argument("--semantic-ids", help="folder with semantic_ids.npy/.json and movie_ids.npy (default RUN/rqvae)")
    parser.add_argument("--out", help="output folder (default RUN/decoder, RUN/decoder_random_ids with --random-ids)")
    parser.add_argument("--random-ids", action="store_true", help="random-semantic-ID baseline (train_decoder.random_ids)")
    parser.add_argument("--overwrite", action="store_true",
                        help="retrain even if a finished metrics.json exists (one made from other inputs or config is refused)")
    parser.add_argument("--stop-at-step", type=int, help="stop with a checkpoint after this many steps")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy shared machine)")
    parser.add_argument("--gin_param", action="append", default=[], help="extra gin binding, e.g. 'train_decoder.iterations = 10'")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = list(args.gin_param) + (["train_decoder.random_ids = True"] if args.random_ids else [])
    gin.parse_config_files_and_bindings(args.config, params)
    run_dir = args.run or _gin_run_dir(args.config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        result = train(run_dir, args.semantic_ids, args.out, overwrite=args.overwrite, stop_at_step=args.stop_at_step)
    except artifacts.ArtifactError as err:
        raise SystemExit(artifacts.exit_message(err)) from None
    if dist.is_initialized():
        # Every rank reaches this point before any tears down: otherwise a rank still finishing its last
        # collective sees its peer's connection close and aborts (gloo raises SIGABRT; seen in the 2-process test).
        dist.barrier()
        dist.destroy_process_group()
    return result


def _gin_run_dir(config_files: list[str]) -> str:
    """The RUN_DIR macro of the gin config, used when --run is not given."""
    try:
        return gin.query_parameter("%RUN_DIR")
    except ValueError:
        raise SystemExit(f"no run folder: pass --run RUN or bind RUN_DIR = '...' in {config_files}.") from None


if __name__ == "__main__":
    main()
