"""Step 1 (experiments/download.py) against a fake GroupLens server on 127.0.0.1."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import zipfile
from pathlib import Path

import pytest

from experiments.download import (MARKER_FILE, ML25M_FILE_SHA256, ML25M_ZIP_SHA256, DownloadError, RetryPolicy, fetch_movielens)
from tests.fake_servers import FakeMovieLensServer, closed_port_url

NAME = "ml-latest-small"
FAST = RetryPolicy(retries=2, base_seconds=0.01)
NO_RETRY = RetryPolicy(retries=0)
SHARED = Path(__file__).resolve().parents[2] / "shared"


def release_files() -> dict[str, bytes]:
    """A tiny MovieLens-format release (CRLF, as GroupLens ships it), big enough to cut mid-body."""
    ratings = "userId,movieId,rating,timestamp\r\n" + "".join(
        f"{u},{m},{(u + m) % 5 + 1}.0,{1_000_000 + u * 100 + m}\r\n" for u in range(1, 40) for m in range(1, 8))
    return {"movies.csv": b"movieId,title,genres\r\n1,Toy Story (1995),Animation\r\n2,Heat (1995),Action\r\n",
            "links.csv": b"movieId,imdbId,tmdbId\r\n1,0114709,862\r\n2,0113277,\r\n",
            "ratings.csv": ratings.encode()}


def make_zip(files: dict[str, bytes], top: str = NAME) -> bytes:
    """Zip `files` under the top folder `top/`, stored uncompressed so byte offsets are predictable."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(f"{top}/{name}", data)
    return buffer.getvalue()


def assert_release_extracted(dest: Path) -> None:
    """dest/NAME/ holds exactly the release files, byte for byte, plus the marker; no leftovers beside it."""
    folder = dest / NAME
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != MARKER_FILE} == release_files()
    assert (folder / MARKER_FILE).is_file()
    assert sorted(p.name for p in dest.iterdir()) == [NAME], "no .part, zip or staging folder may remain"


def test_download_verifies_with_md5_and_extracts(tmp_path):
    with FakeMovieLensServer(NAME, make_zip(release_files())) as server:
        folder = fetch_movielens(NAME, tmp_path, base_url=server.url, retry=FAST)
        paths = [r["path"] for r in server.requests]
    assert folder == tmp_path / NAME
    assert f"/{NAME}.zip.md5" in paths and f"/{NAME}.zip" in paths
    assert_release_extracted(tmp_path)


def test_second_run_skips_without_any_request(tmp_path):
    with FakeMovieLensServer(NAME, make_zip(release_files())) as server:
        fetch_movielens(NAME, tmp_path, base_url=server.url, retry=FAST)
        n_before = len(server.requests)
        fetch_movielens(NAME, tmp_path, base_url=server.url, retry=FAST)
        assert len(server.requests) == n_before


def test_overwrite_replaces_the_folder(tmp_path):
    with FakeMovieLensServer(NAME, make_zip(release_files())) as server:
        fetch_movielens(NAME, tmp_path, base_url=server.url, retry=FAST)
        (tmp_path / NAME / "stale.txt").write_text("from an older release")
        fetch_movielens(NAME, tmp_path, base_url=server.url, retry=FAST, overwrite=True)
        assert len(server.zip_requests()) == 2
    assert_release_extracted(tmp_path)


def test_interrupted_transfer_is_resumed_by_a_rerun_with_range(tmp_path):
    archive = make_zip(release_files())
    with FakeMovieLensServer(NAME, archive, cut_requests=1, cut_after=1000) as server:
        with pytest.raises(DownloadError, match="resumes"):
            fetch_movielens(NAME, tmp_path, base_url=server.url, retry=NO_RETRY)
        part = tmp_path / f"{NAME}.zip.part"
        assert part.read_bytes() == archive[:1000]
        assert not (tmp_path / NAME).exists()
        fetch_movielens(NAME, tmp_path, base_url=server.url, retry=NO_RETRY)
        zip_requests = server.zip_requests()
    assert [r["headers"].get("Range") for r in zip_requests] == [None, "bytes=1000-"]
    assert_release_extracted(tmp_path)


def test_dropped_connections_are_retried_within_one_run(tmp_path):
    archive = make_zip(release_files())
    with FakeMovieLensServer(NAME, archive, cut_requests=2, cut_after=700) as server:
        fetch_movielens(NAME, tmp_path, base_url=server.url, retry=FAST)
        ranges = [r["headers"].get("Range") for r in server.zip_requests()]
    assert ranges == [None, "bytes=700-", "bytes=1400-"]
    assert_release_extracted(tmp_path)


def test_server_that_ignores_range_restarts_from_zero(tmp_path):
    archive = make_zip(release_files())
    (tmp_path / f"{NAME}.zip.part").write_bytes(archive[:500])
    with FakeMovieLensServer(NAME, archive, honour_range=False) as server:
        fetch_movielens(NAME, tmp_path, base_url=server.url, retry=FAST)
        assert server.zip_requests()[0]["headers"].get("Range") == "bytes=500-"
    assert_release_extracted(tmp_path)


@pytest.mark.parametrize("extra", [0, 10], ids=["part-complete", "part-too-long"])
def test_416_means_complete_or_start_over(tmp_path, extra):
    archive = make_zip(release_files())
    (tmp_path / f"{NAME}.zip.part").write_bytes(archive + b"x" * extra)
    with FakeMovieLensServer(NAME, archive) as server:
        fetch_movielens(NAME, tmp_path, base_url=server.url, retry=FAST)
        n_zip_requests = len(server.zip_requests())
    assert n_zip_requests == (1 if extra == 0 else 2)
    assert_release_extracted(tmp_path)


def test_corrupted_archive_fails_clearly_and_leaves_nothing(tmp_path):
    archive = make_zip(release_files())
    corrupted = bytearray(archive)
    corrupted[len(corrupted) // 2] ^= 0xFF
    expected_md5 = hashlib.md5(archive).hexdigest()
    with FakeMovieLensServer(NAME, bytes(corrupted), md5_of=archive) as server:
        with pytest.raises(DownloadError) as info:
            fetch_movielens(NAME, tmp_path, base_url=server.url, retry=FAST)
    message = str(info.value)
    assert "checksum mismatch" in message and expected_md5 in message
    assert f"{server.url}/{NAME}.zip" in message and str(tmp_path / f"{NAME}.zip") in message
    assert list(tmp_path.iterdir()) == [], "corrupt .part must be deleted, nothing extracted"


def test_embedded_or_given_sha256_is_checked_too(tmp_path):
    archive = make_zip(release_files())
    with FakeMovieLensServer(NAME, archive, serve_md5=False) as server:
        with pytest.raises(DownloadError, match="checksum mismatch"):
            fetch_movielens(NAME, tmp_path, base_url=server.url, sha256="0" * 64, retry=FAST)
        assert list(tmp_path.iterdir()) == []
        with pytest.raises(DownloadError, match="no official checksum"):
            fetch_movielens(NAME, tmp_path, base_url=server.url, retry=FAST)
        assert len(server.zip_requests()) == 1, "what nothing can verify is not downloaded at all"
        fetch_movielens(NAME, tmp_path, base_url=server.url, sha256=hashlib.sha256(archive).hexdigest(), retry=FAST)
    assert_release_extracted(tmp_path)


def test_offline_fails_with_manual_instructions(tmp_path):
    base_url = closed_port_url()
    with pytest.raises(DownloadError) as info:
        fetch_movielens(NAME, tmp_path, base_url=base_url, retry=FAST)
    message = str(info.value)
    assert f"{base_url}/{NAME}.zip" in message and "by hand" in message
    assert str(tmp_path / NAME) in message
    assert list(tmp_path.iterdir()) == []


def test_zip_placed_by_hand_is_verified_and_extracted_offline(tmp_path):
    archive = make_zip(release_files())
    (tmp_path / f"{NAME}.zip").write_bytes(archive)
    fetch_movielens(NAME, tmp_path, base_url=closed_port_url(), sha256=hashlib.sha256(archive).hexdigest())
    assert (tmp_path / f"{NAME}.zip").read_bytes() == archive, "a hand-placed zip is the user's: keep it"
    other = tmp_path / "other"
    other.mkdir()
    (other / f"{NAME}.zip").write_bytes(archive)
    with pytest.raises(DownloadError, match="pass --sha256"):  # no sha256 and offline: the md5 is unreachable
        fetch_movielens(NAME, other, base_url=closed_port_url(), retry=NO_RETRY)
    assert {p.name for p in (tmp_path / NAME).iterdir()} == set(release_files()) | {MARKER_FILE}


def test_zip_placed_by_hand_without_sha256_is_checked_against_published_md5(tmp_path):
    archive = make_zip(release_files())
    (tmp_path / f"{NAME}.zip").write_bytes(archive)
    with FakeMovieLensServer(NAME, b"unused", md5_of=archive) as server:
        fetch_movielens(NAME, tmp_path, base_url=server.url, retry=FAST)
        assert [r["path"] for r in server.requests] == [f"/{NAME}.zip.md5"]
    assert (tmp_path / NAME / "links.csv").read_bytes() == release_files()["links.csv"]


def test_ml25m_archive_must_match_the_embedded_official_sha256(tmp_path):
    archive = make_zip(release_files(), top="ml-25m")
    with FakeMovieLensServer("ml-25m", archive) as server:  # its md5 matches, the embedded sha256 cannot
        with pytest.raises(DownloadError, match=ML25M_ZIP_SHA256):
            fetch_movielens("ml-25m", tmp_path, base_url=server.url, retry=FAST)
    assert list(tmp_path.iterdir()) == []


def test_zip_placed_by_hand_with_wrong_checksum_is_kept_and_named(tmp_path):
    archive = make_zip(release_files())
    (tmp_path / f"{NAME}.zip").write_bytes(archive)
    with pytest.raises(DownloadError, match="checksum mismatch") as info:
        fetch_movielens(NAME, tmp_path, base_url=closed_port_url(), sha256="0" * 64)
    assert f"delete {tmp_path / (NAME + '.zip')} and rerun" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{NAME}.zip"]


def test_archive_with_wrong_top_folder_is_rejected_atomically(tmp_path):
    archive = make_zip(release_files(), top="something-else")
    (tmp_path / f"{NAME}.zip").write_bytes(archive)
    with pytest.raises(DownloadError, match="top folder"):
        fetch_movielens(NAME, tmp_path, base_url=closed_port_url(), sha256=hashlib.sha256(archive).hexdigest())
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{NAME}.zip"], "no staging or target folder left"


def test_hand_placed_ml25m_folder_is_checked_against_official_hashes(tmp_path):
    folder = tmp_path / "ml-25m"
    folder.mkdir()
    for name in ML25M_FILE_SHA256:
        (folder / name).write_text("not the real file\n")
    with pytest.raises(DownloadError, match="sha256"):
        fetch_movielens("ml-25m", tmp_path, base_url=closed_port_url())


@pytest.mark.skipif(not (SHARED / "data/ml-25m-subset/links.csv").is_file(), reason="../shared/data is absent")
def test_embedded_ml25m_hashes_match_the_real_files():
    for name in ("links.csv", "genome-tags.csv"):
        data = (SHARED / "data/ml-25m-subset" / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == ML25M_FILE_SHA256[name]


def load_script():
    """Import experiments/01_download_movielens.py (its name starts with a digit)."""
    path = Path(__file__).resolve().parents[1] / "experiments" / "01_download_movielens.py"
    spec = importlib.util.spec_from_file_location("download_movielens_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_exit_codes(tmp_path, caplog):
    script = load_script()
    with FakeMovieLensServer(NAME, make_zip(release_files())) as server:
        assert script.main(["--release", NAME, "--dest", str(tmp_path), "--base-url", server.url]) == 0
    assert_release_extracted(tmp_path)
    with caplog.at_level(logging.ERROR):
        status = script.main(["--release", NAME, "--dest", str(tmp_path / "other"),
                              "--base-url", closed_port_url(), "--retries", "0"])
    assert status == 1 and "by hand" in caplog.text
