"""The TMDB details file `DATA/tmdb/details.jsonl`: its format, its crash-safe append, and its loader.

One line per movie, UTF-8, written by step 3 (experiments/03_download_posters.py):

    {"movieId": 1, "tmdbId": 862, "response": {<GET /3/movie/862?append_to_response=credits,keywords>}}

`response` is the API's JSON object as received (same keys, order and values; re-serialised on one line),
so it holds `credits.cast[{name, order, ...}]`, `credits.crew[{name, job, ...}]` and
`keywords.keywords[{id, name}]` next to the plain details (overview, genres, poster_path, ...).
`../shared/data/ml-latest-small-tmdb/details.jsonl` has the same layout (with fewer response fields).

Crash safety: each line is appended with one `write` of the whole line on an `O_APPEND` file, then fsynced,
so a kill leaves at most one torn line, always the last one, and never a complete-looking partial line
(the newline is the line's last byte). `drop_torn_last_line` cuts such a tail off before a run appends.

Each movieId appears once. The downloader never writes a movie twice, so a duplicate means two runs wrote
to the same file at once (or a hand edit): the loader refuses it rather than guessing which line is right.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Iterator

from experiments.artifacts import ArtifactError

log = logging.getLogger(__name__)

PRODUCER = "experiments/03_download_posters.py --data DATA --details-only"
APPEND_TO_RESPONSE = "credits,keywords"  # the sub-requests TMDB folds into the one /3/movie/{id} answer


def details_line(movie_id: int, tmdb_id: int, response: dict) -> bytes:
    """One line of details.jsonl, newline included (non-ASCII kept as UTF-8, like the shared file)."""
    record = {"movieId": movie_id, "tmdbId": tmdb_id, "response": response}
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def append_line(path: str | os.PathLike, line: bytes) -> None:
    """Append one complete line with a single write on an O_APPEND file, then fsync.

    Not thread-safe on its own for one file: callers serialise appends (the downloader holds a lock).
    """
    if not line.endswith(b"\n") or b"\n" in line[:-1]:
        raise ValueError("append_line takes exactly one line ending in a newline")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        written = os.write(fd, line)
        while written < len(line):  # a regular file writes all at once; loop only for the odd short write
            written += os.write(fd, line[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_torn_last_line(path: str | os.PathLike) -> int:
    """Cut a last line that lacks its newline (a write torn by a kill); return how many bytes were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        # scan back in blocks for the previous newline (lines can be long: full credits are ~100 kB)
        end, keep = size, 0
        while end > 0:
            start = max(0, end - 65536)
            fh.seek(start)
            block = fh.read(end - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    return size - keep


def iter_details(path: str | os.PathLike) -> Iterator[tuple[int, int, int, dict]]:
    """Yield `(line_no, movieId, tmdbId, response)` for each line of a details file, checking each line.

    Raises ArtifactError naming the file, line and field on a malformed line (a torn last line included:
    call `drop_torn_last_line` first to accept one) and on a movieId that appears twice.
    """
    yield from _checked_lines(path, _parse_line)


# The head of a line as `details_line` writes it; scanning for saved movies reads only this (a line whose head
# differs, e.g. a hand-edited one, is parsed in full instead).
_HEAD = re.compile(rb'\{"movieId": ([1-9][0-9]*), "tmdbId": ([1-9][0-9]*), "response": \{')


def iter_saved_ids(path: str | os.PathLike) -> Iterator[tuple[int, int, int]]:
    """Yield `(line_no, movieId, tmdbId)` of each line of a details file, without parsing the responses.

    For resuming a download: on ML-25M with full credits the file holds gigabytes of JSON, which
    `iter_details` would decode in full. A line in `details_line`'s own shape (its head, a closing brace and a
    newline, one movieId) is read from its head; any other line is checked in full, with `iter_details`'s
    errors, and so are duplicate movieIds. A response that is broken inside such a line (only a hand edit
    makes one: the writer appends whole lines) counts as saved here and fails where the responses are read
    (`load_tmdb_details`, naming the line).
    """
    def read_head(path: Path, line_no: int, raw: bytes) -> tuple[int, int, None]:
        head = _HEAD.match(raw)
        if head and raw.endswith(b"}}\n") and raw.count(b'"movieId": ') == 1:   # not two lines run together
            return int(head[1]), int(head[2]), None
        return _parse_line(path, line_no, raw)[:2] + (None,)

    for line_no, movie_id, tmdb_id, _ in _checked_lines(path, read_head):
        yield line_no, movie_id, tmdb_id


def _checked_lines(path: str | os.PathLike, read) -> Iterator[tuple]:
    """`(line_no, *read(path, line_no, raw))` per line; an ArtifactError for a missing file, an empty line or a
    movieId that appears twice."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: run {PRODUCER} first.")
    first_line: dict[int, int] = {}
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                raise ArtifactError(f"{path} line {line_no} is empty; delete that line.")
            movie_id, tmdb_id, rest = read(path, line_no, raw)
            if movie_id in first_line:
                raise ArtifactError(f"{path} lines {first_line[movie_id]} and {line_no}: movieId {movie_id} appears "
                                    f"twice (two runs wrote this file at once?); delete one of the two lines.")
            first_line[movie_id] = line_no
            yield line_no, movie_id, tmdb_id, rest


def _parse_line(path: Path, line_no: int, raw: bytes) -> tuple[int, int, dict]:
    """movieId, tmdbId and response of one line, or an ArtifactError saying what is wrong with it."""
    torn = "" if raw.endswith(b"\n") else (
        f" It is the last line and has no newline: a download killed mid-write. Rerun {PRODUCER} to repair it.")
    try:
        record = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ArtifactError(f"{path} line {line_no} is not valid JSON ({exc}).{torn or ' Delete or fix that line.'}") \
            from None
    if not isinstance(record, dict):
        raise ArtifactError(f"{path} line {line_no} is a JSON {type(record).__name__}, not an object "
                            f'{{"movieId", "tmdbId", "response"}}; delete or fix that line.{torn}')
    for name in ("movieId", "tmdbId"):
        value = record.get(name)
        if type(value) is not int or value <= 0:  # noqa: E721 (bool is an int subclass: refuse it too)
            what = "is missing" if name not in record else f"is {value!r}, not a positive integer"
            raise ArtifactError(f"{path} line {line_no}: field {name!r} {what}; delete or fix that line.{torn}")
    response = record.get("response")
    if not isinstance(response, dict):
        what = "is missing" if "response" not in record else f"is a {type(response).__name__}, not a JSON object"
        raise ArtifactError(f"{path} line {line_no}: field 'response' {what}; delete or fix that line.{torn}")
    return record["movieId"], record["tmdbId"], response


def load_tmdb_details(path: str | os.PathLike) -> dict[int, dict]:
    """movieId -> TMDB response (the `/3/movie/{id}?append_to_response=credits,keywords` object), in file order.

    Every line is checked (see `iter_details`): a malformed line, a torn last line or a duplicate movieId is
    an ArtifactError naming the file, line and field. Movies without details have no key: the caller
    decides (mask bit), nothing is filled in here.
    """
    return {movie_id: response for _, movie_id, _, response in iter_details(path)}
