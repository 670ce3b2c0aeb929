"""Read a MovieLens-format folder, validate it, and write the run's item table and user histories.

`prepare_interactions(data_dir, run_dir)` is the whole step; see docs/pipeline.md for the outputs.
CSV parsing uses pyarrow (multi-threaded C++), everything after it is vectorised numpy: ML-25M's
25M ratings prepare in well under a minute (bench/bench_prepare.py).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from experiments.artifacts import (COLD_FILE, COLD_ITEMS_FILE, INTERACTIONS_FILE, ITEM_IDS_FILE, ITEMS_FILE,
                                   STATS_FILE, atomic_path, file_digest, load_json, save_json, save_npy, save_npz)
from modules.cold_start import choose_cold_items, cold_labels, split_cold
from modules.hashing import pair_hash
from modules.kcore import kcore_mask
from modules.split import tied_with_previous

log = logging.getLogger(__name__)

RATING_RANGE = (0.5, 5.0)  # MovieLens stars; ml-1m uses whole stars 1..5, inside the same range.
_YEAR_RE = r"\((\d{4})(?:\s*[-\u2013]\s*\d{0,4})?\)\s*$"  # "Title (1995)", also "Series (2007-)"


class MovieLensFormatError(ValueError):
    """The input folder is not valid MovieLens format; the message names the file, row/column and fix."""


@dataclass(frozen=True)
class PrepareConfig:
    """Filtering settings; stored in stats.json so a rerun with other settings is detected."""

    min_user_interactions: int = 5
    min_item_interactions: int = 0
    tie_break: str = "hash"   # order inside a timestamp tie: TIE_BREAKS
    cold_fraction: float = 0.0   # share of the rated items held out as cold (0: no cold-start split)
    cold_seed: int = 0


# ----------------------------------------------------------------------------------------------------
# Reading and validating CSVs
# ----------------------------------------------------------------------------------------------------

def _require_file(data_dir: Path, name: str) -> Path:
    path = data_dir / name
    if not path.is_file():
        raise MovieLensFormatError(
            f"{path} is missing. A MovieLens folder needs movies.csv, ratings.csv and links.csv: download one with "
            f"`python experiments/01_download_movielens.py --release ml-25m`, or point DATA at an extracted release.")
    return path


# ml-1m (and ml-10m) ship '::'-separated .dat files without a header or links.csv.
DAT_COLUMNS = {"movies": ["movieId", "title", "genres"], "ratings": ["userId", "movieId", "rating", "timestamp"]}


def _locate(data_dir: Path, stem: str) -> Path:
    """`<stem>.csv`, or the older `<stem>.dat` format when only that exists."""
    csv_path, dat_path = data_dir / f"{stem}.csv", data_dir / f"{stem}.dat"
    if not csv_path.is_file() and dat_path.is_file():
        return dat_path
    return _require_file(data_dir, csv_path.name)


def _read_table(path: Path, column_types: dict[str, pa.DataType]) -> pa.Table:
    """Read a MovieLens CSV, or a '::'-separated .dat file (latin-1), checking columns and types."""
    if path.suffix != ".dat":
        return _read_csv(path, column_types)
    text = path.read_bytes().decode("latin-1").replace("::", "\t").encode()
    try:
        return pacsv.read_csv(pa.BufferReader(text), read_options=pacsv.ReadOptions(
            column_names=DAT_COLUMNS[path.stem]), parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types=column_types, include_columns=list(column_types)))
    except pa.ArrowInvalid as err:
        raise MovieLensFormatError(f"{path}: not a valid '::'-separated MovieLens file ({err}). Re-extract it "
                                   "from the release zip.") from None


def _read_csv(path: Path, column_types: dict[str, pa.DataType]) -> pa.Table:
    """Read `path` with pyarrow, checking the header and the type of every column we need."""
    header = _header(path)
    missing = [c for c in column_types if c not in header]
    if missing:
        raise MovieLensFormatError(f"{path}: column(s) {missing} missing (header is {header}). "
                                   f"Expected the MovieLens header {list(column_types)}.")
    try:
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types=column_types, include_columns=list(column_types)))
    except pa.ArrowInvalid as err:
        raise _explain_conversion_error(path, column_types, err) from None


def _header(path: Path) -> list[str]:
    with open(path, "r", encoding="utf-8", newline="") as fh:
        first = fh.readline().strip("\r\n")
    return [c.strip().strip('"') for c in first.split(",")] if first else []


def _explain_conversion_error(path: Path, column_types: dict, err: Exception) -> MovieLensFormatError:
    """Turn pyarrow's conversion error into one naming the column and the first bad line (slow path)."""
    as_text = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
        column_types={c: pa.string() for c in column_types}, include_columns=list(column_types)))
    for column, dtype in column_types.items():
        if dtype == pa.string():
            continue
        values = pd.Series(as_text.column(column).to_pylist(), dtype="string")
        numeric = pd.to_numeric(values, errors="coerce")
        bad = np.flatnonzero(numeric.isna().to_numpy())
        if len(bad):
            row = int(bad[0])
            return MovieLensFormatError(
                f"{path}, line {row + 2}, column '{column}': {values.iloc[row]!r} is not a number "
                f"({len(bad)} such rows). Fix or delete those rows; MovieLens ids and timestamps are integers.")
    return MovieLensFormatError(f"{path}: could not parse ({err}).")


def read_movies(data_dir: Path) -> pd.DataFrame:
    """movies.csv joined with links.csv: one row per movie, sorted by movieId.

    Columns: movieId int64, tmdbId Int64, imdbId Int64, title string, year Int64, genres string.
    """
    movies_path = _locate(data_dir, "movies")
    movies = _read_table(movies_path, {"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()}).to_pandas()
    if movies.empty:
        raise MovieLensFormatError(f"{movies_path} has no rows.")
    dup = movies["movieId"].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise MovieLensFormatError(f"{movies_path}, line {row + 2}: movieId {movies['movieId'].iloc[row]} appears "
                                   "twice. Each movie must have exactly one row.")
    links = read_links(data_dir, movies_path)

    items = movies.merge(links, on="movieId", how="left").sort_values("movieId", kind="stable")
    items["title"] = items["title"].astype("string").str.strip()
    items["genres"] = items["genres"].astype("string")
    items["year"] = pd.to_numeric(items["title"].str.extract(_YEAR_RE, expand=False), errors="coerce").astype("Int64")
    return items[["movieId", "tmdbId", "imdbId", "title", "year", "genres"]].reset_index(drop=True)


def read_links(data_dir: Path, movies_path: Path) -> pd.DataFrame:
    """links.csv (movieId, imdbId, tmdbId). Releases in .dat format have none: ids are then unknown, said loudly."""
    links_path = data_dir / "links.csv"
    if movies_path.suffix == ".dat" and not links_path.is_file():
        log.warning("%s has no links.csv (a .dat release such as ml-1m): tmdbId/imdbId are unknown, so posters "
                    "cannot be downloaded by TMDB id for it.", data_dir)
        return pd.DataFrame({"movieId": pd.Series([], dtype="int64"), "imdbId": pd.Series([], dtype="Int64"),
                             "tmdbId": pd.Series([], dtype="Int64")})
    links = _read_csv(_require_file(data_dir, "links.csv"),
                      {"movieId": pa.int64(), "imdbId": pa.int64(), "tmdbId": pa.int64()}).to_pandas()
    return links.drop_duplicates("movieId").astype({"imdbId": "Int64", "tmdbId": "Int64"})


@dataclass(frozen=True)
class Ratings:
    """Raw ratings columns (E,) each, in file order."""

    user: np.ndarray       # int64 userId
    movie: np.ndarray      # int64 movieId
    rating: np.ndarray     # float32
    timestamp: np.ndarray  # int64


def read_ratings(data_dir: Path) -> Ratings:
    """ratings.csv as numpy columns, with ratings range-checked."""
    path = _locate(data_dir, "ratings")
    if path.stat().st_size == 0 or not _header(path):
        raise MovieLensFormatError(f"{path} is empty. It needs the header userId,movieId,rating,timestamp and "
                                   "one row per rating.")
    table = _read_table(path, {"userId": pa.int64(), "movieId": pa.int64(), "rating": pa.float32(),
                             "timestamp": pa.int64()})
    if table.num_rows == 0:
        raise MovieLensFormatError(f"{path} has a header but no ratings. Re-download or re-extract the release.")
    ratings = Ratings(*(table.column(c).to_numpy() for c in ("userId", "movieId", "rating", "timestamp")))
    lo, hi = RATING_RANGE
    bad = np.flatnonzero(~((ratings.rating >= lo) & (ratings.rating <= hi)))
    if len(bad):
        row = int(bad[0])
        raise MovieLensFormatError(f"{path}, line {row + 2}, column 'rating': {ratings.rating[row]} is outside "
                                   f"[{lo}, {hi}] ({len(bad)} such rows). Fix or delete those rows.")
    return ratings


# ----------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------

def movie_rows(item_ids: np.ndarray, movie: np.ndarray, ratings_path: Path) -> np.ndarray:
    """Map each event's movieId to its row in the sorted `item_ids`; unknown movieIds are an error."""
    if item_ids[-1] < 50_000_000:  # dense lookup table: one gather instead of a binary search per event
        lookup = np.full(int(max(item_ids[-1], movie.max())) + 1, -1, dtype=np.int32)
        lookup[item_ids] = np.arange(len(item_ids), dtype=np.int32)
        rows = lookup[np.clip(movie, 0, None)]
        rows[movie < 0] = -1
    else:
        rows = np.searchsorted(item_ids, movie).astype(np.int32)
        rows[(rows >= len(item_ids)) | (item_ids[np.minimum(rows, len(item_ids) - 1)] != movie)] = -1
    unknown = np.flatnonzero(rows < 0)
    if len(unknown):
        row = int(unknown[0])
        raise MovieLensFormatError(f"{ratings_path}, line {row + 2}: movieId {movie[row]} is not in "
                                   f"movies.csv ({len(unknown)} such rows). Use movies.csv from the same release.")
    return rows


TIE_BREAKS = ("hash", "movieid")
TIE_BREAK_KEY = 0x7469655F62726B  # fixed: the "hash" order is the same on every machine and every rerun


def tie_rank(user: np.ndarray, movie: np.ndarray, item_row: np.ndarray, n_items: int, tie_break: str) -> np.ndarray:
    """(E,) uint64 key ordering events inside a (userId, timestamp) tie.

    "movieid": the item row itself (movieId ascending), the order of published MovieLens numbers, which a
    sequence model can learn (the next movie of a tie always has a larger id). "hash": a keyed hash of
    (userId, movieId), deterministic but unrelated to either id's order; its rare collisions fall back to
    the item row, so the order stays a pure function of the data.
    """
    if tie_break == "movieid":
        return item_row.astype(np.uint64)
    if tie_break != "hash":
        raise ValueError(f"tie_break = {tie_break!r}: use one of {list(TIE_BREAKS)}.")
    item_bits = max(int(np.ceil(np.log2(max(n_items, 2)))), 1)
    top = pair_hash(user, movie, TIE_BREAK_KEY) >> np.uint64(item_bits)
    return (top << np.uint64(item_bits)) | item_row.astype(np.uint64)


def time_order(user: np.ndarray, timestamp: np.ndarray, item_row: np.ndarray, n_items: int,
               tie_key: np.ndarray | None = None) -> np.ndarray:
    """Permutation sorting events by (userId, timestamp, tie_key); tie_key defaults to the item row.

    For the item row (movieId order), when the three fields fit in 64 bits (ML-25M: 18 + 30 + 16 bits)
    they are packed into one uint64 key: a single radix-friendly argsort is ~15x faster than np.lexsort
    over three keys on 25M events. Another tie_key (uint64, `tie_rank`) is sorted first and (userId,
    timestamp) packed into a second, stable sort: the same order at twice the cost of one sort.
    """
    bits = [int(np.ceil(np.log2(int(v) + 1))) or 1 for v in
            (user.max() - user.min(), timestamp.max() - timestamp.min(), n_items - 1)]
    if tie_key is not None:
        if bits[0] + bits[1] > 64:
            return np.lexsort((tie_key, timestamp, user))
        by_tie = np.argsort(tie_key, kind="stable")
        key = (user[by_tie] - user.min()).astype(np.uint64) << np.uint64(bits[1])
        key |= (timestamp[by_tie] - timestamp.min()).astype(np.uint64)
        return by_tie[np.argsort(key, kind="stable")]
    if sum(bits) > 64:
        return np.lexsort((item_row, timestamp, user))
    key = (user - user.min()).astype(np.uint64) << np.uint64(bits[1] + bits[2])
    key |= (timestamp - timestamp.min()).astype(np.uint64) << np.uint64(bits[2])
    key |= item_row.astype(np.uint64)
    return np.argsort(key, kind="stable")


def build_histories(ratings: Ratings, item_ids: np.ndarray, config: PrepareConfig, ratings_path: Path):
    """Sort events into per-user time order, map movieIds to item rows, k-core filter.

    Returns (user_ids, offsets, item_index, timestamps, rating, n_dropped_users, n_dropped_events).
    Ties in timestamp are broken by `config.tie_break` (`tie_rank`), so the order is a pure function of the data.
    """
    item_index = movie_rows(item_ids, ratings.movie, ratings_path)
    tie_key = None if config.tie_break == "movieid" else tie_rank(ratings.user, ratings.movie, item_index,
                                                                  len(item_ids), config.tie_break)
    order = time_order(ratings.user, ratings.timestamp, item_index, len(item_ids), tie_key)
    user = ratings.user[order]
    item_index = item_index[order]
    timestamp = ratings.timestamp[order]
    # After the sort, duplicates of (userId, movieId, timestamp) are adjacent.
    same = (user[1:] == user[:-1]) & (item_index[1:] == item_index[:-1]) & (timestamp[1:] == timestamp[:-1])
    if same.any():
        row = int(order[np.flatnonzero(same)[0] + 1])
        raise MovieLensFormatError(
            f"{ratings_path}, line {row + 2}: the rating (userId={ratings.user[row]}, movieId={ratings.movie[row]}, "
            f"timestamp={ratings.timestamp[row]}) appears more than once ({int(same.sum())} duplicate rows). "
            "Remove the duplicates, e.g. pandas drop_duplicates(['userId','movieId','timestamp']).")
    user_start = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    user_code = np.repeat(np.arange(len(user_start)), np.diff(np.r_[user_start, len(user)]))
    keep = kcore_mask(user_code, item_index, len(item_ids), config.min_user_interactions,
                      config.min_item_interactions)
    kept_users = np.flatnonzero(np.bincount(user_code[keep], minlength=len(user_start)))
    lengths = np.bincount(user_code[keep], minlength=len(user_start))[kept_users]
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    return (user[user_start][kept_users].astype(np.int64), offsets, item_index[keep], timestamp[keep],
            ratings.rating[order][keep], len(user_start) - len(kept_users), int((~keep).sum()))


def sequence_stats(offsets: np.ndarray, n_items: int, item_index: np.ndarray) -> dict:
    """Counts, density and history-length percentiles for stats.json."""
    lengths = np.diff(offsets)
    n_users, n_events = len(lengths), int(offsets[-1])
    pct = {f"p{p}": float(np.percentile(lengths, p)) for p in (5, 25, 50, 75, 95)} if n_users else {}
    return {
        "users": n_users,
        "items": n_items,
        "interactions": n_events,
        "items_with_interactions": int(len(np.unique(item_index))),
        "density": n_events / (n_users * n_items) if n_users else 0.0,
        "history_length": {"min": int(lengths.min()) if n_users else 0, **pct,
                           "max": int(lengths.max()) if n_users else 0,
                           "mean": float(lengths.mean()) if n_users else 0.0},
    }


def tied_events(user_ids: np.ndarray, offsets: np.ndarray, timestamps: np.ndarray) -> dict:
    """Share of all events, and of the test targets, that tie in timestamp with the user's previous event."""
    tied = tied_with_previous(offsets, timestamps, np.arange(int(offsets[-1])))
    return {"all": float(tied.mean()) if len(tied) else 0.0,
            "test_targets": float(tied[offsets[1:] - 1].mean()) if len(user_ids) else 0.0}


def hold_out_cold(user_ids, offsets, item_index, timestamps, rating, n_items: int, fraction: float, seed: int):
    """Hold a seeded `fraction` of the rated items out as cold (modules.cold_start.split_cold).

    Returns (cold, warm arrays): cold holds the halves' item rows, the examples of each half
    (valid_/test_ user_row, end, target) and a "stats" dict; the warm arrays are the histories without any
    event on a cold item, less the users left with fewer than 3 events.
    """
    valid_items, test_items = choose_cold_items(np.unique(item_index), fraction, seed)
    split = split_cold(offsets, item_index, cold_labels(n_items, valid_items, test_items), timestamps=timestamps)
    warm = (user_ids[split.kept_users], split.offsets, item_index[split.keep], timestamps[split.keep],
            rating[split.keep])
    cold = {"valid_items": valid_items, "test_items": test_items}
    for half in ("valid", "test"):
        examples = getattr(split, half)
        cold |= {f"{half}_user_row": examples.user_row, f"{half}_end": examples.end, f"{half}_target": examples.target,
                 f"{half}_timestamp": examples.timestamp}
    cold["stats"] = {"fraction": fraction, "seed": seed, "n_cold_items": int(len(valid_items) + len(test_items)),
                     "n_valid_items": int(len(valid_items)), "n_test_items": int(len(test_items)),
                     "removed_events": split.n_cold_events, "dropped_users": int((~split.kept_users).sum()),
                     "n_valid_examples": len(split.valid), "n_test_examples": len(split.test),
                     "examples": "one per user and half: the user's first event on a cold item of that half, "
                                 "input = the user's warm events before it (at least one)"}
    log.info("cold start: %d items held out (%d validation, %d test), %d events removed, %d users left with < 3 "
             "events dropped; %d validation and %d test cold examples", cold["stats"]["n_cold_items"],
             len(valid_items), len(test_items), split.n_cold_events, cold["stats"]["dropped_users"],
             len(split.valid), len(split.test))
    return cold, warm


def save_cold_split(run_dir: Path, item_ids: np.ndarray, cold: dict | None) -> None:
    """Write cold_items.npy (movieIds) and cold.npz of `hold_out_cold`; with None remove them, so that a run
    re-prepared without --cold keeps no stale split."""
    if cold is None:
        for name in (COLD_ITEMS_FILE, COLD_FILE):
            (Path(run_dir) / name).unlink(missing_ok=True)
        return
    save_npy(Path(run_dir) / COLD_ITEMS_FILE, item_ids[np.sort(np.r_[cold["valid_items"], cold["test_items"]])])
    save_npz(Path(run_dir) / COLD_FILE, **{k: v for k, v in cold.items() if k != "stats"})


def _source_fingerprint(data_dir: Path) -> dict:
    """Size and SHA-1 of each input file: a re-extracted copy of the same data (new mtimes) still matches."""
    paths = (_locate(data_dir, "movies"), _locate(data_dir, "ratings"), data_dir / "links.csv")
    return {path.name: file_digest(path) for path in paths if path.is_file()}


def _same_source(recorded: dict, current: dict) -> bool:
    """Whether stats.json's recorded input files are the current ones (by size and SHA-1).

    Records of older versions hold size and mtime but no SHA-1: they are matched on size, and the
    log says so.
    """
    if recorded.keys() != current.keys():
        return False
    for name, now in current.items():
        then = recorded[name]
        if then.get("bytes") != now["bytes"]:
            return False
        if "sha1" not in then:
            log.warning("stats.json records %s without a content hash (older version): matched on size only", name)
        elif then["sha1"] != now["sha1"]:
            return False
    return True


def prepare_interactions(data_dir: str | Path, run_dir: str | Path, min_user_interactions: int = 5,
                         min_item_interactions: int = 0, overwrite: bool = False, tie_break: str = "hash",
                         cold_fraction: float = 0.0, cold_seed: int = 0) -> dict:
    """Write items.csv, item_ids.npy, interactions.npz and stats.json into `run_dir`; return the stats.

    tie_break: the order of events with the same (userId, timestamp), "hash" (default, unlearnable) or
    "movieid" (ascending, as in published MovieLens numbers); see `tie_rank`.
    cold_fraction > 0 holds that share of the rated items out as cold (`hold_out_cold`): interactions.npz
    then has no event on them, and cold_items.npy / cold.npz describe them and their examples.

    Skips (returning the saved stats) when stats.json exists for the same input files and settings.
    stats.json is written last, so its presence marks a complete step.
    """
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    if min_user_interactions < 3:
        raise ValueError(f"min_user_interactions={min_user_interactions}: leave-one-out needs at least 3 events per "
                         "user (train, validation, test).")
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break = {tie_break!r}: use one of {list(TIE_BREAKS)} (--tie-break).")
    if not 0.0 <= cold_fraction < 1.0:
        raise ValueError(f"cold fraction = {cold_fraction}: use a share in [0, 1), e.g. 0.05 (--cold, make COLD=).")
    config = PrepareConfig(min_user_interactions, min_item_interactions, tie_break, float(cold_fraction), int(cold_seed))
    stats_path = run_dir / STATS_FILE
    if stats_path.is_file() and not overwrite:
        previous = load_json(stats_path, "experiments/02_prepare_interactions.py")
        # Records of older versions lack the newer settings: those had their default values then.
        previous["config"] = {**asdict(PrepareConfig()), **previous.get("config", {})}
        if previous.get("config") == asdict(config) and \
                _same_source(previous.get("source", {}).get("files", {}), _source_fingerprint(data_dir)):
            log.info("%s exists for the same inputs and settings: skipping (use --overwrite to redo).", stats_path)
            return previous
        changes = [f"{key}: {previous.get('config', {}).get(key, '<unset>')} -> {value}"
                   for key, value in asdict(config).items() if previous.get("config", {}).get(key) != value]
        recorded_files = previous.get("source", {}).get("files", {})
        changes += [f"input {name} changed" for name, digest in _source_fingerprint(data_dir).items()
                    if recorded_files.get(name, {}).get("sha1", digest["sha1"]) != digest["sha1"]
                    or recorded_files.get(name, {}).get("bytes") != digest["bytes"]]
        raise FileExistsError(f"{run_dir} holds a preparation of other inputs or settings ({stats_path}: "
                              f"{'; '.join(changes) or 'another set of input files'}). Use another RUN folder, or "
                              "--overwrite to replace it (and redo every later step).")
    started = time.perf_counter()
    items = read_movies(data_dir)
    item_ids = items["movieId"].to_numpy(np.int64)
    log.info("movies.csv: %d movies (%d without tmdbId)", len(items), int(items["tmdbId"].isna().sum()))
    ratings = read_ratings(data_dir)
    ratings_path = _locate(data_dir, "ratings")
    log.info("%s: %d ratings read in %.1fs", ratings_path.name, len(ratings.user), time.perf_counter() - started)
    user_ids, offsets, item_index, timestamps, rating, dropped_users, dropped_events = build_histories(
        ratings, item_ids, config, ratings_path)
    if len(user_ids) == 0:
        raise MovieLensFormatError(f"No user in {ratings_path} has {min_user_interactions} or more "
                                   "ratings: lower --min-user-interactions or use a larger dataset.")
    cold = None
    if cold_fraction > 0:
        cold, (user_ids, offsets, item_index, timestamps, rating) = hold_out_cold(
            user_ids, offsets, item_index, timestamps, rating, len(item_ids), cold_fraction, cold_seed)
    stats = {**sequence_stats(offsets, len(item_ids), item_index),
             "dropped_users": dropped_users, "dropped_interactions": dropped_events,
             "movies_without_tmdb_id": int(items["tmdbId"].isna().sum()),
             "movies_without_year": int(items["year"].isna().sum()),
             "tie_break": tie_break,
             "tied_events": tied_events(user_ids, offsets, timestamps),
             "split": "leave-one-out: last event = test, second last = validation, rest = train",
             "cold": None if cold is None else cold["stats"],
             "config": asdict(config),
             "source": {"data_dir": str(data_dir.resolve()), "files": _source_fingerprint(data_dir)},
             "seconds": None}
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / ITEMS_FILE) as tmp:
        items.to_csv(tmp, index=False)
    save_npy(run_dir / ITEM_IDS_FILE, item_ids)
    save_npz(run_dir / INTERACTIONS_FILE, user_ids=user_ids, offsets=offsets, item_index=item_index,
             timestamps=timestamps, ratings=rating.astype(np.float32))
    save_cold_split(run_dir, item_ids, cold)
    stats["seconds"] = round(time.perf_counter() - started, 2)
    save_json(stats_path, stats)
    log.info("prepared %d users, %d items, %d interactions in %.1fs -> %s", stats["users"], stats["items"],
             stats["interactions"], stats["seconds"], run_dir)
    return stats
