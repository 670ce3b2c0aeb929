"""Step 3's details half (DATA/tmdb/details.jsonl) against the fake TMDB server: one request per movie,
resume after a kill (torn last line included), the --details-only / --posters-only halves, failures, secrets."""
from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from experiments.artifacts import ArtifactError
from experiments.tmdb_details import details_line, load_tmdb_details
from experiments.tmdb_posters import DETAILS_SUMMARY_FILE, SUMMARY_FILE, TmdbCredentials, download_posters
from tests.fake_servers import FakeTmdbServer, closed_port_url, movie_credits, movie_details, movie_keywords
from tests.test_download_posters import KEY, REPO, SAMPLES, assert_posters_valid, fast_settings, kill_when, \
    load_script, log_entries, script_command, write_links

REAL_DETAILS = REPO.parent / "shared" / "data" / "ml-latest-small-tmdb" / "details.jsonl"
APPEND = ["credits,keywords"]


def run(data: Path, server: FakeTmdbServer, **kwargs) -> dict:
    """download_posters with test settings; logs data/failed.txt and (beside it) data/failed_details.txt."""
    settings = kwargs.pop("settings", None) or fast_settings(server)
    return download_posters(data, TmdbCredentials(api_key=KEY), failed_log=data / "failed.txt", settings=settings,
                            **kwargs)


def details_path(data: Path) -> Path:
    return data / "tmdb" / "details.jsonl"


def saved_lines(data: Path) -> list[dict]:
    """Every line of details.jsonl parsed; asserts each one is complete (ends with a newline) and valid JSON."""
    raw = details_path(data).read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), "no torn last line"
    return [json.loads(line) for line in raw.splitlines()]


def details_failures(data: Path) -> list[tuple[int, str]]:
    """(movieId, reason) of the details failure log, sorted; [] when no failure was ever logged."""
    if not (data / "failed_details.txt").exists():
        return []
    lines = (data / "failed_details.txt").read_text().splitlines()
    return sorted((int(line.split("\t")[0]), line.split("\t")[2]) for line in lines if not line.startswith("#"))


def movie_requests(server: FakeTmdbServer, start: int = 0) -> list[tuple[int, dict]]:
    """(tmdbId, query) of every /3/movie request from index `start` on."""
    out = []
    for record in server.requests[start:]:
        split = urlsplit(record["path"])
        if split.path.startswith("/3/movie/"):
            out.append((int(split.path.rsplit("/", 1)[1]), parse_qs(split.query)))
    return out


def expected_response(tmdb_id: int, poster_path: str | None) -> dict:
    """What the fake server answers to /3/movie/{id}?append_to_response=credits,keywords."""
    return {**movie_details(tmdb_id, poster_path), "credits": movie_credits(tmdb_id),
            "keywords": movie_keywords(tmdb_id)}


# ----------------------------------------------------------------------------------------------------
# The fake answers in the real shape
# ----------------------------------------------------------------------------------------------------

def test_fake_credits_and_keywords_have_the_shape_of_the_real_api():
    if not SAMPLES.is_dir() or not REAL_DETAILS.is_file():
        pytest.skip(f"real TMDB samples not found at {SAMPLES} / {REAL_DETAILS} (../shared is absent)")
    credits = json.loads((SAMPLES / "movie-credits.json").read_text())
    keywords = json.loads((SAMPLES / "movie-keywords.json").read_text())
    fake_credits, fake_keywords = movie_credits(550), movie_keywords(550)

    def shape(item: dict) -> dict:
        return {k: type(v) for k, v in item.items() if v is not None}

    for real_item, fake_item in ((credits["cast"][0], fake_credits["cast"][0]), (credits["crew"][0], fake_credits["crew"][0]),
                                 (keywords["keywords"][0], fake_keywords["keywords"][0])):
        assert set(fake_item) == set(real_item) and shape(fake_item).items() <= shape(real_item).items()
    assert any(c["job"] == "Director" for c in credits["crew"]) and any(c["job"] == "Director" for c in fake_credits["crew"])
    assert [c["order"] for c in fake_credits["cast"]] == sorted(c["order"] for c in fake_credits["cast"])
    # the shared details.jsonl (real values in the API's shape): each of its response fields exists in the
    # fake with the same type, and its cast items' fields are a subset of the fake's
    real = json.loads(REAL_DETAILS.open(encoding="utf-8").readline())["response"]
    fake = expected_response(862, "/p.jpg")
    assert set(real) <= set(fake)
    assert {k: type(v) for k, v in real.items() if v is not None}.items() <= {k: type(v) for k, v in fake.items()}.items()
    assert set(real["credits"]["cast"][0]) <= set(fake["credits"]["cast"][0])


# ----------------------------------------------------------------------------------------------------
# Whole runs
# ----------------------------------------------------------------------------------------------------

def test_one_request_per_movie_saves_details_and_poster_and_logs_failures(tmp_path):
    data = write_links(tmp_path / "data", [(1, 101), (2, None), (3, 103), (4, 104), (5, 105), (6, 106), (7, 107),
                                           (8, 108), (9, 109)])
    movies = {101: "/a.jpg", 103: None, 105: "/e.jpg", 106: "/f.jpg", 107: "/g.jpg", 108: "/h.jpg", 109: "/i.jpg"}
    faults = {"/3/movie/105": ["500", "503"],         # transient: retried, then fine
              "/3/movie/106": ["html", "truncated"],  # not JSON: invalid_json, retried
              "/3/movie/107": ["slow"],               # slower than the timeout: retried
              "/3/movie/108": ["503"] * 10,           # never recovers: both halves fail with http_503
              "/t/p/w500/i.jpg": ["503"] * 10}        # details saved, poster fails
    with FakeTmdbServer(movies, api_key=KEY, faults=faults, slow_seconds=2.5) as server:
        report = run(data, server)
        requests = movie_requests(server)
    counts = {t: sum(1 for r, _ in requests if r == t) for t in movies.keys() | {104}}
    assert counts == {101: 1, 103: 1, 104: 1, 105: 3, 106: 3, 107: 2, 108: 3, 109: 1}, \
        "one request per movie (retries aside) for both halves"
    assert all(q["append_to_response"] == APPEND and q["api_key"] == [KEY] for _, q in requests)

    lines = saved_lines(data)
    assert sorted(line["movieId"] for line in lines) == [1, 3, 5, 6, 7, 9]
    for line in lines:
        assert set(line) == {"movieId", "tmdbId", "response"} and line["tmdbId"] == 100 + line["movieId"]
        assert line["response"] == expected_response(line["tmdbId"], movies[line["tmdbId"]]), "stored as received"
    by_movie = load_tmdb_details(details_path(data))
    assert [c["name"] for c in by_movie[1]["credits"]["crew"] if c["job"] == "Director"] == ["Director 101"]
    assert by_movie[3]["poster_path"] is None, "a movie without poster still gets its details"
    assert "Zoë 101".encode() in details_path(data).read_bytes()

    assert details_failures(data) == [(2, "no_tmdb_id"), (4, "not_found"), (8, "http_503")]
    assert (data / "failed_details.txt").read_text().startswith(f"# details: {details_path(data).resolve()}\n")
    assert sorted(log_entries(data)) == [(2, "no_tmdb_id"), (3, "no_poster_path"), (4, "not_found"),
                                         (8, "http_503"), (9, "http_503")]
    assert_posters_valid(data / "posters", server, {1: "/a.jpg", 5: "/e.jpg", 6: "/f.jpg", 7: "/g.jpg"})
    assert report["halves"] == ["posters", "details"]
    assert report["details"]["saved"] == 6 and report["details"]["failures_in_log"] == 3
    assert report["details"]["failures_by_reason"] == {"http_503": 1, "no_tmdb_id": 1, "not_found": 1}
    assert json.loads((data / "tmdb" / DETAILS_SUMMARY_FILE).read_text())["details"]["saved"] == 6


def test_rerun_fetches_only_what_is_missing(tmp_path):
    data = write_links(tmp_path / "data", [(m, 100 + m) for m in range(1, 7)])
    movies = {100 + m: f"/{m}.jpg" for m in range(1, 7)}
    with FakeTmdbServer(movies, api_key=KEY, faults={"/t/p/w500/6.jpg": ["500"] * 3}) as server:
        run(data, server)
        assert sorted(line["movieId"] for line in saved_lines(data)) == [1, 2, 3, 4, 5, 6]
        assert log_entries(data) == [(6, "http_500")]
        (data / "posters" / "2.jpg").unlink()  # details saved, poster gone
        kept = [line for line in details_path(data).read_bytes().splitlines(keepends=True)
                if json.loads(line)["movieId"] != 3]
        details_path(data).write_bytes(b"".join(kept))  # poster on disk, details gone
        start = len(server.requests)
        report = run(data, server)
        second = [urlsplit(r["path"]) for r in server.requests[start:]]
        assert sorted((s.path, parse_qs(s.query).get("append_to_response")) for s in second) == [
            ("/3/movie/102", None), ("/3/movie/103", APPEND), ("/t/p/w500/2.jpg", None)], \
            "the poster alone for movie 2 (no details asked), the details alone for movie 3 (no image)"
        assert report["downloaded"] == 1 and report["skipped_existing"] == 4 and report["skipped_known_failure"] == 1
        assert report["details"]["saved"] == 1 and report["details"]["skipped_existing"] == 5
        start = len(server.requests)
        run(data, server, retry_failed=True)
        third = [urlsplit(r["path"]) for r in server.requests[start:]]
        assert sorted((s.path, s.query.count("append_to_response")) for s in third) == [("/3/movie/106", 0),
                                                                                          ("/t/p/w500/6.jpg", 0)]
    lines = saved_lines(data)
    assert sorted(line["movieId"] for line in lines) == [1, 2, 3, 4, 5, 6], "no duplicates"
    assert log_entries(data) == [] and details_failures(data) == []
    assert_posters_valid(data / "posters", server, {m: f"/{m}.jpg" for m in range(1, 7)})


def test_torn_last_line_is_dropped_with_a_warning_and_fetched_again(tmp_path, caplog):
    data = write_links(tmp_path / "data", [(m, 100 + m) for m in range(1, 6)])
    with FakeTmdbServer({100 + m: f"/{m}.jpg" for m in range(1, 6)}, api_key=KEY) as server:
        run(data, server, fetch_posters=False)
        lines = details_path(data).read_bytes().splitlines(keepends=True)
        torn_movie = json.loads(lines[-1])["movieId"]
        details_path(data).write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # a kill mid-write
        with pytest.raises(ArtifactError, match=r"line 5 .*killed mid-write"):
            load_tmdb_details(details_path(data))  # the loader never reads a torn file silently
        start = len(server.requests)
        with caplog.at_level(logging.WARNING):
            report = run(data, server, fetch_posters=False)
        again = movie_requests(server, start)
    assert "dropped a torn last line" in caplog.text
    assert [t for t, _ in again] == [100 + torn_movie], "only the torn movie is fetched again"
    assert sorted(line["movieId"] for line in saved_lines(data)) == [1, 2, 3, 4, 5]
    assert report["details"]["saved"] == 1 and report["details"]["skipped_existing"] == 4


def test_details_of_another_dataset_or_a_mixed_up_log_are_refused(tmp_path):
    data = write_links(tmp_path / "data", [(1, 101), (2, 102)])
    details_path(data).parent.mkdir()
    with FakeTmdbServer({101: "/a.jpg", 102: "/b.jpg"}, api_key=KEY) as server:
        details_path(data).write_bytes(details_line(1, 101, {"id": 101}) + details_line(2, 999, {"id": 999}))
        with pytest.raises(ValueError, match=r"details\.jsonl line 2: movieId 2 has tmdbId 999, but links\.csv "
                                             r"gives tmdbId 102.*--details-out"):
            run(data, server)
        details_path(data).write_bytes(details_line(7, 107, {"id": 107}))
        with pytest.raises(ValueError, match=r"line 1: movieId 7 .* links\.csv has no such movieId"):
            run(data, server)
        details_path(data).unlink()
        (data / "old.txt").write_text("# posters: /elsewhere/posters\n1\t101\tnot_found\t2024-01-01T00:00:00Z\n")
        with pytest.raises(ValueError, match=r"records failures for posters /elsewhere/posters, not details "
                                             r".*--failed-details-log"):
            run(data, server, failed_details_log=data / "old.txt", fetch_posters=False)
        with pytest.raises(ValueError, match="give them two files"):
            run(data, server, failed_details_log=data / "failed.txt")
        assert server.requests == [], "the refused runs sent nothing"


def test_details_only_fetches_no_images_and_posters_only_writes_no_details(tmp_path, monkeypatch, capsys):
    script = load_script()
    monkeypatch.setenv("TMDB_API_KEY", KEY)
    rows = [(1, 101), (2, 102), (3, 103)]
    details_only, posters_only = write_links(tmp_path / "a", rows), write_links(tmp_path / "b", rows)
    with FakeTmdbServer({101: "/a.jpg", 102: "/b.jpg"}, api_key=KEY) as server:  # 103: 404

        def flags(data: Path) -> list[str]:
            return ["--data", str(data), "--failed-log", str(data / "failed.txt"), "--api-base", server.url,
                    "--image-base", server.url + "/t/p"]

        assert script.main(flags(details_only) + ["--details-only"]) == 0
        assert not any(r["path"].startswith("/t/p/") for r in server.requests)
        assert all(q["append_to_response"] == APPEND for _, q in movie_requests(server))
        assert not (details_only / "posters").exists() and not (details_only / "failed.txt").exists()
        assert sorted(line["movieId"] for line in saved_lines(details_only)) == [1, 2]
        assert details_failures(details_only) == [(3, "not_found")]
        assert "2 details saved" in capsys.readouterr().out

        start = len(server.requests)
        assert script.main(flags(posters_only) + ["--posters-only"]) == 0
        assert all("append_to_response" not in q for _, q in movie_requests(server, start))
        assert not (posters_only / "tmdb").exists() and not (posters_only / "failed_details.txt").exists()
        assert_posters_valid(posters_only / "posters", server, {1: "/a.jpg", 2: "/b.jpg"})
        assert "details saved" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--data", str(details_only), "--details-only", "--posters-only"])
    assert exit_info.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_key_never_appears_in_details_logs_or_output(tmp_path, monkeypatch, capsys, caplog):
    script = load_script()
    monkeypatch.setenv("TMDB_API_KEY", KEY)
    monkeypatch.delenv("TMDB_READ_TOKEN", raising=False)
    data = write_links(tmp_path / "data", [(1, 101), (2, 102), (3, None)])
    with caplog.at_level(logging.DEBUG), FakeTmdbServer({101: "/a.jpg"}, api_key=KEY) as server:
        common = ["--data", str(data), "--failed-log", str(data / "failed.txt"), "--retries", "1", "--backoff", "0.01"]
        assert script.main(common + ["--api-base", server.url, "--image-base", server.url + "/t/p"]) == 0
        assert any(q.get("api_key") == [KEY] for _, q in movie_requests(server)), "the key was really used"
        # nothing listens now: requests' ConnectionError messages carry the full URL with api_key=...
        assert script.main(common + ["--api-base", closed_port_url(), "--details-only", "--retry-failed"]) == 0
    out = capsys.readouterr()
    assert "connection_error" in (data / "failed_details.txt").read_text()
    assert "api_key=***" in caplog.text, "the test must actually exercise a message carrying the URL"
    files = [p for p in data.rglob("*") if p.is_file()]
    assert {details_path(data), data / "failed_details.txt", data / "tmdb" / DETAILS_SUMMARY_FILE} <= set(files)
    for text in [out.out.encode(), out.err.encode(), caplog.text.encode()] + [p.read_bytes() for p in files]:
        assert KEY.encode() not in text


def test_kill_mid_run_then_rerun_leaves_one_complete_line_per_movie(tmp_path):
    n = 80
    missing = {20, 70}
    data = write_links(tmp_path / "data", [(m, 1000 + m) for m in range(1, n + 1)])
    movies = {1000 + m: f"/p{m}.jpg" for m in range(1, n + 1) if m not in missing}
    with FakeTmdbServer(movies, api_key=KEY, latency=0.04) as server:
        command, env = script_command(data, server), {**os.environ, "TMDB_API_KEY": KEY}
        kill_when(command, env, lambda: details_path(data).is_file()
                  and details_path(data).read_bytes().count(b"\n") >= 15)
        before = {line["movieId"] for line in saved_lines(data)}
        assert 15 <= len(before) < n - len(missing)
        # one write per line cannot be torn by SIGKILL; a crash of the machine could: simulate one
        unsaved = min(set(range(1, n + 1)) - before - missing)
        with open(details_path(data), "ab") as fh:
            fh.write(details_line(unsaved, 1000 + unsaved, {"id": 1000 + unsaved, "overview": "cut"})[:30])
        on_disk = {int(p.stem) for p in (data / "posters").glob("[0-9]*.jpg")}
        logged = {m for m, _ in details_failures(data)}
        start = len(server.requests)
        rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        again = movie_requests(server, start)
    assert "dropped a torn last line" in rerun.stderr
    lines = saved_lines(data)
    saved = [line["movieId"] for line in lines]
    assert sorted(saved) == sorted(set(range(1, n + 1)) - missing), "every movie once: no duplicates"
    assert all(line["tmdbId"] == 1000 + line["movieId"] for line in lines)
    assert not any(t - 1000 in before and q.get("append_to_response") for t, q in again), \
        "details saved before the kill are not asked again"
    assert not any(t - 1000 in before & on_disk for t, _ in again), "a movie with both halves is not asked at all"
    assert sorted(t - 1000 for t, q in again if q.get("append_to_response")) == \
        sorted(set(range(1, n + 1)) - before - logged), "each movie without details (nor a logged failure) is asked once"
    assert_posters_valid(data / "posters", server, {m: f"/p{m}.jpg" for m in range(1, n + 1) if m not in missing})
    assert details_failures(data) == sorted((m, "not_found") for m in missing)
    assert json.loads((data / "posters" / SUMMARY_FILE).read_text())["details"]["saved"] == n - len(missing) - len(before)
    assert KEY not in rerun.stderr + rerun.stdout
