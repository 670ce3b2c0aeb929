"""Download one TMDB poster and the TMDB details of every MovieLens movie (step 3 of the pipeline).

For every row of `<data>/links.csv` with a tmdbId: GET `<api>/3/movie/{tmdbId}?append_to_response=credits,keywords`
(one request per movie for both halves), append the response as received to the details file
(default `<data>/tmdb/details.jsonl`, format and crash safety in experiments/tmdb_details.py), take
`poster_path`, GET `<image_base>/<size><poster_path>`, check that Pillow decodes the image fully, and write
it to `<posters>/{movieId}.jpg` through a temporary name (a kill never leaves a partial poster). The bytes
are stored as TMDB sends them (no re-encoding). Either half can run alone (`fetch_posters` /
`fetch_details`); a posters-only run asks `/3/movie/{tmdbId}` without `append_to_response` and writes no
details; a details-only run fetches no image. A movie whose details are saved but whose poster is
missing gets the plain `/3/movie/{tmdbId}` request and its image, and nothing else.

Requests run in a thread pool under one token-bucket rate limit shared by all threads. 429, 5xx,
timeouts, dropped connections, undecodable images and non-JSON bodies are retried with exponential
backoff and jitter (429 honours `Retry-After` and pauses every thread); 404 is recorded as `not_found`
at once; 401 stops the whole run (`InvalidKeyError`).

Each half has its failure log, the list of movies that currently lack that half, one tab-separated line
per failure: `movieId  tmdbId  reason  time_utc` (tmdbId empty when links.csv has none), after a header
naming what it belongs to: `# posters: <folder>` in `experiments/failed_posters.txt` (default) and
`# details: <details file>` in `failed_details.txt` beside it. Each failure is appended, flushed and
fsynced at once. A normal run skips the movies already in a log (so reruns do not hammer TMDB for known
404s); `retry_failed=True` retries only those movies. At the start and end of every run each log is
compacted atomically: one line per movie (its latest failure), and no line for a movie whose poster is
now on disk (posters) or whose line is now in the details file (details). So after a finished run every
movie of links.csv has, for each half, either its poster / details line or exactly one line in the log.

The TMDB key (v3 `api_key` query parameter) or read token (v4 `Authorization: Bearer`) is only sent
to the API host, never to the image host, and is scrubbed from every message this module logs.
"""
from __future__ import annotations

import collections
import csv
import email.utils
import io
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import requests
from PIL import Image
from tqdm import tqdm

from experiments import download
from experiments.artifacts import atomic_path, save_json, save_text
from experiments.tmdb_details import APPEND_TO_RESPONSE, append_line, details_line, drop_torn_last_line, iter_saved_ids

log = logging.getLogger(__name__)

DEFAULT_API_BASE = "https://api.themoviedb.org"
DEFAULT_IMAGE_BASE = "https://image.tmdb.org/t/p"
DEFAULT_IMAGE_SIZE = "w500"
SUMMARY_FILE = "_summary.json"  # written inside the posters folder; not a poster (no movieId name)
DETAILS_SUMMARY_FILE = "details_summary.json"  # written beside the details file


class InvalidKeyError(RuntimeError):
    """TMDB answered 401: the API key or read token is wrong. The whole run stops."""


class MissingKeyError(ValueError):
    """No TMDB credentials were given."""


class _Stopped(Exception):
    """The run is stopping (401 elsewhere, or interrupted); this movie was not attempted to the end."""


class _Failure(Exception):
    """A movie gets no poster; `reason` is the short code written to the failure log."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason if not detail else f"{reason}: {detail}")
        self.reason = reason


class _Retry(Exception):
    """A transient failure (429, 5xx, timeout, dropped connection, bad body): wait, then try again."""

    def __init__(self, reason: str, wait_seconds: float):
        super().__init__(reason)
        self.reason, self.wait_seconds = reason, wait_seconds


class _BadContent(Exception):
    """A 200 response whose body is not what we asked for (an undecodable image, non-JSON)."""


# ----------------------------------------------------------------------------------------------------
# Credentials and scrubbing
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True, repr=False)
class TmdbCredentials:
    """A v3 API key or a v4 read access token (the token wins when both are set: it stays out of URLs)."""

    api_key: str | None = None
    read_token: str | None = None

    def __repr__(self) -> str:  # never show the secret, even in a traceback's locals
        return "TmdbCredentials(<hidden>)"

    @classmethod
    def resolve(cls, api_key: str | None = None, read_token: str | None = None,
                environ: dict | None = None) -> "TmdbCredentials":
        """Flags first, then the TMDB_API_KEY / TMDB_READ_TOKEN environment variables."""
        environ = os.environ if environ is None else environ
        creds = cls(api_key or environ.get("TMDB_API_KEY") or None,
                    read_token or environ.get("TMDB_READ_TOKEN") or None)
        if not creds.api_key and not creds.read_token:
            raise MissingKeyError("no TMDB credentials: set TMDB_API_KEY (v3 API key) or TMDB_READ_TOKEN "
                                  "(v4 read access token), from https://www.themoviedb.org/settings/api, "
                                  "or pass --api-key / --read-token.")
        return creds

    @property
    def secrets(self) -> list[str]:
        """The secret strings to scrub from anything logged."""
        return [s for s in (self.api_key, self.read_token) if s]

    def request_args(self) -> tuple[dict, dict]:
        """(query params, headers) that authenticate one API request."""
        if self.read_token:
            return {}, {"Authorization": f"Bearer {self.read_token}"}
        return {"api_key": self.api_key}, {}


_KEY_IN_URL = re.compile(r"(api_key=)[^&\s'\"]+")


def scrub(text: str, secrets: list[str]) -> str:
    """`text` with every secret and every `api_key=...` query value replaced by `***`."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return _KEY_IN_URL.sub(r"\1***", text)


class ScrubSecretsFilter(logging.Filter):
    """A logging filter (install it on the handlers) that scrubs secrets from every formatted record."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage(), self.secrets)
        record.args = ()
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info), self.secrets)
            record.exc_info = None
        return True


# ----------------------------------------------------------------------------------------------------
# Rate limit and retries
# ----------------------------------------------------------------------------------------------------

class RateLimiter:
    """Token bucket shared by all threads: `rate` requests per second, bursts of at most `burst`.

    `pause(seconds)` holds every thread back (used on 429 so the whole pool respects Retry-After).
    rate <= 0 disables the limit.
    """

    def __init__(self, rate: float, burst: float = 1.0):
        self.rate, self.capacity = rate, max(1.0, burst)
        self.tokens = self.capacity
        self.updated = time.monotonic()
        self.paused_until = 0.0
        self.lock = threading.Lock()

    def acquire(self, stop: threading.Event | None = None) -> None:
        """Block until one request may be sent (returns early, without a token, once `stop` is set)."""
        while True:
            with self.lock:
                now = time.monotonic()
                if now >= self.paused_until:
                    if self.rate <= 0:
                        return
                    self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
                    self.updated = now
                    if self.tokens >= 1.0:
                        self.tokens -= 1.0
                        return
                    delay = (1.0 - self.tokens) / self.rate
                else:
                    delay = self.paused_until - now
            if stop is not None:
                if stop.wait(delay):
                    return
            else:
                time.sleep(delay)

    def pause(self, seconds: float) -> None:
        """Send nothing for `seconds` from now (extends, never shortens, a running pause)."""
        with self.lock:
            self.paused_until = max(self.paused_until, time.monotonic() + seconds)


@dataclass
class RetryPolicy(download.RetryPolicy):
    """The MovieLens downloader's backoff (base * 2**attempt, +-50 % jitter, capped), with TMDB's defaults.

    Retries on 429/5xx/timeouts/bad bodies; a 429's Retry-After is honoured up to `max_retry_after` seconds.
    """

    retries: int = 5
    base_seconds: float = 1.0
    max_retry_after: float = 300.0


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), or None when absent/unparsable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


# ----------------------------------------------------------------------------------------------------
# Input: links.csv
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MovieLink:
    """One row of links.csv: the MovieLens movieId and its TMDB id (None when links.csv has none)."""

    movie_id: int
    tmdb_id: int | None


def read_links(path: str | os.PathLike) -> list[MovieLink]:
    """Parse a MovieLens links.csv (movieId,imdbId,tmdbId; CRLF or LF; tmdbId may be empty)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: point --data at a MovieLens folder (run "
                                f"experiments/01_download_movielens.py or 00_make_demo_data.py first).")
    links, seen = [], set()
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = {"movieId", "tmdbId"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path} lacks column(s) {sorted(missing)} (header: {reader.fieldnames}); "
                             f"it must be a MovieLens links.csv with movieId,imdbId,tmdbId.")
        for line_no, row in enumerate(reader, start=2):
            movie_id = _parse_int(row["movieId"], path, line_no, "movieId", allow_empty=False)
            if movie_id in seen:
                raise ValueError(f"{path} line {line_no}: movieId {movie_id} appears twice; fix links.csv.")
            seen.add(movie_id)
            links.append(MovieLink(movie_id, _parse_int(row["tmdbId"], path, line_no, "tmdbId", allow_empty=True)))
    return links


def _parse_int(text: str | None, path: Path, line_no: int, column: str, allow_empty: bool) -> int | None:
    """An integer cell; '862.0' is accepted (pandas writes ids that way), anything else is an error."""
    text = (text or "").strip()
    if not text and allow_empty:
        return None
    try:
        number = float(text)
        if number.is_integer() and number > 0:
            return int(number)
    except ValueError:
        pass
    raise ValueError(f"{path} line {line_no}: {column} {text!r} is not a positive integer; fix links.csv.")


# ----------------------------------------------------------------------------------------------------
# Posters on disk
# ----------------------------------------------------------------------------------------------------

def check_image_bytes(data: bytes) -> None:
    """Raise `_BadContent` unless Pillow fully decodes `data` (rejects HTML pages, truncated files)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _BadContent(f"not a decodable image ({type(exc).__name__}: {exc}; starts {data[:16]!r})") from exc


def is_valid_poster(path: Path) -> bool:
    """True when `path` exists and decodes fully."""
    try:
        check_image_bytes(path.read_bytes())
    except (OSError, _BadContent):
        return False
    return True


def poster_path_for(posters: Path, movie_id: int) -> Path:
    """Where the poster of `movie_id` lives."""
    return posters / f"{movie_id}.jpg"


_STRAY_TEMP = re.compile(r"^\.\d+\.jpg\..*\.tmp$")  # the temporary names atomic_path gives posters


def remove_stray_temp_files(posters: Path) -> int:
    """Delete temporary poster files left by a killed run; return how many."""
    stray = [p for p in posters.iterdir() if _STRAY_TEMP.match(p.name)] if posters.is_dir() else []
    for path in stray:
        path.unlink(missing_ok=True)
    return len(stray)


# ----------------------------------------------------------------------------------------------------
# The failure log
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FailureEntry:
    """One line of the failure log."""

    movie_id: int
    tmdb_id: int | None
    reason: str
    time_utc: str

    def line(self) -> str:
        tmdb = "" if self.tmdb_id is None else str(self.tmdb_id)
        return f"{self.movie_id}\t{tmdb}\t{self.reason}\t{self.time_utc}\n"


_LOG_OWNER = re.compile(r"^# (posters|details): (.*)$")
_LOG_FLAG = {"posters": "--failed-log", "details": "--failed-details-log"}


class FailureLog:
    """The append-only, fsynced failure log of one half (format in the module docstring).

    kind 'posters': `owner` is the posters folder, a movie is done once its poster file exists.
    kind 'details': `owner` is the details file, a movie is done when `is_done(movieId)` says so.
    """

    def __init__(self, path: str | os.PathLike, owner: Path, kind: str = "posters",
                 is_done: Callable[[int], bool] | None = None):
        if kind not in _LOG_FLAG:
            raise ValueError(f"FailureLog kind {kind!r} is not one of {sorted(_LOG_FLAG)}")
        self.path, self.owner, self.kind = Path(path), Path(owner), kind
        self.is_done = is_done or (lambda movie_id: poster_path_for(self.owner, movie_id).exists())
        self.header = f"# {kind}: {self.owner.resolve()}\n# movieId\ttmdbId\treason\ttime_utc\n"
        self.lock = threading.Lock()

    def read(self) -> dict[int, FailureEntry]:
        """Latest entry per movieId. Raises ValueError if the log belongs to another folder, file or half."""
        if not self.path.is_file():
            return {}
        entries: dict[int, FailureEntry] = {}
        lines = self.path.read_text().split("\n")
        if lines[-1]:  # no final newline: a write torn by a kill; that movie is simply retried
            log.warning("%s: ignoring an incomplete last line %r", self.path, lines[-1])
        for line_no, line in enumerate(lines[:-1], start=1):
            owner = _LOG_OWNER.match(line)
            if owner:
                if (owner[1], owner[2]) != (self.kind, str(self.owner.resolve())):
                    raise ValueError(f"{self.path} records failures for {owner[1]} {owner[2]}, not {self.kind} "
                                     f"{self.owner.resolve()}: pass another {_LOG_FLAG[self.kind]}, or delete that "
                                     f"file if it is stale.")
                continue
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.split("\t")
            if len(fields) != 4 or not fields[0].isdigit() or (fields[1] and not fields[1].isdigit()):
                raise ValueError(f"{self.path} line {line_no} is not 'movieId<TAB>tmdbId<TAB>reason<TAB>time': "
                                 f"{line!r}; delete or fix that line.")
            movie_id = int(fields[0])
            entries[movie_id] = FailureEntry(movie_id, int(fields[1]) if fields[1] else None, fields[2], fields[3])
        return entries

    def append(self, movie: MovieLink, reason: str) -> None:
        """Record one failure now: append one line, flush and fsync (thread-safe)."""
        entry = FailureEntry(movie.movie_id, movie.tmdb_id, reason,
                             datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
        with self.lock:
            new_file = not self.path.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write((self.header if new_file else "") + entry.line())
                fh.flush()
                os.fsync(fh.fileno())

    def compact(self) -> dict[int, FailureEntry]:
        """Rewrite the log atomically: latest line per movie, none for movies that are done now."""
        entries = {m: e for m, e in self.read().items() if not self.is_done(m)}
        if self.path.exists() or entries:
            with self.lock:
                save_text(self.path, self.header + "".join(e.line() for e in entries.values()))
        return entries


# ----------------------------------------------------------------------------------------------------
# The details file
# ----------------------------------------------------------------------------------------------------

class DetailsStore:
    """The details file of one run: which movies it already holds, and thread-safe, crash-safe appends."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.saved: set[int] = set()
        self.lock = threading.Lock()

    def open(self, links: list[MovieLink]) -> int:
        """Repair a torn last line, then read which movies are saved; return the bytes dropped.

        `links` is the whole links.csv: a saved line whose movieId is not there, or whose tmdbId differs
        from it, belongs to another dataset (ValueError naming the line and the fix).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        dropped = drop_torn_last_line(self.path)
        if dropped:
            log.warning("%s: dropped a torn last line (%d bytes, left by a killed run); that movie is fetched again",
                        self.path, dropped)
        if not self.path.is_file():
            return dropped
        tmdb_of = {link.movie_id: link.tmdb_id for link in links}
        for line_no, movie_id, tmdb_id in iter_saved_ids(self.path):
            if movie_id not in tmdb_of or tmdb_of[movie_id] != tmdb_id:
                said = "has no such movieId" if movie_id not in tmdb_of else f"gives tmdbId {tmdb_of[movie_id]}"
                raise ValueError(f"{self.path} line {line_no}: movieId {movie_id} has tmdbId {tmdb_id}, but links.csv "
                                 f"{said}: the file belongs to another dataset or links.csv changed; pass another "
                                 f"--details-out, or delete that line (or the file) to fetch it again.")
            self.saved.add(movie_id)
        return dropped

    def __contains__(self, movie_id: int) -> bool:
        return movie_id in self.saved

    def append(self, movie: MovieLink, response: dict) -> None:
        """Save one movie's response now (one atomic line, fsynced; thread-safe)."""
        line = details_line(movie.movie_id, movie.tmdb_id, response)
        with self.lock:
            append_line(self.path, line)
            self.saved.add(movie.movie_id)


# ----------------------------------------------------------------------------------------------------
# The downloader
# ----------------------------------------------------------------------------------------------------

@dataclass
class DownloadSettings:
    """Everything that shapes a poster download run (no secrets here: they live in TmdbCredentials)."""

    api_base: str = DEFAULT_API_BASE
    image_base: str = DEFAULT_IMAGE_BASE
    image_size: str = DEFAULT_IMAGE_SIZE
    workers: int = 8
    rate: float = 40.0  # requests per second, all threads together (TMDB allows about 40-50)
    burst: float = 1.0
    timeout: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass
class DetailsCounts:
    """Counts of the details half of one run."""

    saved: int = 0
    skipped_existing: int = 0
    skipped_known_failure: int = 0
    failures_by_reason: dict = field(default_factory=collections.Counter)

    def as_dict(self) -> dict:
        return {"saved": self.saved, "skipped_existing": self.skipped_existing,
                "skipped_known_failure": self.skipped_known_failure,
                "not_found": self.failures_by_reason.get("not_found", 0),
                "failed": sum(self.failures_by_reason.values()) - self.failures_by_reason.get("not_found", 0),
                "failures_by_reason": dict(sorted(self.failures_by_reason.items()))}


@dataclass
class RunSummary:
    """Counts of one run, written as JSON next to the posters (and the details file).

    The top-level counts are the posters half; `details` holds the details half (None when it did not run).
    """

    movies: int = 0
    attempted: int = 0
    downloaded: int = 0
    skipped_existing: int = 0
    skipped_known_failure: int = 0
    failures_by_reason: dict = field(default_factory=collections.Counter)
    details: DetailsCounts | None = None
    stopped: str | None = None
    elapsed_seconds: float = 0.0

    @property
    def not_found(self) -> int:
        return self.failures_by_reason.get("not_found", 0)

    @property
    def failed(self) -> int:
        """Failures other than not_found (no_tmdb_id, no_poster_path, http_500, timeout, ...)."""
        return sum(self.failures_by_reason.values()) - self.not_found

    def as_dict(self) -> dict:
        return {"movies": self.movies, "attempted": self.attempted, "downloaded": self.downloaded,
                "skipped_existing": self.skipped_existing, "skipped_known_failure": self.skipped_known_failure,
                "not_found": self.not_found, "failed": self.failed,
                "failures_by_reason": dict(sorted(self.failures_by_reason.items())),
                "details": None if self.details is None else self.details.as_dict(),
                "stopped": self.stopped, "elapsed_seconds": round(self.elapsed_seconds, 3),
                "posters_per_second": round(self.downloaded / self.elapsed_seconds, 3) if self.elapsed_seconds else None}


@dataclass(frozen=True)
class Job:
    """What one movie needs this run: its poster (unless a valid one is on disk) and/or its details."""

    movie: MovieLink
    poster: bool
    details: bool


class PosterDownloader:
    """Downloads posters and details for a list of jobs; see the module docstring for the behaviour.

    details / details_log: the details file and its failure log (both needed by jobs with `details`).
    """

    def __init__(self, posters: Path, credentials: TmdbCredentials, failure_log: FailureLog | None,
                 settings: DownloadSettings | None = None, overwrite: bool = False,
                 details: DetailsStore | None = None, details_log: FailureLog | None = None):
        self.posters, self.credentials, self.failure_log = Path(posters), credentials, failure_log
        self.details, self.details_log = details, details_log
        self.settings = settings or DownloadSettings()
        self.overwrite = overwrite
        self.limiter = RateLimiter(self.settings.rate, self.settings.burst)
        self.stop = threading.Event()
        self._local = threading.local()

    # -- one movie --------------------------------------------------------------------------------

    def process(self, job: Job) -> dict[str, str]:
        """Do one movie's job with at most one API request; return {half: outcome} for 'poster'/'details'.

        Poster outcomes: 'downloaded', 'skipped_existing' or the failure reason; details: 'saved' or the
        failure reason. Every failure is written to that half's log before this returns.
        """
        movie, outcome = job.movie, {}
        want_poster = job.poster and self._poster_missing(movie, outcome)
        if not want_poster and not job.details:
            return outcome
        try:
            if movie.tmdb_id is None:
                raise _Failure("no_tmdb_id")
            extra = {"append_to_response": APPEND_TO_RESPONSE} if job.details else {}
            response = self._get(f"{self.settings.api_base.rstrip('/')}/3/movie/{movie.tmdb_id}", authenticated=True,
                                 parse=_parse_json_object, bad_body="invalid_json", extra_params=extra)
        except _Failure as failure:  # no answer: every half this movie wanted fails for the same reason
            if want_poster:
                outcome["poster"] = self._record("poster", movie, failure)
            if job.details:
                outcome["details"] = self._record("details", movie, failure)
            return outcome
        if job.details:
            self.details.append(movie, response)
            outcome["details"] = "saved"
        if want_poster:
            try:
                outcome["poster"] = self._fetch_poster(movie, response.get("poster_path"))
            except _Failure as failure:
                outcome["poster"] = self._record("poster", movie, failure)
            except _Stopped:  # the details are saved: report them, the poster was simply not attempted
                pass
        return outcome

    def _poster_missing(self, movie: MovieLink, outcome: dict) -> bool:
        """False (outcome 'skipped_existing') when a valid poster is on disk and we do not overwrite."""
        target = poster_path_for(self.posters, movie.movie_id)
        if target.exists() and not self.overwrite:
            if is_valid_poster(target):
                outcome["poster"] = "skipped_existing"
                return False
            # delete it now: if the new download fails, the log line must not be dropped by compact()
            # (which treats any file on disk as a poster), and no undecodable file may stay behind
            log.warning("%s does not decode; deleting it and downloading it again", target)
            target.unlink(missing_ok=True)
        return True

    def _fetch_poster(self, movie: MovieLink, poster_path) -> str:
        """Download the image at `poster_path` and write it atomically; 'downloaded' or `_Failure`."""
        if not isinstance(poster_path, str) or not poster_path:
            raise _Failure("no_poster_path")
        url = f"{self.settings.image_base.rstrip('/')}/{self.settings.image_size}/{poster_path.lstrip('/')}"
        image = self._get(url, authenticated=False, parse=_checked_image, bad_body="invalid_image")
        with atomic_path(poster_path_for(self.posters, movie.movie_id)) as tmp:
            tmp.write_bytes(image)
        return "downloaded"

    def _record(self, half: str, movie: MovieLink, failure: _Failure) -> str:
        """Write one failure to that half's log; return its reason."""
        (self.failure_log if half == "poster" else self.details_log).append(movie, failure.reason)
        log.debug("movie %d (tmdb %s) %s: %s", movie.movie_id, movie.tmdb_id, half,
                  scrub(str(failure), self.credentials.secrets))
        return failure.reason

    def _session(self) -> requests.Session:
        """One requests.Session per thread (Session is not guaranteed thread-safe)."""
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _get(self, url: str, authenticated: bool, parse: Callable[[bytes], object], bad_body: str,
             extra_params: dict | None = None):
        """GET `url` under the rate limit with retries; return `parse(body)` or raise `_Failure`/`_Stopped`.

        bad_body: the failure reason when `parse` rejects a 200 body (e.g. 'invalid_image').
        extra_params: query parameters besides the credentials (e.g. append_to_response).
        """
        retry = self.settings.retry
        params, headers = self.credentials.request_args() if authenticated else ({}, {})
        params = {**params, **(extra_params or {})}
        for attempt in range(retry.retries + 1):
            self.limiter.acquire(self.stop)
            if self.stop.is_set():
                raise _Stopped()
            try:
                return self._attempt(url, params, headers, authenticated, parse, bad_body, attempt)
            except _Retry as transient:
                if attempt == retry.retries:
                    raise _Failure(transient.reason, f"gave up after {retry.retries + 1} attempts") from None
                if self.stop.wait(transient.wait_seconds):
                    raise _Stopped() from None
        raise AssertionError("unreachable")

    def _attempt(self, url, params, headers, authenticated, parse, bad_body, attempt):
        """One request: the parsed body, or `_Retry` (transient), `_Failure` (final), `InvalidKeyError` (401)."""
        retry = self.settings.retry
        try:
            resp = self._session().get(url, params=params, headers=headers, timeout=self.settings.timeout)
            body = resp.content
        except requests.Timeout:
            raise _Retry("timeout", retry.wait(attempt)) from None
        except requests.RequestException as exc:  # refused, reset, dropped mid-body
            # requests puts the full URL, api_key included, into its messages: scrub before logging
            log.debug("%s: %s", type(exc).__name__, scrub(str(exc), self.credentials.secrets))
            raise _Retry("connection_error", retry.wait(attempt)) from None
        status = resp.status_code
        if status == 200:
            try:
                return parse(body)
            except _BadContent as exc:
                log.debug("bad body from %s: %s", scrub(url, self.credentials.secrets), exc)
                raise _Retry(bad_body, retry.wait(attempt)) from None
        if status == 401 and authenticated:
            self.stop.set()
            raise InvalidKeyError("TMDB answered 401 (invalid API key / read token)")
        if status == 404:
            raise _Failure("not_found")
        if status == 429:
            wait_s = parse_retry_after(resp.headers.get("Retry-After"))
            wait_s = retry.wait(attempt) if wait_s is None else min(wait_s, retry.max_retry_after)
            self.limiter.pause(wait_s)  # every thread holds back, not only this one
            raise _Retry("http_429", wait_s)
        if status >= 500:
            raise _Retry(f"http_{status}", retry.wait(attempt))
        raise _Failure(f"http_{status}")

    # -- the run ------------------------------------------------------------------------------------

    def run(self, jobs: list[Job], summary: RunSummary) -> RunSummary:
        """Process `jobs` in the thread pool, counting into `summary`.

        On 401 (or Ctrl-C) the run stops at once: queued movies are cancelled, running ones see
        `stop` before their next request, and `summary.stopped` says why.
        """
        summary.attempted = len(jobs)
        started = time.monotonic()
        with ThreadPoolExecutor(self.settings.workers, thread_name_prefix="tmdb") as pool, \
                tqdm(total=len(jobs), desc="tmdb", unit="movie") as bar:
            pending = {pool.submit(self.process, job) for job in jobs}
            try:
                while pending and summary.stopped is None:
                    done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                    for future in done:
                        self._tally(future, summary)
                        bar.update(1)
                    postfix = dict(posters=summary.downloaded, skipped=summary.skipped_existing,
                                   failed=sum(summary.failures_by_reason.values()))
                    if summary.details is not None:
                        postfix.update(details=summary.details.saved,
                                       details_failed=sum(summary.details.failures_by_reason.values()))
                    bar.set_postfix(**postfix, refresh=False)
            except KeyboardInterrupt:
                summary.stopped = "interrupted"
            finally:  # cancel what has not started; running requests see `stop` and give up
                self.stop.set()
                for future in pending:
                    future.cancel()
        summary.elapsed_seconds = time.monotonic() - started
        return summary

    @staticmethod
    def _tally(future, summary: RunSummary) -> None:
        """Add one finished movie to the summary (a 401 sets `summary.stopped`)."""
        if future.cancelled():
            return
        try:
            outcome = future.result()
        except InvalidKeyError:
            summary.stopped = "invalid_api_key"
            return
        except _Stopped:
            return
        poster = outcome.get("poster")
        if poster == "downloaded":
            summary.downloaded += 1
        elif poster == "skipped_existing":
            summary.skipped_existing += 1
        elif poster is not None:
            summary.failures_by_reason[poster] += 1
        details = outcome.get("details")
        if details == "saved":
            summary.details.saved += 1
        elif details is not None:
            summary.details.failures_by_reason[details] += 1


def _parse_json_object(body: bytes) -> dict:
    """JSON object body (TMDB answers every /3/movie request with one), or `_BadContent`."""
    try:
        obj = json.loads(body)
    except ValueError as exc:
        raise _BadContent(f"not JSON: {body[:40]!r}") from exc
    if not isinstance(obj, dict):
        raise _BadContent(f"JSON {type(obj).__name__}, not an object: {body[:40]!r}")
    return obj


def _checked_image(body: bytes) -> bytes:
    """The body itself, once Pillow has decoded it fully."""
    check_image_bytes(body)
    return body


# ----------------------------------------------------------------------------------------------------
# The whole step
# ----------------------------------------------------------------------------------------------------

def download_posters(data: str | os.PathLike, credentials: TmdbCredentials, *, posters: str | os.PathLike | None = None,
                     failed_log: str | os.PathLike = "experiments/failed_posters.txt",
                     details_out: str | os.PathLike | None = None, failed_details_log: str | os.PathLike | None = None,
                     fetch_posters: bool = True, fetch_details: bool = True,
                     settings: DownloadSettings | None = None, retry_failed: bool = False,
                     overwrite: bool = False, limit: int | None = None) -> dict:
    """Step 3 for `<data>/links.csv`: posters into `posters` (default `<data>/posters`) and details into
    `details_out` (default `<data>/tmdb/details.jsonl`); return the summary.

    failed_details_log: default `failed_details.txt` beside `failed_log`. fetch_posters / fetch_details:
    run only one half (a half that does not run reads and writes none of its files). retry_failed: only the
    movies in a failure log (each half retries its own). overwrite: download every poster again, known
    failures included (a valid poster is replaced atomically); saved details are kept (delete their lines
    to fetch them again). limit: only the first `limit` rows.
    Raises InvalidKeyError on HTTP 401 (after writing the partial summary and compacting the logs).
    """
    if not (fetch_posters or fetch_details):
        raise ValueError("nothing to do: fetch_posters and fetch_details are both off (--posters-only and "
                         "--details-only cannot be combined).")
    data = Path(data)
    posters = Path(posters) if posters is not None else data / "posters"
    details_out = Path(details_out) if details_out is not None else data / "tmdb" / "details.jsonl"
    failed_details_log = Path(failed_details_log) if failed_details_log is not None else \
        Path(failed_log).with_name("failed_details.txt")
    if Path(failed_log).resolve() == failed_details_log.resolve():
        raise ValueError(f"--failed-log and --failed-details-log are both {failed_details_log}: give them two files.")
    settings = settings or DownloadSettings()
    # requests calls a schemeless URL a RequestException, which would be retried as a connection error
    for flag, url, default in (("--api-base", settings.api_base, DEFAULT_API_BASE),
                               ("--image-base", settings.image_base, DEFAULT_IMAGE_BASE)):
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise ValueError(f"{flag} {url!r} is not an http(s) URL; use one like {default}.")
    all_links = read_links(data / "links.csv")
    links = all_links[:limit]
    poster_log = details_log = store = None
    known_posters: dict = {}
    known_details: dict = {}
    if fetch_posters:
        posters.mkdir(parents=True, exist_ok=True)
        stray = remove_stray_temp_files(posters)
        if stray:
            log.info("removed %d temporary poster file(s) left by an interrupted run", stray)
        poster_log = FailureLog(failed_log, posters)
        known_posters = poster_log.compact()
    if fetch_details:
        store = DetailsStore(details_out)
        store.open(all_links)
        details_log = FailureLog(failed_details_log, store.path, kind="details", is_done=store.__contains__)
        known_details = details_log.compact()

    summary = RunSummary(movies=len(links), details=DetailsCounts() if fetch_details else None)
    jobs = []
    for movie in links:
        poster = fetch_posters and ((movie.movie_id in known_posters) if retry_failed
                                    else (overwrite or movie.movie_id not in known_posters))
        summary.skipped_known_failure += fetch_posters and not poster and not retry_failed
        details = fetch_details and movie.movie_id not in store and (
            (movie.movie_id in known_details) if retry_failed else movie.movie_id not in known_details)
        if fetch_details and not details:
            summary.details.skipped_existing += movie.movie_id in store
            summary.details.skipped_known_failure += movie.movie_id not in store and not retry_failed
        if poster or details:
            jobs.append(Job(movie, poster, details))
    log.info("%d movies in %s; %d to process", len(links), data / "links.csv", len(jobs))
    if poster_log is not None:
        log.info("posters: %d known failures skipped (see %s; --retry-failed retries them)",
                 summary.skipped_known_failure, poster_log.path)
    if store is not None:
        log.info("details: %d already in %s, %d known failures skipped (see %s; --retry-failed retries them)",
                 summary.details.skipped_existing, store.path, summary.details.skipped_known_failure, details_log.path)
    downloader = PosterDownloader(posters, credentials, poster_log, settings, overwrite=overwrite,
                                  details=store, details_log=details_log)
    summary = downloader.run(jobs, summary)
    report = _finish(summary, posters, poster_log, store, details_log, settings, data, retry_failed)
    if summary.stopped == "invalid_api_key":
        raise InvalidKeyError("TMDB answered 401 Unauthorized: the API key or read token is invalid. Check "
                              "TMDB_API_KEY (v3 key) or TMDB_READ_TOKEN (v4 token); the run was stopped.")
    if summary.stopped == "interrupted":
        raise KeyboardInterrupt
    return report


def _failures_in(failure_log: FailureLog) -> tuple[int, dict]:
    """Compact a failure log; return (movies in it, their count by reason)."""
    remaining = failure_log.compact()
    return len(remaining), dict(sorted(collections.Counter(e.reason for e in remaining.values()).items()))


def _finish(summary: RunSummary, posters: Path, poster_log: FailureLog | None, store: DetailsStore | None,
            details_log: FailureLog | None, settings: DownloadSettings, data: Path, retry_failed: bool) -> dict:
    """Compact the failure logs, write the summary JSON beside each half's output, log it; return it."""
    report = summary.as_dict()
    report.update({"links_csv": str(data / "links.csv"), "halves": [], "posters_dir": None, "failed_log": None,
                   "failures_in_log": 0, "failures_in_log_by_reason": {}})
    if poster_log is not None:
        report["halves"].append("posters")
        report["posters_dir"], report["failed_log"] = str(posters), str(poster_log.path)
        report["failures_in_log"], report["failures_in_log_by_reason"] = _failures_in(poster_log)
    if store is not None:
        report["halves"].append("details")
        in_log, by_reason = _failures_in(details_log)
        report["details"].update({"details_out": str(store.path), "failed_details_log": str(details_log.path),
                                  "movies_in_file": len(store.saved), "failures_in_log": in_log,
                                  "failures_in_log_by_reason": by_reason})
    report.update({
        "retry_failed": retry_failed,
        "settings": {"api_base": settings.api_base, "image_base": settings.image_base,
                     "image_size": settings.image_size, "workers": settings.workers, "rate": settings.rate,
                     "timeout": settings.timeout, "retries": settings.retry.retries,
                     "append_to_response": APPEND_TO_RESPONSE if store is not None else None},
        "finished_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    })
    stopped = f" (STOPPED: {summary.stopped})" if summary.stopped else ""
    if poster_log is not None:
        save_json(posters / SUMMARY_FILE, report)
        log.info("posters: %d downloaded, %d already on disk, %d known failures skipped, %d not found, %d failed %s%s",
                 summary.downloaded, summary.skipped_existing, summary.skipped_known_failure, summary.not_found,
                 summary.failed, dict(summary.failures_by_reason), stopped)
    if store is not None:
        save_json(store.path.with_name(DETAILS_SUMMARY_FILE), report)
        counts = summary.details
        log.info("details: %d saved, %d already in %s, %d known failures skipped, %s%s", counts.saved,
                 counts.skipped_existing, store.path, counts.skipped_known_failure, dict(counts.failures_by_reason),
                 stopped)
    return report
