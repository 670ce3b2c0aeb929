"""Download, verify and extract a MovieLens release from GroupLens (step 1 of the pipeline).

`fetch_movielens("ml-25m", "dataset")` leaves a verified data folder at `dataset/ml-25m/`:

1. skip everything if `dataset/ml-25m/` was already extracted and verified by this module (a
   marker file records the archive checksum and every file's size);
2. use a zip placed by hand at `dataset/ml-25m.zip`, or download it into `dataset/ml-25m.zip.part`,
   resuming an interrupted transfer with an HTTP Range request;
3. verify the archive against the official checksums: the md5 GroupLens publishes beside each zip
   (`<name>.zip.md5`) and, for ml-25m, the sha256 embedded below; a mismatch deletes the `.part`;
4. extract into a temporary folder, check the per-file sha256s where known, then rename it to
   `dataset/<name>/` in one step, so a kill never leaves a half-extracted data folder.

Every failure raises `DownloadError` whose message says how to place the files by hand.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import requests
import urllib3
from tqdm import tqdm

from experiments.artifacts import save_json

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://files.grouplens.org/datasets/movielens"
DEFAULT_RELEASE = "ml-25m"
MARKER_FILE = ".download.json"  # written inside the extracted folder, last thing before the rename
CHUNK_BYTES = 1 << 20

# Official checksums of ml-25m (shared/data/ml-25m-subset/PROVENANCE.md: TFDS url_checksums for the
# zip, Git LFS pointers for the files; links.csv and genome-tags.csv were confirmed independently).
ML25M_ZIP_SHA256 = "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa"
ML25M_FILE_SHA256 = {
    "movies.csv": "c50dea6973e619f9bc1decd4afa3e35358b83a5fb663dac0ec82252a011d023d",
    "links.csv": "dd07bbd9aa8e76d263d8323ddd18ec87b6e00a79a68a5896afe9a737af22322b",
    "ratings.csv": "9c85525758597dca76e8d98cebb9c13e018c2317b09a0878b6d383179526e385",
    "tags.csv": "84793c391a8e2a8b93190b5e780f781563a184c413d02ff2104cc2f442e2830a",
    "genome-tags.csv": "c84bf1e2addbf38432426a2bb2a117a59d76c0873fc875fe8764e92842fd3bfb",
    "genome-scores.csv": "dcee649a8ba5c02b14b5ac5ff34dd27edcf58beff1d902cdf9c114927d1f8f70",
}


@dataclass(frozen=True)
class Release:
    """A MovieLens release: its name (also the zip's top folder) and the checksums we know offline."""

    name: str
    zip_sha256: str | None = None
    file_sha256: dict[str, str] = field(default_factory=dict)


RELEASES = {
    "ml-25m": Release("ml-25m", ML25M_ZIP_SHA256, ML25M_FILE_SHA256),
    "ml-latest-small": Release("ml-latest-small"),
    "ml-20m": Release("ml-20m"),
    "ml-32m": Release("ml-32m"),
    "ml-1m": Release("ml-1m"),
}


class DownloadError(RuntimeError):
    """The release could not be downloaded or verified; the message says how to fix it by hand."""


class _TransientError(Exception):
    """A failure worth retrying (connection dropped, timeout, HTTP 5xx/429)."""


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter: wait base * 2**attempt * U(0.5, 1.5), at most `max_seconds`."""

    retries: int = 4
    base_seconds: float = 2.0
    max_seconds: float = 60.0

    def wait(self, attempt: int) -> float:
        """Seconds to sleep before retry number `attempt` (0-based)."""
        return min(self.max_seconds, self.base_seconds * 2 ** attempt) * random.uniform(0.5, 1.5)


# ----------------------------------------------------------------------------------------------------
# Checksums
# ----------------------------------------------------------------------------------------------------

def file_digests(path: Path, kinds: tuple[str, ...] = ("md5", "sha256")) -> dict[str, str]:
    """Hex digests of a file (hashlib names in `kinds`), reading it once."""
    hashers = {kind: hashlib.new(kind) for kind in kinds}
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            for hasher in hashers.values():
                hasher.update(chunk)
    return {kind: hasher.hexdigest() for kind, hasher in hashers.items()}


def parse_md5_file(text: str, url: str) -> str:
    """The hex digest in a GroupLens `.md5` file (`MD5 (x.zip) = <hex>` or `<hex>  x.zip`)."""
    match = re.search(r"\b([0-9a-fA-F]{32})\b", text)
    if not match:
        raise DownloadError(f"{url} does not contain an md5 digest (got {text[:80]!r}).")
    return match.group(1).lower()


def fetch_official_md5(session: requests.Session, zip_url: str, retry: RetryPolicy, timeout: float) -> str | None:
    """The md5 GroupLens publishes at `<zip_url>.md5`, or None when the server has no such file (404)."""
    url = zip_url + ".md5"

    def attempt() -> str | None:
        resp = _get(session, url, timeout=timeout)
        with resp:
            if resp.status_code == 404:
                return None
            _raise_for_status(resp, url)
            return parse_md5_file(resp.text, url)

    return _with_retries(attempt, retry)


# ----------------------------------------------------------------------------------------------------
# HTTP with resume
# ----------------------------------------------------------------------------------------------------

def _get(session: requests.Session, url: str, timeout: float, headers: dict | None = None) -> requests.Response:
    """GET with streaming; connection problems and timeouts become `_TransientError`."""
    try:
        return session.get(url, headers=headers or {}, timeout=timeout, stream=True)
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise _TransientError(f"cannot reach {url}: {type(exc).__name__}") from exc


def _raise_for_status(resp: requests.Response, url: str) -> None:
    """Map an unexpected HTTP status to a transient (5xx/429) or a final `DownloadError`."""
    if resp.status_code == 429 or resp.status_code >= 500:
        raise _TransientError(f"{url} answered HTTP {resp.status_code}")
    if resp.status_code >= 400:
        raise DownloadError(f"{url} answered HTTP {resp.status_code}; check the release name and --base-url.")


def _with_retries(action, retry: RetryPolicy):
    """Run `action()`; on `_TransientError` sleep with backoff and try again, `retry.retries` times."""
    for attempt in range(retry.retries + 1):
        try:
            return action()
        except _TransientError as exc:
            if attempt == retry.retries:
                raise
            pause = retry.wait(attempt)
            log.warning("%s (attempt %d/%d); retrying in %.1f s", exc, attempt + 1, retry.retries + 1, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


def download_with_resume(session: requests.Session, url: str, part: Path, timeout: float) -> None:
    """Append the rest of `url` to `part` (one HTTP request), resuming from its current size.

    206: the server honoured `Range`, append. 200: it ignored `Range`, start over. 416: the range
    starts at or past the end, so `part` is already complete (or longer than the file: start over).
    A dropped connection raises `_TransientError` and keeps what arrived, for the next attempt.
    """
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    resp = _get(session, url, timeout=timeout, headers=headers)
    with resp:
        if resp.status_code == 416:
            total = _total_from_content_range(resp.headers.get("Content-Range", ""))
            if total is not None and total == have:
                log.info("%s is already complete (%d bytes)", part, have)
                return
            log.warning("server rejected resuming %s at byte %d; starting over", part, have)
            part.unlink()
            raise _TransientError(f"{url} answered 416 to a resume request")
        _raise_for_status(resp, url)
        if resp.status_code == 206:
            start = _start_from_content_range(resp.headers.get("Content-Range", ""))
            if start != have:
                part.unlink()
                raise _TransientError(f"{url} resumed at byte {start}, expected {have}; starting over")
            mode, done = "ab", have
            log.info("resuming %s at byte %d", part.name, have)
        else:  # 200: the whole file, whether or not we asked for a range
            if have:
                log.info("server ignored the Range request; downloading %s from the start", part.name)
            mode, done = "wb", 0
        length = int(resp.headers.get("Content-Length", 0)) or None
        total = done + length if length else None
        with open(part, mode) as fh, tqdm(total=total, initial=done, unit="B", unit_scale=True,
                                           unit_divisor=1024, desc=part.name) as bar:
            try:
                # read1 hands over whatever arrived, so bytes before a dropped connection are kept
                # (iter_content discards a partially filled chunk when the connection breaks).
                while chunk := resp.raw.read1(CHUNK_BYTES, decode_content=True):
                    fh.write(chunk)
                    bar.update(len(chunk))
            except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
                raise _TransientError(f"connection to {url} dropped after {fh.tell()} bytes "
                                      f"({type(exc).__name__})") from exc
            finally:
                fh.flush()
                os.fsync(fh.fileno())


def _start_from_content_range(value: str) -> int | None:
    """First byte of `Content-Range: bytes <start>-<end>/<total>`, or None."""
    match = re.match(r"bytes (\d+)-\d+/", value)
    return int(match.group(1)) if match else None


def _total_from_content_range(value: str) -> int | None:
    """Total size in `Content-Range: bytes */<total>` (or `bytes a-b/<total>`), or None."""
    match = re.search(r"/(\d+)\s*$", value)
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------------------------------
# Verification and extraction
# ----------------------------------------------------------------------------------------------------

def verify_archive(path: Path, expected_md5: str | None, expected_sha256: str | None) -> dict[str, str]:
    """Check `path` against every expected digest given; return its digests. Raises on mismatch."""
    if expected_md5 is None and expected_sha256 is None:
        raise _no_checksum_error(path.name)
    digests = file_digests(path)
    for kind, expected in (("md5", expected_md5), ("sha256", expected_sha256)):
        if expected is not None and digests[kind] != expected.lower():
            raise _ChecksumMismatch(f"{path} has {kind} {digests[kind]}, expected {expected.lower()}")
    return digests


class _ChecksumMismatch(DownloadError):
    """The archive's digest differs from the official one."""


def _no_checksum_error(zip_name: str) -> DownloadError:
    """The error for an archive that nothing official can verify."""
    return DownloadError(f"no official checksum is known for {zip_name}: the server has no .md5 file and "
                         f"none is embedded. Pass --sha256 <hex> to verify it against a digest you trust.")


def _safe_members(archive: zipfile.ZipFile, top: str) -> list[zipfile.ZipInfo]:
    """All members, after checking each lies under `top/` (no absolute paths, no `..`)."""
    members = archive.infolist()
    for member in members:
        parts = Path(member.filename).parts
        if member.filename.startswith("/") or ".." in parts or not parts or parts[0] != top:
            raise DownloadError(f"the archive holds {member.filename!r}, outside its top folder {top}/: "
                                f"it is not a MovieLens {top} release.")
    return members


def extract_release(zip_path: Path, release: Release, dest: Path, zip_digests: dict[str, str]) -> Path:
    """Extract `zip_path` (top folder `<name>/`) to `dest/<name>/` atomically; return that folder.

    Extraction goes to a temporary folder inside `dest`; known per-file sha256s are checked and a
    marker listing every file's size is written before the final rename.
    """
    target = dest / release.name
    staging = Path(tempfile.mkdtemp(prefix=f".{release.name}.extract-", dir=dest))
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = _safe_members(archive, release.name)
            for member in tqdm(members, desc=f"extract {release.name}", unit="file"):
                archive.extract(member, staging)
        extracted = staging / release.name
        _check_file_hashes(extracted, release)
        _write_marker(extracted, release, archive=zip_digests)
        if target.exists():  # only with overwrite: move the old folder into staging (deleted below)
            os.rename(target, staging / "replaced")
        os.rename(extracted, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_marker(folder: Path, release: Release, archive: dict[str, str] | None) -> None:
    """Record that `folder` is verified: the archive digests (None: placed by hand) and every file size."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER_FILE}
    marker = {"release": release.name, "archive": archive, "files": files}
    save_json(folder / MARKER_FILE, marker)


def _check_file_hashes(folder: Path, release: Release) -> None:
    """Compare every file with a known official sha256 (missing ones are an error)."""
    for name, expected in release.file_sha256.items():
        path = folder / name
        if not path.is_file():
            raise DownloadError(f"{release.name} archive lacks {name}; it is not the official release.")
        log.info("checking sha256 of %s", path)
        actual = file_digests(path, ("sha256",))["sha256"]
        if actual != expected:
            raise DownloadError(f"{path.name} in {release.name} has sha256 {actual}, expected {expected}: "
                                f"the archive is not the official release.")


def is_extracted(folder: Path) -> bool:
    """True when `folder` was extracted by this module and every listed file still has its size."""
    marker = folder / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())


# ----------------------------------------------------------------------------------------------------
# The whole step
# ----------------------------------------------------------------------------------------------------

def manual_instructions(release: Release, url: str, dest: Path, expected_md5: str | None = None,
                        expected_sha256: str | None = None) -> str:
    """How to place the release by hand, with the URL, the paths and the expected checksum."""
    sums = [f"sha256 {expected_sha256}" if expected_sha256 else "",
            f"md5 {expected_md5}" if expected_md5 else f"md5 in {url}.md5"]
    return (f"To place it by hand: download {url} on a machine with internet access, then either put the "
            f"zip at {dest / (release.name + '.zip')} ({', '.join(s for s in sums if s)}) and rerun this "
            f"step, or extract it so that {dest / release.name}/ holds its files (movies.csv, ...).")


def fetch_movielens(name: str = DEFAULT_RELEASE, dest: str | os.PathLike = "dataset", *,
                    base_url: str = DEFAULT_BASE_URL, sha256: str | None = None, overwrite: bool = False,
                    keep_zip: bool = False, retry: RetryPolicy | None = None, timeout: float = 60.0,
                    session: requests.Session | None = None) -> Path:
    """Make `dest/<name>/` a verified, extracted MovieLens release and return its path.

    name: one of RELEASES. base_url: where `<name>.zip` and `<name>.zip.md5` live. sha256: the zip's
    expected digest (default: the embedded official one, where known). overwrite: re-download and
    replace an existing folder. keep_zip: keep `dest/<name>.zip` after extracting a download.
    Raises DownloadError (offline, checksum mismatch, bad archive) with instructions for a manual setup.
    """
    if name not in RELEASES:
        raise DownloadError(f"unknown MovieLens release {name!r}; choose one of {', '.join(RELEASES)}.")
    release = RELEASES[name]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / release.name
    url = f"{base_url.rstrip('/')}/{release.name}.zip"
    expected_sha256 = (sha256 or release.zip_sha256 or "").lower() or None
    retry = retry or RetryPolicy()
    _remove_stale_staging(dest, release)

    if target.exists() and not overwrite:
        return _accept_existing_folder(target, release)

    zip_path = dest / f"{release.name}.zip"
    part = dest / f"{release.name}.zip.part"
    session = session or requests.Session()
    downloaded = not zip_path.exists()
    expected_md5 = None
    try:
        # A zip placed by hand is checked against the embedded sha256 offline; without one, the
        # published md5 is the only official reference, so it is fetched (and needs the network).
        if downloaded or expected_sha256 is None:
            expected_md5 = fetch_official_md5(session, url, retry, timeout)
        if expected_md5 is None and expected_sha256 is None:  # fail before downloading what cannot be verified
            raise _no_checksum_error(zip_path.name)
        if downloaded:
            _with_retries(lambda: download_with_resume(session, url, part, timeout), retry)
            source = part
        else:
            log.info("using the archive placed at %s", zip_path)
            source = zip_path
        digests = verify_archive(source, expected_md5, expected_sha256)
    except _TransientError as exc:
        kept = (f"The partial download {part} is kept and the next run resumes it. " if part.exists() else "")
        if not downloaded:  # only the .md5 was needed: the zip is there, it cannot be checked offline
            kept = f"To check the zip placed at {zip_path} offline, pass --sha256 <hex> of a digest you trust. "
        raise DownloadError(f"could not download {url} ({exc}). {kept}{manual_instructions(release, url, dest, expected_md5, expected_sha256)}"
                            ) from exc
    except _ChecksumMismatch as exc:
        if downloaded:
            part.unlink(missing_ok=True)  # a corrupt .part must not be resumed
            what = "The download was deleted; rerun to download it again."
        else:  # a hand-placed zip is the user's: keep it, but a rerun would reuse it, so say to remove it
            what = f"The zip placed by hand was kept: delete {zip_path} and rerun to download it again."
        raise DownloadError(f"checksum mismatch: {exc}. {what} "
                            f"{manual_instructions(release, url, dest, expected_md5, expected_sha256)}") from exc
    if downloaded:
        os.replace(part, zip_path)
    log.info("verified %s (sha256 %s)", zip_path.name, digests["sha256"])
    try:
        extract_release(zip_path, release, dest, digests)
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{zip_path} is not a valid zip ({exc}). Delete it and rerun. "
                            f"{manual_instructions(release, url, dest, expected_md5, expected_sha256)}") from exc
    if downloaded and not keep_zip:
        zip_path.unlink()
    log.info("extracted %s to %s", release.name, target)
    return target


def _remove_stale_staging(dest: Path, release: Release) -> None:
    """Delete temporary extraction folders left by a killed run."""
    for stale in dest.glob(f".{release.name}.extract-*"):
        log.info("removing %s left by an interrupted extraction", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _accept_existing_folder(target: Path, release: Release) -> Path:
    """Skip the download for a folder that is already there, verifying what can be verified."""
    if is_extracted(target):
        log.info("%s is already downloaded and verified; skipping (use --overwrite to redo)", target)
        return target
    if release.file_sha256:
        log.info("%s was placed by hand; checking its files against the official sha256s", target)
        _check_file_hashes(target, release)
        _write_marker(target, release, archive=None)  # so the next run skips the hashing
        return target
    log.warning("%s exists but was not extracted by this step and no official per-file checksums are known "
                "for %s; using it as is (use --overwrite to download it again).", target, release.name)
    return target
