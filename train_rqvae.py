"""Train the RQ-VAE on fused item features and write each item's semantic ID (TIGER section 3.1).

    python train_rqvae.py configs/rqvae_ml_small.gin --run runs/ml_small \
        [--features RUN/item_features] [--out RUN/rqvae] [--gin_param 'train_rqvae.iterations = 100'] [--overwrite]
        [--allow-collapsed]

Reads RUN/item_features/{features.npy, movie_ids.npy, blocks.json} (step 5) and writes to the out folder:
model.pt, config.gin (operative config), config_full.gin, log.jsonl, log.csv, curves.png,
semantic_ids.npy (N, L+1) int64, movie_ids.npy, semantic_ids.json, health.json (written last: the
completion marker). A killed run resumes from out/checkpoint.pt.

With `RQVAE.fusion = 'gated'` or `'attention'` (adaptive fusion, modules/fusion.py) the block layout is read
from blocks.json (`fusion_blocks`) and also written: item_block_weights.npy (N, n_blocks) float32, the weight
each item gives each block (0 on blocks it lacks), rows aligned with movie_ids.npy, columns in the order of
health.json "block_fusion" "blocks", which summarises them per block.

health.json records the run's fingerprint (`rqvae_fingerprint`: the train_rqvae and RQVAE settings, the
features folder, the size and SHA-1 of each input file); a rerun reuses the output only for the same
fingerprint and otherwise stops and says what changed (--overwrite retrains). A collapsed codebook
(health.json "collapsed": true) is an error after the outputs are written, and again on every rerun, unless
`train_rqvae.allow_collapsed = True` (--allow-collapsed).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import time
from pathlib import Path

import gin
import numpy as np
import torch
from tqdm import tqdm

from experiments.artifacts import (ITEM_IDS_FILE, ITEMS_FILE, ArtifactError, atomic_path, exit_message, fingerprint,
                                   load_item_ids, load_items, reuse_finished, save_json, save_npy, save_figure,
                                   save_text)
from experiments.ml25m import (FUSE_SCRIPT, ML25MItemData, genre_matrix,  # noqa: F401 (ML25MItemData: gin registration)
                               gin_effective_parameters, load_item_features)
from modules import rqvae as rqvae_module
from modules.fusion import summarise_block_weights
from modules.semantic_ids import add_collision_column, codebook_sizes, genre_jaccard, health

log = logging.getLogger("train_rqvae")

# `blocks` comes from blocks.json (fusion_blocks), never from gin: binding it is an error at parse time.
RQVAE = gin.external_configurable(rqvae_module.RQVAE, "RQVAE", denylist=["blocks"])
TRAIN_SCRIPT = "train_rqvae.py"
REPO_ROOT = Path(__file__).resolve().parent
LOG_FIELDS = ["step", "reconstruction_loss", "codebook_loss", "commitment_loss", "total_loss", "dead_codes_reset",
              "items_per_s"]
FEATURE_FILES = ("features.npy", "movie_ids.npy", "blocks.json")
# train() arguments left out of the fingerprint: where things are (the inputs' contents are in it), and
# settings that change neither the model, nor the IDs, nor the logs.
NOT_FINGERPRINTED = ("run", "out", "features_dir", "overwrite", "checkpoint_every", "cpu_threads", "allow_collapsed")
# RQVAE settings that only adaptive fusion reads: left out of a 'concat' fingerprint, which therefore is the one
# written before they existed (finished concat runs are still reused), and part of every other.
FUSION_SETTINGS = ("fusion", "fusion_dim", "block_dropout", "fusion_heads")
BLOCK_WEIGHTS_FILE = "item_block_weights.npy"


class CodebookCollapseError(ArtifactError):
    """The trained RQ-VAE collapsed (health.json "collapsed": true) and allow_collapsed is off."""


# ----------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------

def parse_config(config_files: list[str], bindings: list[str] = ()) -> None:
    """Parse gin files and bindings; `include 'configs/...'` resolves against the repo root from any cwd."""
    if str(REPO_ROOT) not in getattr(gin.config, "_LOCATION_PREFIXES", []):  # no public getter in gin 0.5
        gin.add_config_file_search_path(str(REPO_ROOT))
    gin.parse_config_files_and_bindings(list(config_files), list(bindings))


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present (or `requested` explicitly), else CPU; logged."""
    device = torch.device(requested) if requested else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    log.info("device: %s (%s)", device, name)
    return device


def resolve_input_dim(configured: int | None, features: np.ndarray, features_path: Path) -> int:
    """The RQ-VAE input width, from the feature file; a configured value that disagrees is an error."""
    width = int(features.shape[1])
    if configured not in (None, 0) and int(configured) != width:
        raise ValueError(f"train_rqvae.input_dim = {configured} in the gin config, but {features_path} has {width} columns. "
                         f"Set train_rqvae.input_dim = None (take the width from the data) or re-run "
                         f"experiments/05_fuse_item_features.py with the blocks you meant.")
    return width


def rqvae_settings() -> dict:
    """The RQVAE arguments gin gives (signature defaults < bindings), less the data-derived `blocks`."""
    settings = gin_effective_parameters(rqvae_module.RQVAE, "RQVAE")
    settings.pop("blocks", None)
    return settings


def fusion_blocks(features: np.ndarray, blocks: list[dict], blocks_path: Path) -> list[dict]:
    """The block layout adaptive fusion needs (`modules.fusion.BlockSpec` dicts), from blocks.json's "blocks"
    and the mask columns of features (N, F).

    Step 5 writes a mask column as the standardised 0/1 indicator (times the block scale): two values, the
    higher one for the items that have the block. The threshold is their midpoint, and the number of rows above
    it must be blocks.json's n_items_with_block. A mask column with one value (every item has the block) gives
    a block without mask; a block no item has is an error.
    """
    layout = []
    for block in blocks:
        missing = [key for key in ("name", "feature_columns", "mask_column", "n_items_with_block") if key not in block]
        if missing:
            raise ArtifactError(f"{blocks_path}: block {block.get('name', '?')} lacks {missing}; re-run {FUSE_SCRIPT} "
                                f"--overwrite.")
        name, column, n_with = block["name"], block["mask_column"], int(block["n_items_with_block"])
        spec = {"name": name, "feature_columns": [int(c) for c in block["feature_columns"]], "mask_column": None,
                "mask_threshold": None}
        if column is not None:
            values = np.unique(features[:, int(column)])
            if n_with == 0:
                raise ArtifactError(f"{blocks_path}: no item has block {name!r} (n_items_with_block = 0), so "
                                    f"adaptive fusion has nothing to weigh: drop it from ML25MItemData.blocks and "
                                    f"re-run {FUSE_SCRIPT} --overwrite.")
            threshold = float(values.mean()) if len(values) == 2 else None
            n_above = int((features[:, int(column)] > threshold).sum()) if threshold is not None else len(features)
            if len(values) > 2 or n_above != n_with:
                raise ArtifactError(f"{blocks_path}: the mask column {column} of block {name!r} in features.npy "
                                    f"holds {len(values)} distinct values, {n_above if len(values) <= 2 else '?'} "
                                    f"items on the higher one, but a mask column holds two values (one when every "
                                    f"item has the block) and blocks.json says {n_with} items have the block; "
                                    f"re-run {FUSE_SCRIPT} --overwrite.")
            if threshold is not None:
                spec.update(mask_column=int(column), mask_threshold=threshold)
        layout.append(spec)
    return layout


def build_model(input_dim: int, device: torch.device, features: np.ndarray | None = None,
                blocks_meta: dict | None = None, blocks_path: Path | None = None) -> rqvae_module.RQVAE:
    """The gin-configured RQVAE with the data's input width; adaptive fusion also gets the block layout of
    `blocks_meta` (blocks.json, read from `blocks_path`) and `features`."""
    if rqvae_settings().get("fusion", "concat") == "concat":
        return RQVAE(input_dim=input_dim).to(device)
    if features is None or blocks_meta is None:
        raise ValueError("adaptive fusion (RQVAE.fusion != 'concat') needs the features and blocks.json to build "
                         "its block layout.")
    layout = fusion_blocks(features, blocks_meta["blocks"], blocks_path or Path("blocks.json"))
    return RQVAE(input_dim=input_dim, blocks=layout).to(device)


def initialise_codebooks(model: rqvae_module.RQVAE, features: torch.Tensor, sample_size: int,
                         generator: torch.Generator) -> None:
    """k-means initialise every level on the encoder outputs of a random sample of items, in eval mode (no
    dropout, no block dropout: the codebooks start on the items as they will be coded)."""
    if model.quantizer.init != "kmeans":
        return
    index = torch.randperm(len(features), generator=generator)[:sample_size].to(features.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            latents = model.encode(features[index])
    finally:
        model.train(was_training)
    with torch.no_grad():
        model.quantizer.initialise(latents, generator)
    log.info("k-means initialised %d codebooks on %d items", model.n_levels, len(index))


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------

def block_reconstruction_error(model: rqvae_module.RQVAE, features: torch.Tensor, blocks: list[dict]) -> dict:
    """Per block: mse over its columns, and relative (mse / variance of the block's columns)."""
    reconstruction = model.reconstruct(features)
    errors = {}
    for block in blocks:
        start, stop = block["columns"]
        target = features[:, start:stop]
        mse = float((reconstruction[:, start:stop] - target).pow(2).mean())
        variance = float(target.var(dim=0, unbiased=False).mean())
        errors[block["name"]] = {"mse": mse, "relative": mse / variance if variance > 0 else None}
    return errors


def evaluate(model: rqvae_module.RQVAE, features: torch.Tensor, blocks: list[dict],
             genres: np.ndarray | None = None) -> dict:
    """Codebook health on all items, reconstruction error per block and (if genres given) genre Jaccard."""
    codes = model.semantic_codes(features).cpu().numpy()
    report = health(codes, model.codebook_size)
    report["reconstruction_error"] = block_reconstruction_error(model, features, blocks)
    if genres is not None:
        report["genre_jaccard"] = genre_jaccard(genres, codes[:, 0])
    return report


def compute_semantic_ids(model: rqvae_module.RQVAE, features: torch.Tensor) -> np.ndarray:
    """(N, L+1) int64 semantic IDs: the L codes plus TIGER's collision column."""
    return add_collision_column(model.semantic_codes(features).cpu().numpy())


def load_model(checkpoint_path: str | Path, device: str | torch.device = "cpu") -> rqvae_module.RQVAE:
    """Rebuild the RQ-VAE saved in model.pt (no gin needed) in eval mode."""
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        raise ArtifactError(f"{checkpoint_path} is missing: run {TRAIN_SCRIPT} first.")
    saved = torch.load(checkpoint_path, map_location=device, weights_only=True)
    model = rqvae_module.RQVAE(**saved["model_config"]).to(device)
    model.load_state_dict(saved["model"])
    return model.eval()


def semantic_ids_from_checkpoint(out_dir: str | Path, run: str | Path, features_dir: str | Path | None = None,
                                 device: str = "cpu") -> np.ndarray:
    """Recompute the semantic IDs of `run` from out_dir/model.pt; equal to out_dir/semantic_ids.npy."""
    out_dir = Path(out_dir)
    features, _ = load_item_features(features_dir or Path(run) / "item_features", run)
    model = load_model(out_dir / "model.pt", device)
    return compute_semantic_ids(model, torch.from_numpy(features).to(device))


# ----------------------------------------------------------------------------------------------------
# Fingerprint and guard rails
# ----------------------------------------------------------------------------------------------------

def rqvae_fingerprint(run: Path, features_dir: Path, arguments: dict) -> dict:
    """What a finished RQ-VAE was made from: the train() `arguments` (less NOT_FINGERPRINTED), the RQVAE
    settings (signature defaults < gin bindings), and the digests of the fused features, blocks.json,
    item_ids.npy and items.csv (the genre Jaccard reads it). No path: the files are what counts."""
    for name in FEATURE_FILES:
        if not (features_dir / name).is_file():
            raise ArtifactError(f"{features_dir / name} is missing: run {FUSE_SCRIPT} first "
                                f"(or pass --features FOLDER).")
    config = {f"train_rqvae.{key}": value for key, value in arguments.items() if key not in NOT_FINGERPRINTED}
    settings = rqvae_settings()
    if settings.get("fusion", "concat") == "concat":
        settings = {key: value for key, value in settings.items() if key not in FUSION_SETTINGS}
    config |= {f"RQVAE.{key}": value for key, value in settings.items()}
    inputs = {f"item_features/{name}": features_dir / name for name in FEATURE_FILES}
    inputs |= {ITEM_IDS_FILE: run / ITEM_IDS_FILE, ITEMS_FILE: run / ITEMS_FILE}
    return fingerprint(config, inputs)


def refuse_collapse(report: dict, health_path: Path, allow_collapsed: bool) -> None:
    """CodebookCollapseError when `report` (health.json) says the codebooks collapsed, unless allowed.

    Collapsed IDs put many unrelated items on one code, so the decoder would learn from noise."""
    if not report.get("collapsed"):
        return
    reasons = "; ".join(report.get("collapse_reasons", [])) or "see the file"
    if allow_collapsed:
        log.warning("the RQ-VAE collapsed (%s), continuing because train_rqvae.allow_collapsed is set.", reasons)
        return
    raise CodebookCollapseError(
        f"the RQ-VAE collapsed: {reasons} ({health_path}). Its semantic IDs carry little information, so no "
        f"decoder should be trained on them. Train longer (train_rqvae.iterations), use other item features "
        f"(blocks, weights, PCA in {FUSE_SCRIPT}) or another codebook (RQVAE.codebook_size), then rerun "
        f"{TRAIN_SCRIPT} with --overwrite; or accept this result with --allow-collapsed "
        f"(train_rqvae.allow_collapsed = True).")


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------

def save_checkpoint(path: Path, model, optimizer, step: int, generator: torch.Generator, history: list,
                    window: list, run_config: dict) -> None:
    """Training state for resuming after a kill (atomic); `window` holds the steps not yet logged. torch's
    global generator state is kept too: (block) dropout draws from it."""
    rng = {"torch_rng": torch.get_rng_state()}
    device = next(model.parameters()).device
    if device.type == "cuda":
        rng["cuda_rng"] = torch.cuda.get_rng_state(device)
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "model_config": model.config, "optimizer": optimizer.state_dict(),
                    "step": step, "generator": generator.get_state(), "history": history, "window": window,
                    "run_config": run_config, **rng}, tmp)


def train_step(model, optimizer, batch: torch.Tensor, reset_dead: bool, generator: torch.Generator) -> dict:
    """One optimisation step; returns the losses and the number of dead codes reset."""
    output = model(batch)
    optimizer.zero_grad(set_to_none=True)
    output.total_loss.backward()
    optimizer.step()
    reset = model.quantizer.reset_dead_codes(output.quantizer.level_residuals, generator) if reset_dead else []
    return {"reconstruction_loss": output.reconstruction_loss.item(),
            "codebook_loss": output.quantizer.codebook_loss.item(),
            "commitment_loss": output.quantizer.commitment_loss.item(),
            "total_loss": output.total_loss.item(), "dead_codes_reset": int(sum(reset))}


@gin.configurable("train_rqvae", denylist=["run", "out", "features_dir", "overwrite"])
def train(run: str | Path, out: str | Path | None = None, features_dir: str | Path | None = None,
          overwrite: bool = False, input_dim: int | None = None, iterations: int = 20000, batch_size: int = 256,
          learning_rate: float = 1e-3, weight_decay: float = 0.0, seed: int = 0, kmeans_sample: int = 8192,
          dead_code_reset_until: float = 0.8, log_every: int = 100, eval_every: int = 1000,
          checkpoint_every: int = 1000, device: str | None = None, cpu_threads: int | None = None,
          allow_collapsed: bool = False) -> dict:
    """Train the RQ-VAE of `run` and write every output to `out` (default RUN/rqvae); returns health.json.

    A finished output is reused only when its health.json holds the current `rqvae_fingerprint`; one made from
    other inputs or settings raises StaleOutputError unless `overwrite` (which retrains).
    input_dim: None/0 = the feature file's width; any other value must equal it.
    dead_code_reset_until: reset dead codes only during this fraction of the iterations, so the last
        codes settle before the IDs are read.
    cpu_threads: torch intra-op threads on CPU (None = torch's default). The MLP's matmuls are small, so
        extra threads mostly spin; on a shared machine 1 is several times faster.
    allow_collapsed: accept a collapsed codebook (health.json "collapsed": true). Off, a collapse raises
        CodebookCollapseError once every output is written, and again on each rerun.
    """
    arguments = dict(locals())  # before any other local exists: exactly train()'s arguments
    run = Path(run)
    out = Path(out) if out else run / "rqvae"
    features_dir = Path(features_dir) if features_dir else run / "item_features"
    current = rqvae_fingerprint(run, features_dir, arguments)
    if overwrite:
        for name in ("health.json", "checkpoint.pt"):
            (out / name).unlink(missing_ok=True)
    else:
        done = reuse_finished(out / "health.json", current, redo=(
            f"pass --overwrite to {TRAIN_SCRIPT} to retrain into {out} (make has no such switch: run the script "
            f"itself), or use another --out or RUN folder; the decoders trained on its semantic IDs "
            f"(train_decoder.py) must then be retrained too"))
        if done is not None:
            log.info("%s was made from the same inputs and config: skipping (pass --overwrite to retrain).",
                     out / "health.json")
            refuse_collapse(done, out / "health.json", allow_collapsed)
            return done

    if cpu_threads:
        torch.set_num_threads(int(cpu_threads))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    device = pick_device(device)
    features_np, blocks_meta = load_item_features(features_dir, run)
    width = resolve_input_dim(input_dim, features_np, features_dir / "features.npy")
    features = torch.from_numpy(features_np).to(device)
    genres, _ = genre_matrix(load_items(run))
    log.info("%d items x %d features from %s", len(features), width, features_dir)

    model = build_model(width, device, features_np, blocks_meta, features_dir / "blocks.json")
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    out.mkdir(parents=True, exist_ok=True)
    save_text(out / "config.gin", gin.operative_config_str())  # after the model is built, so it is complete
    save_text(out / "config_full.gin", gin.config_str())
    # What a resumed run must share with the killed one (iterations may grow; the optimizer state would
    # otherwise silently keep the old learning rate).
    run_config = {"model": model.config, "batch_size": batch_size, "learning_rate": learning_rate,
                  "weight_decay": weight_decay, "seed": seed, "kmeans_sample": kmeans_sample,
                  "dead_code_reset_until": dead_code_reset_until, "n_items": len(features),
                  "inputs": current["inputs"]}
    start_step, history, window = 0, [], []
    if (out / "checkpoint.pt").is_file():
        state = torch.load(out / "checkpoint.pt", map_location=device, weights_only=True)
        saved = state.get("run_config") or {}
        if saved != run_config:
            differing = {key: (saved.get(key, "<unset>"), run_config.get(key, "<unset>"))
                         for key in sorted(set(saved) | set(run_config)) if saved.get(key) != run_config.get(key)}
            shown = "; ".join(f"{key}: {old} -> {new}" if key != "inputs" else "the input files changed"
                              for key, (old, new) in differing.items())
            raise ArtifactError(f"{out / 'checkpoint.pt'} was written with another config or other inputs "
                                f"({shown}); pass --overwrite to start again.")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"].cpu())  # map_location moved it; a generator state lives on CPU
        if "torch_rng" in state:  # checkpoints written before it was saved resume without it
            torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        start_step, history, window = state["step"], state["history"], state["window"]
        log.info("resuming from %s at step %d", out / "checkpoint.pt", start_step)
    else:
        initialise_codebooks(model, features, kmeans_sample, generator)

    started, window_start = time.perf_counter(), time.perf_counter()
    model.train()
    for step in tqdm(range(start_step + 1, iterations + 1), initial=start_step, total=iterations, desc="rqvae",
                     mininterval=5):
        index = torch.randint(len(features), (batch_size,), generator=generator).to(device)
        window.append(train_step(model, optimizer, features[index],
                                 step <= dead_code_reset_until * iterations, generator))
        if step % log_every == 0 or step == iterations:
            record = summarise_window(step, window, batch_size, time.perf_counter() - window_start)
            if step % eval_every == 0 or step == iterations:
                report = evaluate(model, features, blocks_meta["blocks"])
                record.update(flatten_health(report))
                if report["collapsed"]:
                    log.warning("step %d: codebook collapse: %s", step, "; ".join(report["collapse_reasons"]))
                log.info("step %d: recon %.4f, usage %s, unique %.3f", step, record["reconstruction_loss"],
                         [round(u, 3) for u in record["usage"]], record["unique_fraction"])
            history.append(record)
            window, window_start = [], time.perf_counter()
        if step % checkpoint_every == 0 and step < iterations:
            save_checkpoint(out / "checkpoint.pt", model, optimizer, step, generator, history, window, run_config)
    elapsed = time.perf_counter() - started
    steps_run = iterations - start_step
    report = write_outputs(out, run, model, features, blocks_meta, genres, history,
                           train_items_per_s=steps_run * batch_size / elapsed if steps_run else None, device=device,
                           fingerprint=current)
    refuse_collapse(report, out / "health.json", allow_collapsed)
    return report


def summarise_window(step: int, window: list[dict], batch_size: int, seconds: float) -> dict:
    """Mean losses over the steps since the last log line, plus throughput."""
    record = {"step": step}
    for key in ("reconstruction_loss", "codebook_loss", "commitment_loss", "total_loss"):
        record[key] = float(np.mean([w[key] for w in window])) if window else None
    record["dead_codes_reset"] = int(sum(w["dead_codes_reset"] for w in window))
    record["items_per_s"] = len(window) * batch_size / seconds if seconds > 0 else None
    return record


def flatten_health(report: dict) -> dict:
    """The parts of a health report kept in the training log."""
    return {k: report[k] for k in ("usage", "perplexity", "top_share", "unique_fraction", "max_collision_group")}


def write_outputs(out: Path, run: Path, model, features: torch.Tensor, blocks_meta: dict, genres: np.ndarray,
                  history: list[dict], train_items_per_s: float | None, device: torch.device,
                  fingerprint: dict | None = None) -> dict:
    """Write model.pt, logs, curves, semantic IDs and finally health.json (with `fingerprint`); warn loudly
    on collapse (train() then refuses it unless allowed)."""
    with atomic_path(out / "model.pt") as tmp:
        torch.save({"model": model.state_dict(), "model_config": model.config}, tmp)
    semantic_ids = compute_semantic_ids(model, features)
    save_npy(out / "semantic_ids.npy", semantic_ids)
    save_npy(out / "movie_ids.npy", load_item_ids(run))
    save_json(out / "semantic_ids.json", {"codebook_sizes": codebook_sizes(semantic_ids, model.codebook_size)})
    write_logs(out, history)
    plot_curves(out / "curves.png", history, model.n_levels)
    report = evaluate(model, features, blocks_meta["blocks"], genres)
    report.update({"n_items": int(len(features)), "n_features": int(features.shape[1]),
                   "codebook_size": model.codebook_size, "n_levels": model.n_levels,
                   "collision_column_size": int(semantic_ids[:, -1].max()) + 1,
                   "train_items_per_s": train_items_per_s, "device": str(device),
                   "blocks": [b["name"] for b in blocks_meta["blocks"]]})
    if model.block_fusion is not None:
        report["block_fusion"] = write_block_weights(out, model, features)
    else:  # a retrained concat model over an adaptive one: no weights file that is not its own
        (out / BLOCK_WEIGHTS_FILE).unlink(missing_ok=True)
    if fingerprint is not None:
        report["fingerprint"] = fingerprint
    if report["collapsed"]:
        log.warning("CODEBOOK COLLAPSE: %s. The semantic IDs carry little information; see %s.",
                    "; ".join(report["collapse_reasons"]), out / "health.json")
    log.info("usage %s, perplexity %s, unique fraction %.3f, max collision group %d, genre Jaccard same-code %.3f "
             "vs random %.3f", [round(u, 3) for u in report["usage"]], [round(p, 1) for p in report["perplexity"]],
             report["unique_fraction"], report["max_collision_group"], report["genre_jaccard"]["same_first_code"],
             report["genre_jaccard"]["random_pairs"])
    (out / "checkpoint.pt").unlink(missing_ok=True)
    save_json(out / "health.json", report)
    return report


def write_block_weights(out: Path, model: rqvae_module.RQVAE, features: torch.Tensor) -> dict:
    """Write out/item_block_weights.npy (N, n_blocks) float32 (eval mode) and return health.json's summary."""
    weights = model.block_weights(features).cpu().numpy().astype(np.float32)
    present = model.block_fusion.presence(features).cpu().numpy()
    save_npy(out / BLOCK_WEIGHTS_FILE, weights)
    summary = summarise_block_weights(weights, present, model.block_fusion.names)
    log.info("block weights (mean over the items that have the block): %s",
             ", ".join(f"{name} {s['mean_weight_when_present']:.3f}" for name, s in summary.items()
                       if s["mean_weight_when_present"] is not None))
    return {"fusion": model.fusion, "file": BLOCK_WEIGHTS_FILE, "blocks": model.block_fusion.names,
            "per_block": summary}


def write_logs(out: Path, history: list[dict]) -> None:
    """log.jsonl (every field) and log.csv (scalars, per-level usage as usage_<l>)."""
    save_text(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    n_levels = max((len(r["usage"]) for r in history if "usage" in r), default=0)
    fields = LOG_FIELDS + [f"usage_{l}" for l in range(n_levels)] + ["unique_fraction"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for record in history:
        row = dict(record)
        for level, value in enumerate(record.get("usage", [])):
            row[f"usage_{level}"] = value
        writer.writerow(row)
    save_text(out / "log.csv", buffer.getvalue())


def plot_curves(path: Path, history: list[dict], n_levels: int) -> None:
    """Losses (log scale) and per-level codebook usage against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_usage) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in history]
    # Codebook and commitment losses have the same value (different gradients): dashes keep both visible.
    for key, style in (("reconstruction_loss", "-"), ("codebook_loss", "-"), ("commitment_loss", "--")):
        ax_loss.plot(steps, [r[key] for r in history], style, label=key)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.legend()
    evaluated = [r for r in history if "usage" in r]
    for level in range(n_levels):
        ax_usage.plot([r["step"] for r in evaluated], [r["usage"][level] for r in evaluated], marker=".",
                      label=f"level {level + 1}")
    ax_usage.set_ylim(0, 1.05)
    ax_usage.set_xlabel("step")
    ax_usage.set_ylabel("fraction of codes used")
    ax_usage.legend()
    save_figure(path, fig, dpi=100)


def run_cli(argv=None) -> dict:
    """main() with errors left to the caller: parse the arguments and gin files, train, return health.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="+", help="gin file(s), e.g. configs/rqvae_ml25m.gin")
    parser.add_argument("--run", required=True, help="run folder (item_ids.npy, items.csv, item_features/)")
    parser.add_argument("--features", help="fused feature folder (default RUN/item_features)")
    parser.add_argument("--out", help="output folder (default RUN/rqvae)")
    parser.add_argument("--gin_param", action="append", default=[], help="extra gin binding, repeatable")
    parser.add_argument("--overwrite", action="store_true",
                        help="retrain even if out/health.json exists (needed when its inputs or config changed)")
    parser.add_argument("--allow-collapsed", action="store_true",
                        help="accept a collapsed codebook instead of stopping (sets train_rqvae.allow_collapsed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parse_config(args.config, args.gin_param)
    return train(args.run, args.out, args.features, overwrite=args.overwrite,
                 **({"allow_collapsed": True} if args.allow_collapsed else {}))


def main(argv=None) -> dict:
    """The command line: a stale output, a missing input or a collapse ends with its message on stderr and exit
    code 1, not a traceback."""
    try:
        return run_cli(argv)
    except ArtifactError as err:
        sys.exit(exit_message(err))


if __name__ == "__main__":
    main()
