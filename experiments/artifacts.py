"""File I/O shared by every pipeline step: atomic writes and checked artifact loaders.

Every per-item array in a run folder is aligned to one saved movieId array. Loaders here check
length, dtype and ids, and raise `ArtifactError` naming the file and the script that re-creates it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from modules.cold_start import ColdExamples


class ArtifactError(ValueError):
    """An artifact is missing, malformed or misaligned; the message says which file and how to fix it."""


# ----------------------------------------------------------------------------------------------------
# Atomic writes: write to a temporary name in the same folder, fsync, then rename over the target.
# A kill at any moment leaves either the old file or the new one, never a partial one.
# ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save one array atomically (`np.save` to a temp name, then rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Save several arrays atomically into one uncompressed `.npz`."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def save_json(path: str | os.PathLike, obj) -> None:
    """Save JSON atomically, indented, keys in insertion order."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def save_text(path: str | os.PathLike, text: str) -> None:
    """Save a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_figure(path: str | os.PathLike, fig, dpi: int = 100) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def load_json(path: str | os.PathLike, producer: str) -> dict:
    """Read a JSON artifact, or raise an ArtifactError saying which script writes it."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: run {producer} first.")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------------
# Fingerprints: each step stores its inputs (size + SHA-1 of each file) and its operative config in its
# completion marker (a JSON file written last, under the key "fingerprint"). A rerun reuses a finished
# output only when the current fingerprint equals the stored one; otherwise it stops and says what changed.
# ----------------------------------------------------------------------------------------------------

def exit_message(err: Exception) -> str:
    """`error: <message>` for sys.exit, without the "In call to configurable ..." lines gin appends."""
    return "error: " + str(err).split("\n  In call to configurable")[0]


class StaleOutputError(ArtifactError):
    """A finished output exists but was made from other inputs or another config (or cannot be checked)."""


def file_digest(path: str | os.PathLike) -> dict:
    """{"bytes", "sha1"} of a file: a copy of the same data with other mtimes still matches.

    An .npz is hashed by its arrays (name, dtype, shape, values), not its bytes: the zip container
    stores write times, so the same arrays saved twice differ byte for byte.
    """
    digest = hashlib.sha1()
    if Path(path).suffix == ".npz":
        with np.load(path) as arrays:
            for name in sorted(arrays.files):
                array = np.ascontiguousarray(arrays[name])
                digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
                digest.update(array.tobytes())
    else:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return {"bytes": Path(path).stat().st_size, "sha1": digest.hexdigest()}


def fingerprint(config: dict, inputs: dict[str, str | os.PathLike]) -> dict:
    """{"config": config, "inputs": {name: file_digest}} as it reads back from JSON (so that a stored and a
    fresh fingerprint compare equal). `inputs` name each file a step reads; a missing one is an error."""
    for name, path in inputs.items():
        if not Path(path).is_file():
            raise ArtifactError(f"input {name!r} of this step, {path}, is missing: run the step that writes it first.")
    record = {"config": config, "inputs": {name: file_digest(path) for name, path in sorted(inputs.items())}}
    return json.loads(json.dumps(record, default=_json_default, sort_keys=True))


def fingerprint_changes(recorded: dict, current: dict) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they match): the config keys whose
    values differ (nested dicts key by key, multi-line texts such as a gin config line by line), and the
    inputs that changed, appeared or disappeared."""
    changes = _value_changes("config", recorded.get("config", {}), current.get("config", {}))
    old_inputs, new_inputs = recorded.get("inputs", {}), current.get("inputs", {})
    for name in sorted(set(old_inputs) | set(new_inputs)):
        if name not in old_inputs or name not in new_inputs:
            changes.append(f"input {name}: {'now read' if name not in old_inputs else 'no longer read'}")
        elif old_inputs[name] != new_inputs[name]:
            changes.append(f"input {name} changed (sha1 {old_inputs[name]['sha1'][:10]} -> "
                           f"{new_inputs[name]['sha1'][:10]})")
    return changes


def _value_changes(label: str, old, new) -> list[str]:
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for key in sorted(set(old) | set(new), key=str)
                for change in _value_changes(f"{label} {key}", old.get(key, "<unset>"), new.get(key, "<unset>"))]
    if isinstance(old, str) and isinstance(new, str) and ("\n" in old or "\n" in new):
        old_lines, new_lines = old.splitlines(), new.splitlines()
        removed = [line for line in old_lines if line not in new_lines]
        added = [line for line in new_lines if line not in old_lines]
        return ([f"{label}: was {_short(line)}" for line in removed[:8]] +
                [f"{label}: now {_short(line)}" for line in added[:8]]) or [f"{label}: lines reordered"]
    return [f"{label}: {_short(old)} -> {_short(new)}"]


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def reuse_finished(marker: str | os.PathLike, current: dict, redo: str) -> dict | None:
    """The finished step's marker (a JSON dict) when it exists with the `current` fingerprint; None when the
    step has not finished. Raises StaleOutputError when the marker holds another fingerprint or none.

    redo: what the user can do instead, e.g. "pass --overwrite to redo it, or use another RUN folder".
    """
    marker = Path(marker)
    if not marker.is_file():
        return None
    done = json.loads(marker.read_text())
    recorded = done.get("fingerprint") if isinstance(done, dict) else None
    if recorded is None:
        raise StaleOutputError(f"{marker} exists but records no fingerprint of its inputs and config (an older "
                               f"version wrote it), so it cannot be checked against this run: {redo}.")
    changes = fingerprint_changes(recorded, current)
    if changes:
        raise StaleOutputError(f"{marker} was made from other inputs or another config:\n  - "
                               + "\n  - ".join(changes) + f"\nIt is not reused: {redo}.")
    return done


# ----------------------------------------------------------------------------------------------------
# The run folder written by experiments/02_prepare_interactions.py
# ----------------------------------------------------------------------------------------------------

PREPARE_SCRIPT = "experiments/02_prepare_interactions.py (make prepare)"
ITEMS_FILE = "items.csv"
ITEM_IDS_FILE = "item_ids.npy"
INTERACTIONS_FILE = "interactions.npz"
STATS_FILE = "stats.json"
COLD_ITEMS_FILE = "cold_items.npy"   # movieIds of every cold item (prepare --cold), both halves
COLD_FILE = "cold.npz"               # the cold halves and examples (`ColdSet`)


@dataclass(frozen=True)
class Interactions:
    """User histories in CSR form, each in time order.

    user_ids:   (U,) int64, raw MovieLens userId of each user row.
    offsets:    (U+1,) int64, user u's events are [offsets[u], offsets[u+1]).
    item_index: (E,) int32, row in items.csv / item_ids.npy (0-based) of each event.
    timestamps: (E,) int64, unix seconds.
    ratings:    (E,) float32.
    """

    user_ids: np.ndarray
    offsets: np.ndarray
    item_index: np.ndarray
    timestamps: np.ndarray
    ratings: np.ndarray

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def history(self, user_row: int) -> np.ndarray:
        """Item rows of one user, oldest first."""
        return self.item_index[self.offsets[user_row]:self.offsets[user_row + 1]]


def load_item_ids(run: str | os.PathLike) -> np.ndarray:
    """The (N,) int64 movieId array that every per-item artifact of this run is aligned to."""
    path = Path(run) / ITEM_IDS_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: run {PREPARE_SCRIPT} first.")
    ids = np.load(path)
    if ids.dtype != np.int64 or ids.ndim != 1:
        raise ArtifactError(f"{path} must be a 1-d int64 movieId array, got {ids.dtype} {ids.shape}: "
                            f"re-run {PREPARE_SCRIPT}.")
    return ids


def load_items(run: str | os.PathLike) -> pd.DataFrame:
    """The item table: one row per movie of movies.csv, sorted by movieId.

    Columns: movieId (int64), tmdbId (Int64, <NA> when links.csv has none), imdbId (Int64),
    title (str), year (Int64, <NA> when the title has no '(YYYY)'), genres (str, '|'-joined,
    '(no genres listed)' kept verbatim).
    """
    path = Path(run) / ITEMS_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: run {PREPARE_SCRIPT} first.")
    items = pd.read_csv(path, dtype={"movieId": "int64", "tmdbId": "Int64", "imdbId": "Int64",
                                     "title": "string", "year": "Int64", "genres": "string"},
                        keep_default_na=False, na_values={"tmdbId": [""], "imdbId": [""], "year": [""]})
    check_aligned(items["movieId"].to_numpy(), load_item_ids(run), path, PREPARE_SCRIPT)
    return items


def load_interactions(run: str | os.PathLike) -> Interactions:
    """User histories (see `Interactions`), checked against item_ids.npy."""
    path = Path(run) / INTERACTIONS_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: run {PREPARE_SCRIPT} first.")
    with np.load(path) as z:
        inter = Interactions(**{k: z[k] for k in ("user_ids", "offsets", "item_index", "timestamps", "ratings")})
    n_items = len(load_item_ids(run))
    if inter.offsets[-1] != len(inter.item_index) or len(inter.offsets) != inter.n_users + 1:
        raise ArtifactError(f"{path} has inconsistent offsets: re-run {PREPARE_SCRIPT}.")
    if len(inter.item_index) and (inter.item_index.min() < 0 or inter.item_index.max() >= n_items):
        raise ArtifactError(f"{path} refers to item rows outside 0..{n_items - 1} of item_ids.npy: "
                            f"re-run {PREPARE_SCRIPT}.")
    return inter


def check_aligned(ids: np.ndarray, expected_ids: np.ndarray, path: str | os.PathLike, producer: str) -> None:
    """Raise ArtifactError unless `ids` (read from `path`) equals the run's movieId array row for row."""
    ids = np.asarray(ids)
    if len(ids) != len(expected_ids):
        raise ArtifactError(f"{path} has {len(ids)} rows but the run's item_ids.npy has {len(expected_ids)}: "
                            f"it was made from another item table; re-run {producer}.")
    mismatch = np.flatnonzero(ids != expected_ids)
    if len(mismatch):
        i = int(mismatch[0])
        raise ArtifactError(f"{path} is not aligned with item_ids.npy: row {i} holds movieId {ids[i]}, "
                            f"expected {expected_ids[i]} ({len(mismatch)} rows differ); re-run {producer}.")


@dataclass(frozen=True)
class ColdSet:
    """The cold-start split of a run prepared with --cold (modules.cold_start).

    valid_items, test_items: item rows of each cold half. examples[half]: `ColdExamples` in the warm
    histories' coordinates (user row, exclusive end of the input, cold target row, the cold event's time;
    splits written before the time was recorded have None there and no untied subset).
    """

    valid_items: np.ndarray
    test_items: np.ndarray
    examples: dict

    @property
    def items(self) -> np.ndarray:
        """Every cold item row, sorted."""
        return np.sort(np.concatenate([self.valid_items, self.test_items]))


def load_cold(run: str | os.PathLike) -> ColdSet | None:
    """The run's cold-start split, or None when it was prepared without --cold; checked against the histories."""
    path = Path(run) / COLD_FILE
    if not path.is_file():
        return None
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    needed = ["valid_items", "test_items"] + [f"{h}_{f}" for h in ("valid", "test") for f in ("user_row", "end", "target")]
    missing = [k for k in needed if k not in arrays]
    if missing:
        raise ArtifactError(f"{path} lacks {missing}: re-run {PREPARE_SCRIPT} with --overwrite.")
    inter = load_interactions(run)
    cold = ColdSet(arrays["valid_items"], arrays["test_items"],
                   {h: ColdExamples(arrays[f"{h}_user_row"], arrays[f"{h}_end"], arrays[f"{h}_target"],
                                    arrays.get(f"{h}_timestamp")) for h in ("valid", "test")})
    warm_cold = np.isin(inter.item_index, cold.items)
    if warm_cold.any():
        raise ArtifactError(f"{Path(run) / INTERACTIONS_FILE} holds {int(warm_cold.sum())} events on cold items of "
                            f"{path}: the two were not written together; re-run {PREPARE_SCRIPT} --overwrite.")
    for half, ex in cold.examples.items():
        if ((ex.end < inter.offsets[ex.user_row] + 1) | (ex.end > inter.offsets[ex.user_row + 1])).any():
            raise ArtifactError(f"{path}: {half} examples point outside their users' histories: re-run "
                                f"{PREPARE_SCRIPT} --overwrite.")
        if ex.timestamp is not None and (len(ex.timestamp) != len(ex) or
                                         (ex.timestamp < inter.timestamps[ex.end - 1]).any()):
            raise ArtifactError(f"{path}: {half}_timestamp does not fit the histories (a cold event before its "
                                f"input's last event): re-run {PREPARE_SCRIPT} --overwrite.")
    return cold
