"""Step 3 (experiments/tmdb_posters.py) against a fake TMDB server on 127.0.0.1 that injects faults."""
from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image

from experiments.tmdb_posters import (SUMMARY_FILE, DownloadSettings, FailureLog, InvalidKeyError, MissingKeyError,
                                      RateLimiter, RetryPolicy, TmdbCredentials, download_posters, parse_retry_after,
                                      read_links, scrub)
from tests.fake_servers import INVALID_API_KEY, RESOURCE_NOT_FOUND, FakeTmdbServer, closed_port_url, movie_details

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLES = SHARED_DATA / "tmdb-api-samples" / "jdrouet-tmdb-api"
KEY = "k3y-SECRET-0123456789abcdef"


def write_links(folder: Path, rows: list[tuple[int, int | None]], newline: str = "\r\n") -> Path:
    """A links.csv (movieId,imdbId,tmdbId) with the given rows; tmdbId None is written empty."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["movieId,imdbId,tmdbId"] + [f"{m},{m:07d},{'' if t is None else t}" for m, t in rows]
    (folder / "links.csv").write_bytes(newline.join(lines).encode() + newline.encode())
    return folder


def fast_settings(server: FakeTmdbServer, **overrides) -> DownloadSettings:
    """Settings for tests: quick backoff, no rate limit, a timeout that a loaded CI machine still meets."""
    values = dict(api_base=server.url, image_base=server.url + "/t/p", workers=4, rate=0, timeout=1.0,
                  retry=RetryPolicy(retries=2, base_seconds=0.02, max_seconds=0.1))
    values.update(overrides)
    return DownloadSettings(**values)


def run(data: Path, server: FakeTmdbServer, key: str = KEY, **kwargs) -> dict:
    """download_posters with test settings and the failure log in the data folder."""
    settings = kwargs.pop("settings", None) or fast_settings(server)
    return download_posters(data, TmdbCredentials(api_key=key), failed_log=data / "failed.txt",
                            settings=settings, **kwargs)


def log_entries(data: Path) -> list[tuple[int, str]]:
    """(movieId, reason) of every data line of the failure log, in file order."""
    lines = (data / "failed.txt").read_text().splitlines()
    return [(int(line.split("\t")[0]), line.split("\t")[2]) for line in lines if not line.startswith("#")]


def assert_posters_valid(posters: Path, server: FakeTmdbServer, expected: dict[int, str]) -> None:
    """Exactly the expected posters exist (movieId -> poster_path), each byte-equal to the served image and
    decodable; nothing else but the summary lies in the folder (no temp files)."""
    names = sorted(p.name for p in posters.iterdir())
    assert names == sorted([f"{m}.jpg" for m in expected] + [SUMMARY_FILE])
    for movie_id, poster_path in expected.items():
        data = (posters / f"{movie_id}.jpg").read_bytes()
        assert data == server.images[poster_path]
        Image.open(io.BytesIO(data)).load()


# ----------------------------------------------------------------------------------------------------
# Unit-level pieces
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("newline", ["\r\n", "\n"], ids=["crlf", "lf"])
def test_read_links_handles_line_endings_and_missing_tmdb_ids(tmp_path, newline):
    write_links(tmp_path, [(1, 862), (2, None), (3, 8844)], newline)
    links = read_links(tmp_path / "links.csv")
    assert [(l.movie_id, l.tmdb_id) for l in links] == [(1, 862), (2, None), (3, 8844)]


def test_read_links_errors_name_file_line_and_field(tmp_path):
    (tmp_path / "links.csv").write_text("movieId,imdbId,tmdbId\n1,0114709,862.0\n2,0113497,abc\n")
    with pytest.raises(ValueError, match=r"links\.csv line 3: tmdbId 'abc'"):
        read_links(tmp_path / "links.csv")
    (tmp_path / "links.csv").write_text("movieId,imdbId\n1,0114709\n")
    with pytest.raises(ValueError, match=r"lacks column.*tmdbId"):
        read_links(tmp_path / "links.csv")


def test_rate_limiter_is_shared_by_threads():
    limiter = RateLimiter(rate=50.0)
    stamps: list[float] = []
    lock = threading.Lock()

    def worker():
        for _ in range(10):
            limiter.acquire()
            with lock:
                stamps.append(time.monotonic())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    assert len(stamps) == 80
    assert elapsed >= 79 / 50 * 0.95, "80 requests at 50/s with a burst of 1 need at least 1.58 s"
    stamps.sort()
    # no one-second window holds more than rate + burst (51) grants; the stamps are taken just after
    # acquire(), so a preempted thread may shift one by a few ms (+4 slack). Unshared buckets would give 400.
    assert max(sum(1 for s in stamps if t0 <= s < t0 + 1.0) for t0 in stamps) <= 55


def test_rate_limiter_pause_holds_back_other_threads():
    limiter = RateLimiter(rate=0)  # no rate limit: only the pause can block
    limiter.pause(0.5)
    waited: list[float] = []

    def worker():
        start = time.monotonic()
        limiter.acquire()
        waited.append(time.monotonic() - start)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(waited) == 4 and min(waited) >= 0.4
    stop = threading.Event()
    stop.set()
    limiter.pause(60)
    limiter.acquire(stop)  # a stop request ends the wait at once (the test would hang otherwise)


def test_retry_after_parsing():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") <= 0.0  # a date in the past: go now


def test_scrub_removes_key_from_urls_and_text():
    text = f"GET http://x/3/movie/5?api_key={KEY}&language=en failed; token {KEY}"
    cleaned = scrub(text, [KEY])
    assert KEY not in cleaned and "api_key=***" in cleaned
    assert scrub("http://x/3/movie/5?api_key=other", []) == "http://x/3/movie/5?api_key=***"


def test_credentials_come_from_env_and_are_never_shown():
    creds = TmdbCredentials.resolve(environ={"TMDB_API_KEY": KEY})
    assert creds.request_args() == ({"api_key": KEY}, {})
    assert KEY not in repr(creds) and KEY not in str(creds)
    token = TmdbCredentials.resolve(read_token="tok", environ={"TMDB_API_KEY": KEY})
    assert token.request_args() == ({}, {"Authorization": "Bearer tok"})
    with pytest.raises(MissingKeyError, match="TMDB_API_KEY"):
        TmdbCredentials.resolve(environ={})


def test_fake_responses_have_the_shape_of_the_real_samples():
    if not SAMPLES.is_dir():
        pytest.skip(f"real TMDB samples not found at {SAMPLES} (../shared is absent)")
    real = json.loads((SAMPLES / "movie-details.json").read_text())
    fake = movie_details(550, "/x.jpg")
    assert set(fake) == set(real)
    assert {k: type(v) for k, v in fake.items() if real[k] is not None} == \
           {k: type(v) for k, v in real.items() if v is not None}
    assert json.loads((SAMPLES / "invalid-api-key.json").read_text()) == INVALID_API_KEY
    assert json.loads((SAMPLES / "resource-not-found.json").read_text()) == RESOURCE_NOT_FOUND


@pytest.mark.skipif(not (SHARED_DATA / "ml-25m-subset" / "links.csv").is_file(), reason="../shared/data is absent")
def test_read_links_on_the_real_ml25m_file():
    links = read_links(SHARED_DATA / "ml-25m-subset" / "links.csv")
    # PROVENANCE.md: 62,423 movies, 107 without tmdbId
    assert len(links) == 62423 and sum(l.tmdb_id is None for l in links) == 107
    assert (links[0].movie_id, links[0].tmdb_id) == (1, 862)  # Toy Story


@pytest.mark.skipif(not (SHARED_DATA / "ml-latest-small-posters" / "posters").is_dir(), reason="../shared/data is absent")
def test_real_posters_pass_validation_and_are_stored_byte_exact(tmp_path):
    real_links = read_links(SHARED_DATA / "ml-latest-small" / "links.csv")
    real_posters = SHARED_DATA / "ml-latest-small-posters" / "posters"
    chosen = [l for l in real_links if l.tmdb_id is not None and (real_posters / f"{l.movie_id}.jpg").is_file()][:40]
    data = write_links(tmp_path / "data", [(l.movie_id, l.tmdb_id) for l in chosen])
    movies = {l.tmdb_id: f"/{l.movie_id}.jpg" for l in chosen}
    images = {f"/{l.movie_id}.jpg": (real_posters / f"{l.movie_id}.jpg").read_bytes() for l in chosen}
    with FakeTmdbServer(movies, api_key=KEY, images=images) as server:
        report = run(data, server)
    assert report["downloaded"] == len(chosen) == 40
    assert_posters_valid(data / "posters", server, {l.movie_id: f"/{l.movie_id}.jpg" for l in chosen})


# ----------------------------------------------------------------------------------------------------
# Whole runs against the fake server
# ----------------------------------------------------------------------------------------------------

def test_faults_are_retried_or_recorded_with_their_reason(tmp_path):
    data = write_links(tmp_path / "data", [(1, 101), (2, None), (3, 103), (4, 104), (5, 105), (6, 106),
                                           (7, 107), (8, 108), (9, 109)])
    movies = {101: "/a.jpg", 103: None, 105: "/e.jpg", 106: "/f.jpg", 107: "/g.jpg", 108: "/h.jpg", 109: "/i.jpg"}
    faults = {"/3/movie/105": ["500", "503"],              # transient: retried, then fine
              "/t/p/w500/f.jpg": ["truncated", "html"],    # bad images: rejected, retried
              "/3/movie/107": ["slow"],                    # slower than the timeout: retried
              "/t/p/w500/h.jpg": ["503"] * 10,             # never recovers: http_503 after 3 attempts
              "/t/p/w500/i.jpg": ["html"] * 10}            # never an image: invalid_image
    with FakeTmdbServer(movies, api_key=KEY, faults=faults, slow_seconds=2.5) as server:
        report = run(data, server)
        assert server.count("/3/movie/104") == 1, "404 is not retried"
        assert server.count("/t/p/w500/h.jpg") == 3 and server.count("/t/p/w500/f.jpg") == 3
        image_requests = [r for r in server.requests if r["path"].startswith("/t/p/")]
        assert all("api_key" not in r["path"] and "Authorization" not in r["headers"] for r in image_requests), \
            "the key is only sent to the API"
    assert_posters_valid(data / "posters", server, {1: "/a.jpg", 5: "/e.jpg", 6: "/f.jpg", 7: "/g.jpg"})
    assert sorted(log_entries(data)) == [(2, "no_tmdb_id"), (3, "no_poster_path"), (4, "not_found"),
                                         (8, "http_503"), (9, "invalid_image")]
    assert report["downloaded"] == 4 and report["not_found"] == 1 and report["failed"] == 4
    assert report["failures_by_reason"] == {"http_503": 1, "invalid_image": 1, "no_poster_path": 1,
                                            "no_tmdb_id": 1, "not_found": 1}
    assert json.loads((data / "posters" / SUMMARY_FILE).read_text())["downloaded"] == 4


def test_429_retry_after_is_honoured_by_the_shared_limiter(tmp_path, monkeypatch):
    pauses: list[float] = []
    shared_pause = RateLimiter.pause
    monkeypatch.setattr(RateLimiter, "pause", lambda self, seconds: (pauses.append(seconds), shared_pause(self, seconds)))
    data = write_links(tmp_path / "data", [(m, 100 + m) for m in range(1, 9)])
    movies = {100 + m: f"/{m}.jpg" for m in range(1, 9)}
    with FakeTmdbServer(movies, api_key=KEY, faults={"/3/movie/101": ["429"]}, retry_after="1") as server:
        report = run(data, server, settings=fast_settings(server, workers=1))
        stamps = [r["time"] for r in server.requests]
    assert report["downloaded"] == 8
    assert pauses == [1.0], "a 429 pauses the limiter shared by every thread (see the pause test above)"
    # workers=1 makes the order deterministic: request 0 is the 429, request 1 its retry, >= 1 s later
    assert stamps[1] - stamps[0] >= 0.95


def test_invalid_key_stops_everything_at_once(tmp_path):
    data = write_links(tmp_path / "data", [(m, 100 + m) for m in range(1, 61)])
    with FakeTmdbServer({100 + m: f"/{m}.jpg" for m in range(1, 61)}, api_key=KEY) as server:
        with pytest.raises(InvalidKeyError, match="invalid"):
            run(data, server, key="wrong-key")
        assert len(server.requests) <= 8, "only the requests already in flight may be sent"
        assert not any(r["path"].startswith("/t/p/") for r in server.requests)
    assert not (data / "failed.txt").exists() or log_entries(data) == [], "a bad key is not the movies' fault"
    assert json.loads((data / "posters" / SUMMARY_FILE).read_text())["stopped"] == "invalid_api_key"


def test_read_token_is_sent_as_bearer_header(tmp_path):
    data = write_links(tmp_path / "data", [(1, 101)])
    with FakeTmdbServer({101: "/a.jpg"}, api_key=None, read_token="v4-token") as server:
        report = download_posters(data, TmdbCredentials(read_token="v4-token"), failed_log=data / "failed.txt",
                                  settings=fast_settings(server))
        api_request = next(r for r in server.requests if r["path"].startswith("/3/"))
    assert report["downloaded"] == 1
    assert "api_key" not in api_request["path"] and api_request["headers"]["Authorization"] == "Bearer v4-token"


def test_rerun_skips_valid_posters_and_replaces_corrupt_ones(tmp_path):
    data = write_links(tmp_path / "data", [(m, 100 + m) for m in range(1, 7)])
    movies = {100 + m: f"/{m}.jpg" for m in range(1, 7)}
    with FakeTmdbServer(movies, api_key=KEY) as server:
        run(data, server)
        (data / "posters" / "2.jpg").write_bytes(b"<html>not an image</html>")
        (data / "posters" / "3.jpg").unlink()
        n_before = server.count("/3/movie/101")
        report = run(data, server)
        assert server.count("/3/movie/101") == n_before, "a valid poster is not fetched again"
    assert report["skipped_existing"] == 4 and report["downloaded"] == 2
    assert_posters_valid(data / "posters", server, {m: f"/{m}.jpg" for m in range(1, 7)})


def test_corrupt_poster_that_cannot_be_replaced_is_deleted_and_logged(tmp_path):
    data = write_links(tmp_path / "data", [(1, 101)])
    (data / "posters").mkdir()
    (data / "posters" / "1.jpg").write_bytes(b"<html>not an image</html>")
    with FakeTmdbServer({}, api_key=KEY) as server:  # 101 is unknown now: 404
        report = run(data, server)
    assert not (data / "posters" / "1.jpg").exists(), "an undecodable file must not pass for a poster"
    assert log_entries(data) == [(1, "not_found")] and report["failures_in_log"] == 1


def test_retry_failed_retries_only_logged_movies_and_clears_them(tmp_path):
    data = write_links(tmp_path / "data", [(1, 101), (2, 102), (3, 103), (4, None)])
    movies = {101: "/a.jpg", 103: "/c.jpg"}
    with FakeTmdbServer(movies, api_key=KEY, faults={"/t/p/w500/c.jpg": ["500"] * 3}) as server:
        run(data, server)
        assert sorted(log_entries(data)) == [(2, "not_found"), (3, "http_500"), (4, "no_tmdb_id")]
        n_requests = len(server.requests)
        plain = run(data, server)  # known failures are skipped: no request at all
        assert len(server.requests) == n_requests and plain["skipped_known_failure"] == 3
        retried = run(data, server, retry_failed=True)
        retried_paths = {urlsplit(r["path"]).path for r in server.requests[n_requests:]}
    assert retried_paths == {"/3/movie/102", "/3/movie/103", "/t/p/w500/c.jpg"}
    assert retried["downloaded"] == 1
    assert sorted(log_entries(data)) == [(2, "not_found"), (4, "no_tmdb_id")], "movie 3 has its poster now"
    assert_posters_valid(data / "posters", server, {1: "/a.jpg", 3: "/c.jpg"})


def test_failure_log_belongs_to_one_posters_folder(tmp_path):
    data = write_links(tmp_path / "data", [(1, None)])
    FailureLog(data / "failed.txt", tmp_path / "other_posters").append(read_links(data / "links.csv")[0], "x")
    with FakeTmdbServer({}, api_key=KEY) as server:
        with pytest.raises(ValueError, match="records failures for"):
            run(data, server)


def test_torn_last_line_of_failure_log_is_ignored(tmp_path):
    posters = tmp_path / "posters"
    log = FailureLog(tmp_path / "failed.txt", posters)
    log.append(read_links(write_links(tmp_path, [(7, 70)]) / "links.csv")[0], "http_500")
    with open(log.path, "a") as fh:
        fh.write("8\t80\tnot_fo")
    assert list(log.compact()) == [7]
    assert log.path.read_text().endswith("\thttp_500\t" + log.read()[7].time_utc + "\n")


# ----------------------------------------------------------------------------------------------------
# The script: exit codes, secrets, kill and resume
# ----------------------------------------------------------------------------------------------------

def load_script():
    """Import experiments/03_download_posters.py (its name starts with a digit)."""
    spec = importlib.util.spec_from_file_location("download_posters_script", REPO / "experiments" / "03_download_posters.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_key_is_never_printed_logged_or_written(tmp_path, monkeypatch, capsys, caplog):
    script = load_script()
    monkeypatch.setenv("TMDB_API_KEY", KEY)
    monkeypatch.delenv("TMDB_READ_TOKEN", raising=False)
    data = write_links(tmp_path / "data", [(1, 101), (2, 102)])
    # nothing listens at the API: requests' ConnectionError messages carry the full URL with api_key=...
    with caplog.at_level(logging.DEBUG):
        status = script.main(["--data", str(data), "--failed-log", str(data / "failed.txt"),
                              "--api-base", closed_port_url(), "--retries", "1", "--backoff", "0.01"])
    out = capsys.readouterr()
    assert status == 0
    assert "connection_error" in (data / "failed.txt").read_text()
    assert "api_key=***" in caplog.text, "the test must actually exercise a message carrying the URL"
    written = [p.read_text() for p in (data / "posters").iterdir()] + [(data / "failed.txt").read_text()]
    for text in [out.out, out.err, caplog.text] + written:
        assert KEY not in text


def test_unexpected_errors_are_logged_without_the_key(tmp_path, monkeypatch, caplog):
    script = load_script()
    monkeypatch.setenv("TMDB_API_KEY", KEY)

    def explode(*args, **kwargs):
        raise RuntimeError(f"boom at http://x/3/movie/1?api_key={KEY}")

    monkeypatch.setattr(script, "download_posters", explode)
    assert script.main(["--data", str(tmp_path)]) == 1
    assert "boom" in caplog.text and "api_key=***" in caplog.text and KEY not in caplog.text


def test_script_exit_codes(tmp_path, monkeypatch, caplog):
    script = load_script()
    monkeypatch.delenv("TMDB_API_KEY", raising=False)
    monkeypatch.delenv("TMDB_READ_TOKEN", raising=False)
    data = write_links(tmp_path / "data", [(1, 101)])
    assert script.main(["--data", str(data), "--failed-log", str(data / "failed.txt")]) == 1
    assert "TMDB_API_KEY" in caplog.text
    with FakeTmdbServer({101: "/a.jpg"}, api_key=KEY) as server:
        flags = ["--data", str(data), "--failed-log", str(data / "failed.txt"), "--api-base", server.url,
                 "--image-base", server.url + "/t/p"]
        assert script.main(flags + ["--api-key", "wrong"]) == 2
        assert script.main(flags + ["--api-key", KEY]) == 0
    assert (data / "posters" / "1.jpg").is_file()
    assert script.main(["--data", str(tmp_path / "nowhere"), "--api-key", KEY]) == 1
    caplog.clear()
    assert script.main(flags + ["--api-key", KEY, "--api-base", "api.themoviedb.org"]) == 1
    assert "--api-base 'api.themoviedb.org' is not an http(s) URL" in caplog.text


def script_command(data: Path, server: FakeTmdbServer) -> list[str]:
    """The step-3 command line against the fake server (4 workers, no rate limit), logs in the data folder."""
    return [sys.executable, str(REPO / "experiments" / "03_download_posters.py"), "--data", str(data),
            "--failed-log", str(data / "failed.txt"), "--api-base", server.url,
            "--image-base", server.url + "/t/p", "--workers", "4", "--rate", "0", "--timeout", "5"]


def kill_when(command: list[str], env: dict, ready, seconds: float = 30) -> None:
    """Start `command`, SIGKILL it as soon as `ready()` holds; it must still be running by then."""
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    assert proc.poll() is None, "the first run must still be running when it is killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_mid_run_then_rerun_leaves_consistent_posters_and_log(tmp_path):
    n = 80
    no_tmdb, no_poster, missing = {5, 40}, {12, 60}, {20, 70}
    rows = [(m, None if m in no_tmdb else 1000 + m) for m in range(1, n + 1)]
    data = write_links(tmp_path / "data", rows)
    movies = {1000 + m: (None if m in no_poster else f"/p{m}.jpg") for m in range(1, n + 1)
              if m not in no_tmdb | missing}
    expected_posters = {m: f"/p{m}.jpg" for m in range(1, n + 1) if m not in no_tmdb | no_poster | missing}
    posters = data / "posters"
    with FakeTmdbServer(movies, api_key=KEY, latency=0.04) as server:
        command, env = script_command(data, server), {**os.environ, "TMDB_API_KEY": KEY}
        kill_when(command, env, lambda: posters.is_dir() and sum(p.suffix == ".jpg" for p in posters.iterdir()) >= 15)

        on_disk = [p for p in posters.iterdir() if p.name.endswith(".jpg") and not p.name.startswith(".")]
        assert 15 <= len(on_disk) < len(expected_posters)
        for path in on_disk:  # a kill at any moment leaves no partial poster
            Image.open(path).load()
        n_logged = len({m for m, _ in log_entries(data)}) if (data / "failed.txt").exists() else 0

        rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads((posters / SUMMARY_FILE).read_text())
    assert summary["skipped_existing"] == len(on_disk) and summary["skipped_known_failure"] == n_logged
    assert_posters_valid(posters, server, expected_posters)
    entries = log_entries(data)
    assert len(entries) == len({m for m, _ in entries}), "one line per movie after the rerun"
    assert sorted(entries) == sorted([(m, "no_tmdb_id") for m in no_tmdb] + [(m, "no_poster_path") for m in no_poster]
                                     + [(m, "not_found") for m in missing])
    assert KEY not in rerun.stderr + rerun.stdout
