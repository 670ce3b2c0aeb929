"""The details.jsonl format (experiments/tmdb_details.py): crash-safe appends, torn-tail repair, the checked loader."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.artifacts import ArtifactError
from experiments.tmdb_details import (append_line, details_line, drop_torn_last_line, iter_details, iter_saved_ids,
                                      load_tmdb_details)

REAL_DETAILS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small-tmdb" / "details.jsonl"

RESPONSES = {
    1: {"id": 862, "title": "Toy Story", "credits": {"cast": [{"name": "Tom Hanks", "order": 0}],
                                                     "crew": [{"name": "John Lasseter", "job": "Director"}]},
        "keywords": {"keywords": [{"id": 931, "name": "jealousy"}]}},
    5: {"id": 11862, "title": "Père de la mariée", "popularity": 1e-3, "runtime": None, "credits": {"cast": []}},
    3: {"id": 15602, "title": "Grumpier Old Men"},
}
TMDB = {1: 862, 5: 11862, 3: 15602}


def write_fixture(path: Path) -> Path:
    """A details file of the three RESPONSES, written line by line as the downloader does."""
    for movie_id, response in RESPONSES.items():
        append_line(path, details_line(movie_id, TMDB[movie_id], response))
    return path


def test_round_trip_keeps_every_response_exactly_and_in_file_order(tmp_path):
    path = write_fixture(tmp_path / "details.jsonl")
    loaded = load_tmdb_details(path)
    assert loaded == RESPONSES and list(loaded) == [1, 5, 3]
    assert "Père".encode() in path.read_bytes(), "non-ASCII is stored as UTF-8, like the shared file"
    assert [(n, m, t) for n, m, t, _ in iter_details(path)] == [(1, 1, 862), (2, 5, 11862), (3, 3, 15602)]


def test_append_line_takes_exactly_one_line(tmp_path):
    for bad in (b'{"a": 1}', b'{"a": 1}\n{"b": 2}\n'):
        with pytest.raises(ValueError, match="exactly one line"):
            append_line(tmp_path / "x.jsonl", bad)
    assert not (tmp_path / "x.jsonl").exists()


GOOD = '{"movieId": 1, "tmdbId": 862, "response": {"id": 862}}\n'


@pytest.mark.parametrize("line, message", [
    ('{"movieId": 2, "tmdbId": 8844, "response": {"id": 8844\n', r"line 2 is not valid JSON.*Delete or fix"),
    ('[2, 8844, {}]\n', r"line 2 is a JSON list, not an object"),
    ('{"tmdbId": 8844, "response": {}}\n', r"line 2: field 'movieId' is missing"),
    ('{"movieId": "2", "tmdbId": 8844, "response": {}}\n', r"line 2: field 'movieId' is '2', not a positive integer"),
    ('{"movieId": true, "tmdbId": 8844, "response": {}}\n', r"line 2: field 'movieId' is True"),
    ('{"movieId": 2, "tmdbId": 0, "response": {}}\n', r"line 2: field 'tmdbId' is 0"),
    ('{"movieId": 2, "tmdbId": 8844, "response": [1]}\n', r"line 2: field 'response' is a list"),
    ('{"movieId": 2, "tmdbId": 8844}\n', r"line 2: field 'response' is missing"),
    ('\n', r"line 2 is empty"),
    ('{"movieId": 1, "tmdbId": 862, "response": {}}\n', r"lines 1 and 2: movieId 1 appears twice"),
    ('{"movieId": 2, "tmdbId": 88', r"line 2 is not valid JSON.*no newline: a download killed mid-write.*--details-only"),
], ids=["bad-json", "not-object", "no-movieId", "string-id", "bool-id", "zero-tmdbId", "response-list",
        "no-response", "empty", "duplicate", "torn-tail"])
@pytest.mark.parametrize("reader", [load_tmdb_details, lambda p: list(iter_saved_ids(p))], ids=["load", "resume-scan"])
def test_malformed_lines_name_file_line_and_field(tmp_path, line, message, reader):
    path = tmp_path / "details.jsonl"
    path.write_text(GOOD + line + (GOOD.replace("1", "9") if line.endswith("\n") else ""), encoding="utf-8")
    with pytest.raises(ArtifactError, match=message) as err:
        reader(path)
    assert str(path) in str(err.value)


def test_resume_scan_reads_the_writers_heads_and_parses_other_lines_in_full(tmp_path):
    path = write_fixture(tmp_path / "details.jsonl")
    with open(path, "a", encoding="utf-8") as fh:   # hand-written: other key order and spacing
        fh.write('{"tmdbId":70,"response":{"id":70},"movieId":7}\n')
    expected = [(n, m, t) for n, m, t, _ in iter_details(path)]
    assert list(iter_saved_ids(path)) == expected == [(1, 1, 862), (2, 5, 11862), (3, 3, 15602), (4, 7, 70)]
    merged = path.read_bytes()[:40] + details_line(9, 90, {"id": 90})  # a torn line with a whole one behind it
    path.write_bytes(path.read_bytes() + merged)
    with pytest.raises(ArtifactError, match="line 5 is not valid JSON"):
        list(iter_saved_ids(path))
    broken = tmp_path / "broken.jsonl"   # broken inside, whole head and tail: saved for the scan, refused on load
    broken.write_text(GOOD + '{"movieId": 2, "tmdbId": 8844, "response": {"id": }}\n', encoding="utf-8")
    assert [m for _, m, _ in iter_saved_ids(broken)] == [1, 2]
    with pytest.raises(ArtifactError, match="line 2 is not valid JSON"):
        load_tmdb_details(broken)
    if REAL_DETAILS.is_file():   # the shared file is in the writer's shape: every line read from its head
        assert list(iter_saved_ids(REAL_DETAILS)) == [(n, m, t) for n, m, t, _ in iter_details(REAL_DETAILS)]


def test_missing_file_names_the_step_that_writes_it(tmp_path):
    with pytest.raises(ArtifactError, match=r"details\.jsonl is missing: run experiments/03_download_posters\.py"):
        load_tmdb_details(tmp_path / "details.jsonl")


def test_drop_torn_last_line_cuts_only_the_partial_tail(tmp_path):
    path = write_fixture(tmp_path / "details.jsonl")
    clean = path.read_bytes()
    assert drop_torn_last_line(path) == 0 and path.read_bytes() == clean
    long_line = details_line(7, 70, {"overview": "x" * 200_000})  # longer than the 64 kB scan block
    with open(path, "ab") as fh:
        fh.write(long_line[:150_000])
    assert drop_torn_last_line(path) == 150_000
    assert path.read_bytes() == clean and load_tmdb_details(path) == RESPONSES
    only_torn = tmp_path / "only.jsonl"
    only_torn.write_bytes(long_line[:-1])  # everything but the newline: still torn
    assert drop_torn_last_line(only_torn) == len(long_line) - 1 and only_torn.read_bytes() == b""
    assert drop_torn_last_line(tmp_path / "absent.jsonl") == 0


@pytest.mark.skipif(not REAL_DETAILS.is_file(), reason=f"{REAL_DETAILS} not found (../shared is absent)")
def test_loads_the_real_ml_latest_small_details():
    details = load_tmdb_details(REAL_DETAILS)
    assert len(details) == 9622  # PROVENANCE.md: 9,622 of 9,742 movies
    toy_story = details[1]
    assert toy_story["id"] == 862 and toy_story["title"] == "Toy Story"
    assert toy_story["credits"]["cast"][0] == {"name": "Tom Hanks", "order": 0}
    assert sum(bool(r["overview"]) for r in details.values()) == 9613  # PROVENANCE.md: 9,613 with an overview
    first = json.loads(REAL_DETAILS.open(encoding="utf-8").readline())
    assert details_line(first["movieId"], first["tmdbId"], first["response"]) == \
        REAL_DETAILS.open("rb").readline(), "the writer produces the shared file's exact bytes"
