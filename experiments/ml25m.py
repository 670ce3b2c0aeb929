"""Step 5: fuse item feature blocks into the RQ-VAE input (`ML25MItemData`).

Blocks (select by name, in gin `ML25MItemData.blocks = [...]` or `--blocks`):

| name     | source                                   | columns                                  | mask |
|----------|------------------------------------------|------------------------------------------|------|
| genres   | items.csv (from movies.csv)               | multi-hot over every genre listed         | no   |
| year     | items.csv `year`                          | release year                              | yes  |
| tags     | data folder tags.csv (training time only) | TF-IDF over the most frequent user tags   | yes  |
| genome   | data folder genome-scores.csv (ML-25M)    | 1,128 tag-genome relevances               | yes  |
| poster   | run poster_features/ (step 4)             | CNN poster embedding, optional PCA        | yes  |
| text     | TMDB details.jsonl (`tmdb_details`)       | all-MiniLM-L6-v2 embedding of TMDB text   | yes  |
| collab   | run interactions.npz (training events)    | SVD of item co-occurrence PPMI, 64-d      | yes  |

The two blocks made of user activity (tags, collab) see only what is known at training time: never a
user's leave-one-out validation or test event (nor, for tags, anything they did at or after the validation
event), and never any activity on a cold-start item (RUN/cold_items.npy); the genome, also user activity, is
masked for cold items. 'collab' (modules/collab.py) factorises the positive shifted PMI of how often two items
occur within `collab_window` events of each other in users' training histories; items without training
co-occurrences (cold items, items seen only as held-out targets) get the mask bit, not a vector.

Each block is standardised (statistics over the items that have it), optionally reduced by PCA, and
scaled so that its total variance is weight**2 whatever its width: a 1,280-d poster embedding would
otherwise drown 20 genre columns. A block with a mask gets one extra `has_<block>` column; items
without the block hold 0 (the block mean) in its feature columns. Rows are aligned by movieId against
the run's item_ids.npy, never by row order.

Outputs in `<run>/item_features/`: features.npy (N, F) float32, movie_ids.npy (N,) int64, blocks.json.
blocks.json is written last and records the step's fingerprint (its operative settings and the size and
SHA-1 of every file it read): a rerun reuses the output only when the fingerprint matches and otherwise
stops with `StaleOutputError` (`--overwrite` rebuilds). Poster features extracted with random weights
(`--weights none` in step 4) are refused unless `ML25MItemData.allow_random_poster_weights = True`.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gin
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from experiments import item_text
from experiments.artifacts import (COLD_ITEMS_FILE, INTERACTIONS_FILE, ITEM_IDS_FILE, ITEMS_FILE, PREPARE_SCRIPT,
                                   ArtifactError, check_aligned, fingerprint, load_interactions, load_item_ids, load_items, load_json,
                                   reuse_finished, save_json, save_npy)
from modules.collab import pmi_svd
from modules.features import block_scale, centre_and_scale, pca, standardise
from modules.popularity import training_event_mask
from modules.split import leave_one_out

log = logging.getLogger(__name__)

FUSE_SCRIPT = "experiments/05_fuse_item_features.py"
POSTER_SCRIPT = "experiments/04_extract_poster_features.py"
OUTPUT_DIR = "item_features"
TEXT_CACHE_DIR = "text_cache"
BLOCK_NAMES = ("genres", "year", "tags", "genome", "poster", "text", "collab")
# 'column': z-score each column; 'block': centre, then one scalar for the whole block (keeps its geometry).
DEFAULT_STANDARDISATION = {"genres": "column", "year": "column", "tags": "block", "genome": "block",
                           "poster": "column", "text": "block", "collab": "block"}
DEFAULT_WEIGHTS = {"genres": 1.0, "year": 0.5, "tags": 1.0, "genome": 1.0, "poster": 1.0, "text": 1.0,
                   "collab": 1.0}
# How step 4 (experiments/poster_features.py) describes random weights in meta.json's "weights" field.
RANDOM_POSTER_WEIGHTS = "none (random init"
POSTER_FILES = ("features.npy", "movie_ids.npy", "has_poster.npy", "meta.json")
FUSE_REDO = (f"pass --overwrite to {FUSE_SCRIPT} to rebuild it (make has no such switch: run the script "
             f"itself), or use another RUN folder (or --out); the later steps must then be redone too "
             f"(train_rqvae.py and train_decoder.py with --overwrite)")


@dataclass
class RawBlock:
    """One block before fusion: values (N, D) float32, mask (N,) bool of items that have it (None = all)."""

    name: str
    values: np.ndarray
    mask: np.ndarray | None
    source: str
    column_names: list[str] = field(default_factory=list)


@dataclass
class BlockInfo:
    """One block of the fused matrix, as recorded in blocks.json."""

    name: str
    columns: tuple[int, int]            # [start, stop) in features.npy, mask column included
    feature_columns: tuple[int, int]
    mask_column: int | None
    weight: float
    scale: float                        # multiplier applied after standardisation (weight / sqrt(width))
    standardisation: str                # 'column' (z-score per column) or 'block' (one scalar)
    n_items_with_block: int
    n_items_without_block: int
    source: str
    input_dims: int
    pca_dims: int | None
    pca_explained_variance: float | None


# ----------------------------------------------------------------------------------------------------
# Block builders: each returns a RawBlock aligned with `movie_ids` (the run's item_ids.npy)
# ----------------------------------------------------------------------------------------------------

def genres_block(items: pd.DataFrame) -> RawBlock:
    """Multi-hot over every genre string in items.csv ('(no genres listed)' is its own column)."""
    dummies = items["genres"].fillna("(no genres listed)").astype(str).str.get_dummies(sep="|")
    return RawBlock("genres", dummies.to_numpy(np.float32), None, "items.csv (movies.csv genres)",
                    list(dummies.columns))


def genre_matrix(items: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """(N, G) bool genre multi-hot of the item table, and the genre names (for evaluation)."""
    block = genres_block(items)
    return block.values.astype(bool), block.column_names


def year_block(items: pd.DataFrame) -> RawBlock:
    """Release year parsed by the prepare step; items without one are masked."""
    year = items["year"]
    mask = year.notna().to_numpy()
    values = year.astype("float64").fillna(0.0).to_numpy(np.float32)[:, None]
    return RawBlock("year", values, mask, "items.csv year", ["year"])


def _rows_of(movie_ids: np.ndarray, wanted: np.ndarray, path: Path) -> np.ndarray:
    """Row in `movie_ids` (sorted item_ids.npy) of every id in `wanted`; error naming `path` on unknown ids."""
    rows = np.searchsorted(movie_ids, wanted)
    rows = np.clip(rows, 0, len(movie_ids) - 1)
    unknown = movie_ids[rows] != wanted
    if unknown.any():
        bad = np.unique(wanted[unknown])
        raise ArtifactError(f"{path} lists {len(bad)} movieId(s) that are not in the run's item table (e.g. "
                            f"{bad[:5].tolist()}): the data folder and the run come from different releases; "
                            f"re-run experiments/02_prepare_interactions.py on this data folder.")
    return rows


def _require_source(path: Path, block: str, hint: str) -> Path:
    if not path.is_file():
        raise ArtifactError(f"block '{block}' was asked for but {path} is missing. {hint} "
                            f"Or drop '{block}' from ML25MItemData.blocks / --blocks.")
    return path


def run_cold_movies(run: str | os.PathLike) -> np.ndarray:
    """(C,) int64 sorted movieIds of the run's cold-start items (prepare --cold); empty without a cold split."""
    path = Path(run) / COLD_ITEMS_FILE
    return np.sort(np.load(path)).astype(np.int64) if path.is_file() else np.zeros(0, dtype=np.int64)


def genome_block(data_dir: Path, movie_ids: np.ndarray, cold_movies: np.ndarray | None = None) -> RawBlock:
    """Tag-genome relevance (N, T) from genome-scores.csv (movieId,tagId,relevance), scattered with numpy.

    ML-25M's file has 15.6M rows; pyarrow parses it in seconds and nothing here loops in Python.
    cold_movies: the run's cold-start movieIds. The genome is computed from users' tags, ratings and reviews
    (and exists only for well-rated movies), so a cold movie's row is user activity: it is masked.
    """
    path = _require_source(data_dir / "genome-scores.csv", "genome",
                           "Only ML-25M (and ML-20M) ship a tag genome; ml-latest-small has none.")
    table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
        column_types={"movieId": pa.int64(), "tagId": pa.int64(), "relevance": pa.float32()},
        include_columns=["movieId", "tagId", "relevance"]))
    movie = table.column("movieId").to_numpy()
    tag = table.column("tagId").to_numpy()
    relevance = table.column("relevance").to_numpy()
    tag_ids, tag_column = np.unique(tag, return_inverse=True)
    rows = _rows_of(movie_ids, movie, path)
    if cold_movies is not None and len(cold_movies):
        warm = ~np.isin(movie_ids[rows], cold_movies)
        log.info("genome: the rows of %d cold-start movies are masked (user activity)",
                 len(np.unique(rows[~warm])))
        rows, tag_column, relevance = rows[warm], tag_column[warm], relevance[warm]
    values = np.zeros((len(movie_ids), len(tag_ids)), dtype=np.float32)
    values[rows, tag_column] = relevance
    mask = np.zeros(len(movie_ids), dtype=bool)
    mask[rows] = True
    names = _genome_tag_names(data_dir, tag_ids)
    return RawBlock("genome", values, mask, str(path), names)


def _genome_tag_names(data_dir: Path, tag_ids: np.ndarray) -> list[str]:
    """Tag names from genome-tags.csv when present (only for readability of blocks.json)."""
    path = data_dir / "genome-tags.csv"
    if not path.is_file():
        return [f"tag{t}" for t in tag_ids]
    names = pd.read_csv(path).set_index("tagId")["tag"]
    return [str(names.get(t, f"tag{t}")) for t in tag_ids]


def normalise_tags(tags: pd.Series) -> pd.Series:
    """Lower-case, trim and collapse whitespace: 'Will  Ferrell ' and 'will ferrell' are one tag."""
    return tags.astype(str).str.lower().str.strip().str.replace(r"\s+", " ", regex=True)


@dataclass(frozen=True)
class HeldOut:
    """Each prepared user's held-out events, which no item feature may see (leave-one-out, modules.split).

    user_ids (U,) int64 sorted; valid_time (U,) the timestamp of the user's validation event;
    valid_movie, test_movie (U,) movieIds of the validation and test targets; cold_movies (C,) sorted
    movieIds of the cold-start items (prepare --cold), on which no user activity is known at training time.
    """

    user_ids: np.ndarray
    valid_time: np.ndarray
    valid_movie: np.ndarray
    test_movie: np.ndarray
    cold_movies: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def of_run(cls, run: Path, movie_ids: np.ndarray) -> "HeldOut":
        inter = load_interactions(run)
        split = leave_one_out(inter.offsets)
        order = np.argsort(inter.user_ids, kind="stable")
        return cls(inter.user_ids[order], inter.timestamps[split.valid_pos][order],
                   movie_ids[inter.item_index[split.valid_pos]][order], movie_ids[inter.item_index[split.test_pos]][order],
                   run_cold_movies(run))

    def training_only(self, user: np.ndarray, movie: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
        """(E,) bool: user activity (a tag, say) that could be known at training time.

        Kept: activity of users outside the split, and a prepared user's activity strictly before their
        validation event on movies other than their two held-out targets; never any activity on a cold item.
        """
        warm_movie = ~np.isin(movie, self.cold_movies)
        if len(self.user_ids) == 0:
            return warm_movie
        row = np.clip(np.searchsorted(self.user_ids, user), 0, len(self.user_ids) - 1)
        known = self.user_ids[row] == user
        before = timestamp < self.valid_time[row]
        other_movie = (movie != self.valid_movie[row]) & (movie != self.test_movie[row])
        return warm_movie & (~known | (before & other_movie))


def tags_block(data_dir: Path, movie_ids: np.ndarray, vocabulary_size: int = 512,
               min_movies_per_tag: int = 2, held_out: HeldOut | None = None) -> RawBlock:
    """TF-IDF over the `vocabulary_size` user tags applied to the most movies (tags.csv).

    tf = log(1 + number of users who applied the tag to the movie); idf = log(M / df) with M the number
    of tagged movies; rows L2-normalised. Movies with none of the vocabulary's tags are masked.
    held_out: the run's validation/test events; a tag that a user applied at or after their validation
    event, or to one of their held-out movies, is dropped (`HeldOut.training_only`), so that no held-out
    event shapes an item's features. None keeps every tag (only for data without a split).
    """
    path = _require_source(data_dir / "tags.csv", "tags", "Every MovieLens release has tags.csv; check --data.")
    columns_needed = ["movieId", "tag"] + (["userId", "timestamp"] if held_out is not None else [])
    types = {"movieId": pa.int64(), "tag": pa.string(), "userId": pa.int64(), "timestamp": pa.int64()}
    with open(path, encoding="utf-8") as handle:
        header = [c.strip().strip('"') for c in handle.readline().strip("\r\n").split(",")]
    missing = [c for c in columns_needed if c not in header]
    if missing:
        raise ArtifactError(f"{path}: column(s) {missing} missing (header {header}); MovieLens tags.csv has "
                            "userId,movieId,tag,timestamp. Re-extract it from the release zip.")
    table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
        column_types={c: types[c] for c in columns_needed}, include_columns=columns_needed))
    frame = table.to_pandas()
    source = str(path)
    if held_out is not None:
        keep = held_out.training_only(frame["userId"].to_numpy(), frame["movieId"].to_numpy(),
                                      frame["timestamp"].to_numpy())
        log.info("tags.csv: %d of %d tag applications kept; %d dropped (applied at or after the user's validation "
                 "event, or to a held-out movie)", int(keep.sum()), len(keep), int((~keep).sum()))
        source = f"{path} (training-time tags only: {int(keep.sum())} of {len(keep)} kept)"
        frame = frame[keep]
    frame["tag"] = normalise_tags(frame["tag"].fillna(""))
    frame = frame[frame["tag"] != ""]
    pairs = frame.groupby(["movieId", "tag"], sort=False).size().rename("count").reset_index()
    # Document frequency, most frequent first, ties in order of first appearance in tags.csv: an explicit
    # stable order (pandas' value_counts leaves ties to its implementation; on ml-latest-small a quarter of the
    # vocabulary ties at the cutoff).
    doc_freq = pairs.groupby("tag", sort=False).size()
    doc_freq = doc_freq.iloc[np.argsort(-doc_freq.to_numpy(), kind="stable")]
    doc_freq = doc_freq[doc_freq >= min_movies_per_tag].head(vocabulary_size)
    vocabulary = pd.Index(doc_freq.index)
    pairs = pairs[pairs["tag"].isin(vocabulary)]
    rows = _rows_of(movie_ids, pairs["movieId"].to_numpy(), path)
    columns = vocabulary.get_indexer(pairs["tag"])
    n_tagged = max(frame["movieId"].nunique(), 1)
    idf = np.log(n_tagged / doc_freq.to_numpy(np.float64)).astype(np.float32)
    values = np.zeros((len(movie_ids), len(vocabulary)), dtype=np.float32)
    values[rows, columns] = np.log1p(pairs["count"].to_numpy(np.float32)) * idf[columns]
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    values = values / np.where(norms > 0, norms, 1.0)
    mask = np.zeros(len(movie_ids), dtype=bool)
    mask[rows] = True
    return RawBlock("tags", values, mask, source, [str(t) for t in vocabulary])


def collab_block(run: Path, movie_ids: np.ndarray, dims: int = 64, window: int | None = 50,
                 shift: float = 1.0) -> RawBlock:
    """Collaborative item vectors (N, dims) from the run's training events (`modules.collab.pmi_svd`).

    Training events are each user's leave-one-out training range [start, validation) of interactions.npz, the
    events the decoder trains on: no validation or test target, nothing after it. Events on a cold-start item
    (RUN/cold_items.npy) are dropped too (a cold split's interactions.npz holds none; this guards the rule).
    Items without a training co-occurrence are masked: cold items, items seen only as held-out targets.
    """
    inter = load_interactions(run)
    train = training_event_mask(leave_one_out(inter.offsets), len(inter.item_index))
    on_cold = np.isin(movie_ids[inter.item_index], run_cold_movies(run))
    keep = train & ~on_cold
    user_row = np.repeat(np.arange(inter.n_users), np.diff(inter.offsets))
    try:
        vectors, has_vector = pmi_svd(user_row[keep], inter.item_index[keep], len(movie_ids), dims, window, shift)
    except ValueError as err:
        raise ValueError(f"block 'collab' of {Path(run) / INTERACTIONS_FILE}: {err} (ML25MItemData.collab_dims, "
                         f"collab_window, collab_shift).") from err
    log.info("collab: %d of %d events used (%d validation/test events and %d on cold items left out); %d of %d "
             "items have a vector", int(keep.sum()), len(keep), int((~train).sum()), int((train & on_cold).sum()),
             int(has_vector.sum()), len(movie_ids))
    source = (f"{Path(run) / INTERACTIONS_FILE} (leave-one-out training events only, cold items excluded; "
              f"window {window}, shift {shift}, SPPMI SVD)")
    return RawBlock("collab", vectors, has_vector, source, [f"collab{k}" for k in range(dims)])


def load_poster_features(poster_dir: Path, movie_ids: np.ndarray) -> RawBlock:
    """Poster embeddings of step 4, realigned to `movie_ids` by movieId.

    A file whose movie_ids are a permutation of the run's ids is reordered (and logged); any other
    mismatch (missing, extra or duplicate ids, length) is an error. Rows with has_poster False carry no
    real feature: only the mask is trusted for them.
    """
    poster_dir = _require_poster_files(poster_dir)
    features = np.load(poster_dir / "features.npy", mmap_mode="r")
    poster_ids = np.load(poster_dir / "movie_ids.npy")
    has_poster = np.load(poster_dir / "has_poster.npy")
    if features.ndim != 2 or len(features) != len(poster_ids) or has_poster.shape != poster_ids.shape:
        raise ArtifactError(f"{poster_dir}: features.npy {features.shape}, movie_ids.npy {poster_ids.shape} and "
                            f"has_poster.npy {has_poster.shape} disagree; re-run {POSTER_SCRIPT} with --overwrite.")
    if has_poster.dtype != bool:
        raise ArtifactError(f"{poster_dir / 'has_poster.npy'} must be bool, got {has_poster.dtype}; "
                            f"re-run {POSTER_SCRIPT} with --overwrite.")
    order = _realign(poster_ids, movie_ids, poster_dir / "movie_ids.npy")
    features = np.asarray(features[order], dtype=np.float32)
    has_poster = has_poster[order]
    check_aligned(poster_ids[order], movie_ids, poster_dir / "movie_ids.npy", POSTER_SCRIPT)
    features[~has_poster] = 0.0  # never read: standardisation and PCA use the mask
    if not np.isfinite(features[has_poster]).all():
        raise ArtifactError(f"{poster_dir / 'features.npy'} holds NaN/inf for items with has_poster True; "
                            f"re-run {POSTER_SCRIPT} with --overwrite.")
    meta = json.loads((poster_dir / "meta.json").read_text())
    source = f"{poster_dir} ({meta.get('backbone', '?')}, {features.shape[1]}-d)"
    return RawBlock("poster", features, has_poster.astype(bool), source, [])


def _require_poster_files(poster_dir: str | os.PathLike | None) -> Path:
    """The poster feature folder of step 4, once every file of it exists; errors say how to make it."""
    if poster_dir is None:
        raise ArtifactError("block 'poster' was asked for but no poster feature folder was given: set "
                            "ML25MItemData.poster_feature_path or pass --posters-features RUN/poster_features.")
    poster_dir = Path(poster_dir)
    for name in POSTER_FILES:
        _require_source(poster_dir / name, "poster", f"Run {POSTER_SCRIPT} first (or pass --posters-features DIR).")
    return poster_dir


def poster_features_record(poster_dir: str | os.PathLike | None, allow_random_weights: bool = False) -> dict:
    """What blocks.json records about step 4's features (path, backbone, weights, dim, image size), from its
    meta.json. Features of a randomly initialised backbone are refused unless `allow_random_weights`: they
    encode colour statistics through a random network, not what a poster shows."""
    poster_dir = _require_poster_files(poster_dir)
    meta_path = poster_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    record = {"path": str(poster_dir), **{key: meta.get(key) for key in ("backbone", "weights", "dim", "image_size")}}
    if has_random_weights(record) and not allow_random_weights:
        raise ArtifactError(
            f"{meta_path} says field 'weights' = {record['weights']!r}: these poster features come from a "
            f"randomly initialised {record['backbone']} (step 4 ran with --weights none), so the 'poster' block "
            f"would be noise. Re-extract them with real weights: {POSTER_SCRIPT} --run RUN --posters DIR "
            f"--overwrite, with the default efficientnet_lite0 weights or --weights-path FILE. To fuse them "
            f"anyway (speed tests only), pass --allow-random-poster-weights to {FUSE_SCRIPT} or set "
            f"ML25MItemData.allow_random_poster_weights = True.")
    return record


def has_random_weights(poster_record: dict | None) -> bool:
    """Whether a `poster_features_record` (or blocks.json's "poster_features") is of a random-weight backbone."""
    return poster_record is not None and str(poster_record.get("weights")).startswith(RANDOM_POSTER_WEIGHTS)


def _warn_random_weights(poster_record: dict | None) -> None:
    if has_random_weights(poster_record):
        log.warning("the poster block holds features of a RANDOMLY INITIALISED %s (%s/meta.json), allowed by "
                    "allow_random_poster_weights: it carries no learned image content.", poster_record["backbone"],
                    poster_record["path"])


def _realign(ids: np.ndarray, expected: np.ndarray, path: Path) -> np.ndarray:
    """Row order that maps `ids` onto `expected`; identity when already aligned, error unless a permutation."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == len(expected) and np.array_equal(ids, expected):
        return np.arange(len(ids))
    if len(ids) != len(expected) or len(np.unique(ids)) != len(ids) or \
            not np.array_equal(np.sort(ids), np.sort(expected)):
        check_aligned(ids, expected, path, POSTER_SCRIPT)  # not a permutation: raises naming the first bad row
        raise ArtifactError(f"{path} is not a permutation of the run's item_ids.npy; re-run {POSTER_SCRIPT}.")
    log.info("%s lists the run's movieIds in another order: realigning rows by movieId.", path)
    sorter = np.argsort(ids)
    return sorter[np.searchsorted(ids, expected, sorter=sorter)]


def text_block(items: pd.DataFrame, tmdb_details: str | os.PathLike | None, n_cast: int,
               cache_dir: str | os.PathLike) -> RawBlock:
    """all-MiniLM-L6-v2 embedding (384-d) of each movie's TMDB text (experiments/item_text.py); movies without
    a details record, or with an empty one, are masked (has_text False)."""
    values, mask, source = item_text.text_features(items, _require_tmdb_details(tmdb_details), n_cast, cache_dir)
    return RawBlock("text", values, mask, source, [])


def _require_tmdb_details(path: str | os.PathLike | None) -> Path:
    """The details.jsonl the 'text' block reads; errors say how to pass one."""
    if path is None:
        raise ArtifactError(f"block 'text' was asked for but no TMDB details file was given: set "
                            f"ML25MItemData.tmdb_details = 'DATA/tmdb/details.jsonl' in the gin file or pass "
                            f"--tmdb-details FILE to {FUSE_SCRIPT} ({item_text.DETAILS_HELP}). Or drop 'text' "
                            f"from ML25MItemData.blocks / --blocks.")
    return _require_source(Path(path), "text", f"Pass --tmdb-details FILE ({item_text.DETAILS_HELP}).")


# ----------------------------------------------------------------------------------------------------
# Fusion
# ----------------------------------------------------------------------------------------------------

def fuse_block(raw: RawBlock, weight: float, pca_dims: int | None,
               standardisation: str = "column") -> tuple[np.ndarray, dict]:
    """Standardise ('column' or 'block'), optionally PCA-reduce, add the mask column and scale one block.

    Returns (columns (N, d [+1]) float32, facts for BlockInfo).
    """
    mask = raw.mask
    if standardisation not in ("column", "block"):
        raise ValueError(f"standardisation of block {raw.name} must be 'column' or 'block', got {standardisation!r}.")
    values = standardise(raw.values, mask) if standardisation == "column" else centre_and_scale(raw.values, mask)
    explained = None
    if pca_dims and pca_dims < values.shape[1]:
        values, ratios = pca(values, pca_dims, mask)
        explained = float(ratios.sum())
        # One scalar for the whole block keeps the components' relative variances (whitening would
        # blow noise directions up to the size of the leading ones); mean column variance becomes 1.
        present = values if mask is None else values[mask]
        values = values / max(float(np.sqrt(present.var(axis=0).mean())), 1e-6)
        if mask is not None:
            values[~mask] = 0.0
    width = values.shape[1]
    if mask is not None:
        # The mask column tells the model "no block here" instead of letting 0 pass for real data.
        values = np.concatenate([values, standardise(mask.astype(np.float32)[:, None])], axis=1)
    scale = block_scale(weight, values.shape[1])
    facts = dict(feature_width=width, scale=scale, standardisation=standardisation,
                 pca_dims=int(width) if explained is not None else None, pca_explained_variance=explained)
    return (values * scale).astype(np.float32), facts


@gin.configurable
class ML25MItemData:
    """Fused item features of one run, aligned with its item_ids.npy (the design's `ML25MItemData`).

    Args:
        root: MovieLens data folder (tags.csv, genome-scores.csv).
        poster_feature_path: folder written by step 4 (`<run>/poster_features`); needed for 'poster'.
        run: run folder (items.csv, item_ids.npy).
        blocks: block names to fuse, from BLOCK_NAMES.
        block_weights: {name: weight}; missing names use DEFAULT_WEIGHTS.
        pca_dims: {name: dims} for blocks reduced by PCA (e.g. {'poster': 64}).
        standardisation: {name: 'column' | 'block'}; missing names use DEFAULT_STANDARDISATION.
        tag_vocabulary: number of user tags in the TF-IDF vocabulary.
        min_movies_per_tag: a tag must be applied to at least this many movies to enter the vocabulary.
        dataset_name: label stored in blocks.json.
        allow_random_poster_weights: fuse poster features that step 4 extracted with random weights
            (`--weights none`); refused by default, since they carry no learned image content.
        collab_dims: width of the 'collab' block (SVD rank).
        collab_window: two training events of a user co-occur when at most this many positions apart (None:
            every pair of the user's items; too slow at ML-25M, where users have thousands of ratings).
        collab_shift: PMI shift k (log k subtracted before clipping at 0; 1 is plain PPMI).
        tmdb_details: TMDB details.jsonl (DATA/tmdb/details.jsonl); needed for 'text'.
        text_cast: top-billed cast names in each movie's text (experiments/item_text.py template).
        text_cache: folder of the content-addressed text embedding cache (default `<run>/text_cache`); point
            several runs at one folder to share it.

    After construction: `features` (N, F) float32, `movie_ids` (N,) int64, `blocks` (list of BlockInfo).
    """

    def __init__(self, root: str | os.PathLike, poster_feature_path: str | os.PathLike | None = None, *,
                 run: str | os.PathLike | None = None, blocks=("genres", "year", "tags", "poster"),
                 block_weights: dict | None = None, pca_dims: dict | None = None,
                 standardisation: dict | None = None, tag_vocabulary: int = 512,
                 min_movies_per_tag: int = 2, dataset_name: str = "movielens",
                 allow_random_poster_weights: bool = False, collab_dims: int = 64, collab_window: int | None = 50,
                 collab_shift: float = 1.0, tmdb_details: str | os.PathLike | None = None,
                 text_cast: int = item_text.DEFAULT_CAST, text_cache: str | os.PathLike | None = None):
        if run is None:
            raise ValueError("ML25MItemData needs run=<run folder> (items.csv and item_ids.npy of step 2).")
        check_block_names(blocks, block_weights, pca_dims, standardisation)
        self.root, self.run = Path(root), Path(run)
        self.poster_feature_path = Path(poster_feature_path) if poster_feature_path else None
        self.block_names = list(blocks)
        self.weights = {**DEFAULT_WEIGHTS, **(block_weights or {})}
        self.pca_dims = dict(pca_dims or {})
        self.standardisation = {**DEFAULT_STANDARDISATION, **(standardisation or {})}
        self.tag_vocabulary, self.min_movies_per_tag = tag_vocabulary, min_movies_per_tag
        self.dataset_name = dataset_name
        self.collab_dims, self.collab_window, self.collab_shift = collab_dims, collab_window, collab_shift
        self.tmdb_details, self.text_cast = tmdb_details, text_cast
        self.text_cache = Path(text_cache) if text_cache else self.run / TEXT_CACHE_DIR
        self.poster_features = poster_features_record(self.poster_feature_path, allow_random_poster_weights) \
            if "poster" in self.block_names else None
        _warn_random_weights(self.poster_features)
        self.items = load_items(self.run)
        self.movie_ids = load_item_ids(self.run)
        self.features, self.blocks = self._fuse()

    def _raw_block(self, name: str) -> RawBlock:
        """Build one block from its source."""
        if name == "genres":
            return genres_block(self.items)
        if name == "year":
            return year_block(self.items)
        if name == "tags":
            return tags_block(self.root, self.movie_ids, self.tag_vocabulary, self.min_movies_per_tag,
                              HeldOut.of_run(self.run, self.movie_ids))
        if name == "genome":
            return genome_block(self.root, self.movie_ids, run_cold_movies(self.run))
        if name == "poster":
            return load_poster_features(self.poster_feature_path, self.movie_ids)
        if name == "collab":
            return collab_block(self.run, self.movie_ids, self.collab_dims, self.collab_window, self.collab_shift)
        return text_block(self.items, self.tmdb_details, self.text_cast, self.text_cache)

    def _fuse(self) -> tuple[np.ndarray, list[BlockInfo]]:
        """Build, fuse and concatenate the blocks in the configured order."""
        parts, infos, start = [], [], 0
        for name in self.block_names:
            started = time.perf_counter()
            raw = self._raw_block(name)
            if len(raw.values) != len(self.movie_ids):
                raise AssertionError(f"block {name} has {len(raw.values)} rows, expected {len(self.movie_ids)}")
            columns, facts = fuse_block(raw, self.weights[name], self.pca_dims.get(name), self.standardisation[name])
            n_with = len(self.movie_ids) if raw.mask is None else int(raw.mask.sum())
            stop = start + columns.shape[1]
            info = BlockInfo(name=name, columns=(start, stop), feature_columns=(start, start + facts["feature_width"]),
                             mask_column=stop - 1 if raw.mask is not None else None, weight=float(self.weights[name]),
                             scale=facts["scale"], standardisation=facts["standardisation"], n_items_with_block=n_with,
                             n_items_without_block=len(self.movie_ids) - n_with, source=raw.source,
                             input_dims=int(raw.values.shape[1]), pca_dims=facts["pca_dims"],
                             pca_explained_variance=facts["pca_explained_variance"])
            log.info("block %-6s %5d columns [%d, %d), %d/%d items have it (%d get the neutral value and a mask "
                     "bit), weight %.2f, %.1fs", name, stop - start, start, stop, n_with, len(self.movie_ids),
                     info.n_items_without_block, info.weight, time.perf_counter() - started)
            parts.append(columns)
            infos.append(info)
            start = stop
        return np.concatenate(parts, axis=1).astype(np.float32), infos

    def __getitem__(self, index):
        return self.features[index]

    def __len__(self) -> int:
        return len(self.features)

    def metadata(self, fingerprint: dict | None = None) -> dict:
        """The content of blocks.json; `fingerprint` (of `fuse_item_features`) is stored under that key."""
        meta = {"dataset": self.dataset_name, "data_dir": str(self.root), "n_items": len(self.movie_ids),
                "n_features": int(self.features.shape[1]), "blocks": [asdict(b) for b in self.blocks]}
        if self.poster_features is not None:
            meta["poster_features"] = self.poster_features
        if fingerprint is not None:
            meta["fingerprint"] = fingerprint
        return meta

    def save(self, out_dir: str | os.PathLike, fingerprint: dict | None = None) -> Path:
        """Write features.npy, movie_ids.npy, then blocks.json (the completion marker) to out_dir."""
        out_dir = Path(out_dir)
        save_npy(out_dir / "features.npy", self.features)
        save_npy(out_dir / "movie_ids.npy", self.movie_ids)
        save_json(out_dir / "blocks.json", self.metadata(fingerprint))
        return out_dir


def check_block_names(blocks, block_weights: dict | None, pca_dims: dict | None, standardisation: dict | None) -> None:
    """ValueError unless `blocks` are distinct names from BLOCK_NAMES and the per-block dicts use such names."""
    unknown = [b for b in blocks if b not in BLOCK_NAMES]
    if unknown or not blocks or len(set(blocks)) != len(blocks):
        raise ValueError(f"ML25MItemData.blocks={list(blocks)}: use distinct names from {list(BLOCK_NAMES)}"
                         + (f" (unknown: {unknown})" if unknown else "") + ".")
    bad_weights = [k for k in (block_weights or {}) if k not in BLOCK_NAMES]
    bad_pca = [k for k in {**(pca_dims or {}), **(standardisation or {})} if k not in BLOCK_NAMES]
    if bad_weights or bad_pca:
        raise ValueError(f"unknown block names in block_weights {bad_weights} / pca_dims or standardisation "
                         f"{bad_pca}; use names from {list(BLOCK_NAMES)}.")


def gin_effective_parameters(configurable, name: str) -> dict:
    """The arguments a call of `configurable` without explicit arguments gets: its signature defaults,
    overridden by the gin bindings of `name` (macros resolved). Parameters with neither are left out."""
    values = {key: parameter.default for key, parameter in inspect.signature(configurable).parameters.items()
              if parameter.default is not inspect.Parameter.empty}
    values.update(gin.get_bindings(name))
    return values


def fusion_settings(run: str | os.PathLike, overrides: dict) -> dict:
    """Every ML25MItemData argument of step 5: signature defaults < gin bindings < `overrides`."""
    settings = {**gin_effective_parameters(ML25MItemData, "ML25MItemData"), **overrides, "run": run}
    if settings.get("root") is None:
        raise ValueError("ML25MItemData needs root=<MovieLens data folder>: set ML25MItemData.root in the gin "
                         "file or pass --data.")
    check_block_names(settings["blocks"], settings["block_weights"], settings["pca_dims"], settings["standardisation"])
    return settings


def fusion_config(settings: dict) -> dict:
    """The operative part of `settings` for the fingerprint: per-block values of the chosen blocks only. Left
    out: every path (the run folder, the data folder, the poster features, the TMDB details, the text cache:
    the files they hold are inputs or are keyed by content, so `runs/x` and `runs/x/` or a moved folder
    fingerprint alike) and allow_random_poster_weights (it refuses or allows, and changes no feature)."""
    blocks = list(settings["blocks"])
    weights = {**DEFAULT_WEIGHTS, **(settings["block_weights"] or {})}
    standardisation = {**DEFAULT_STANDARDISATION, **(settings["standardisation"] or {})}
    pca_dims = settings["pca_dims"] or {}
    config = {"blocks": blocks, "dataset_name": settings["dataset_name"],
              "block_weights": {b: float(weights[b]) for b in blocks},
              "standardisation": {b: standardisation[b] for b in blocks},
              "pca_dims": {b: int(pca_dims[b]) for b in blocks if pca_dims.get(b)}}
    if "tags" in blocks:
        config.update(tag_vocabulary=int(settings["tag_vocabulary"]),
                      min_movies_per_tag=int(settings["min_movies_per_tag"]))
    if "collab" in blocks:
        window = settings["collab_window"]
        config.update(collab_dims=int(settings["collab_dims"]), collab_window=None if window is None else int(window),
                      collab_shift=float(settings["collab_shift"]))
    if "text" in blocks:  # template version, cast count, model; the details file itself is an input
        config["text"] = item_text.text_config(settings["text_cast"])
    return config


def fusion_inputs(settings: dict) -> dict[str, Path]:
    """Every file the chosen blocks read, by name; a missing one is an error naming the step that writes it."""
    run, root, blocks = Path(settings["run"]), Path(settings["root"]), settings["blocks"]
    inputs = {ITEMS_FILE: run / ITEMS_FILE, ITEM_IDS_FILE: run / ITEM_IDS_FILE}
    if "tags" in blocks or "collab" in blocks:  # the held-out events (and collab's training events)
        inputs[INTERACTIONS_FILE] = run / INTERACTIONS_FILE
    if {"tags", "genome", "collab"} & set(blocks) and (run / COLD_ITEMS_FILE).is_file():
        inputs[COLD_ITEMS_FILE] = run / COLD_ITEMS_FILE   # no user activity on a cold item reaches a feature
    for name, path in inputs.items():
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: run {PREPARE_SCRIPT} first.")
    if "tags" in blocks:
        inputs["tags.csv"] = _require_source(root / "tags.csv", "tags", "Every MovieLens release has tags.csv; "
                                                                        "check --data.")
    if "genome" in blocks:
        inputs["genome-scores.csv"] = _require_source(root / "genome-scores.csv", "genome", "Only ML-25M (and "
                                                      "ML-20M) ship a tag genome; ml-latest-small has none.")
        if (root / "genome-tags.csv").is_file():  # only names the columns in blocks.json
            inputs["genome-tags.csv"] = root / "genome-tags.csv"
    if "poster" in blocks:
        poster_dir = _require_poster_files(settings["poster_feature_path"])
        inputs |= {f"poster_features/{name}": poster_dir / name for name in POSTER_FILES}
    if "text" in blocks:
        inputs["tmdb_details"] = _require_tmdb_details(settings["tmdb_details"])
    return inputs


def fuse_item_features(run: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                       overwrite: bool = False, **overrides) -> dict:
    """Run step 5 with the gin-bound ML25MItemData (plus keyword overrides); return blocks.json content.

    A finished output (out_dir/blocks.json) is reused only when it records the current fingerprint: the same
    settings (`fusion_config`) and the same input files (`fusion_inputs`). One made otherwise raises
    StaleOutputError saying what changed, unless `overwrite`, which rebuilds it.
    """
    out_dir = Path(out_dir) if out_dir else Path(run) / OUTPUT_DIR
    marker = out_dir / "blocks.json"
    settings = fusion_settings(run, overrides)
    if "poster" in settings["blocks"]:  # refused on every call, also when the output is finished
        poster_features_record(settings["poster_feature_path"], settings["allow_random_poster_weights"])
    current = fingerprint(fusion_config(settings), fusion_inputs(settings))
    if not overwrite:
        done = reuse_finished(marker, current, redo=FUSE_REDO)
        if done is not None:
            log.info("%s was made from the same inputs and config: skipping (pass --overwrite to rebuild).", marker)
            _warn_random_weights(done.get("poster_features"))
            return done
    marker.unlink(missing_ok=True)  # written last: without it the folder is unfinished
    data = ML25MItemData(**settings)
    data.save(out_dir, current)
    log.info("wrote %s: %d items x %d features", out_dir, *data.features.shape)
    return data.metadata(current)


def load_item_features(features_dir: str | os.PathLike, run: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """features (N, F) float32 and blocks.json of step 5, checked against the run's item_ids.npy."""
    features_dir = Path(features_dir)
    meta = load_json(features_dir / "blocks.json", FUSE_SCRIPT)
    for name in ("features.npy", "movie_ids.npy"):
        if not (features_dir / name).is_file():
            raise ArtifactError(f"{features_dir / name} is missing: re-run {FUSE_SCRIPT} with --overwrite.")
    features = np.load(features_dir / "features.npy")
    check_aligned(np.load(features_dir / "movie_ids.npy"), load_item_ids(run), features_dir / "movie_ids.npy",
                  FUSE_SCRIPT)
    if features.dtype != np.float32 or features.ndim != 2 or len(features) != meta["n_items"] \
            or features.shape[1] != meta["n_features"]:
        raise ArtifactError(f"{features_dir / 'features.npy'} is {features.dtype} {features.shape} but blocks.json "
                            f"says {meta['n_items']} x {meta['n_features']} float32; re-run {FUSE_SCRIPT} --overwrite.")
    if not np.isfinite(features).all():
        raise ArtifactError(f"{features_dir / 'features.npy'} holds NaN/inf; re-run {FUSE_SCRIPT} --overwrite.")
    return features, meta
