"""Fake HTTP servers on 127.0.0.1 (port 0, one thread each) for the download tests and benchmark.

`FakeMovieLensServer` serves `<name>.zip` and `<name>.zip.md5` like files.grouplens.org, with HTTP
Range support and injectable faults (connection cut mid-body, Range ignored).
`FakeTmdbServer` answers `/3/movie/{id}` with bodies shaped like the real TMDB v3 responses
(shared/data/tmdb-api-samples/jdrouet-tmdb-api/{movie-details,movie-credits,movie-keywords,invalid-api-key,
resource-not-found}.json, rebuilt here in code; `append_to_response=credits,keywords` folds the credits and
keywords in as `credits: {cast, crew}` and `keywords: {keywords}`, like the live API) and serves poster
images under `/t/p/<size>/<file>`, with injectable faults: 429 + Retry-After, 500/503, slow answers,
truncated bodies (images and JSON), HTML instead of JPEG or JSON, 401, 404.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from PIL import Image

INVALID_API_KEY = {"status_message": "Invalid API key: You must be granted a valid key.",
                   "success": False, "status_code": 7}
RESOURCE_NOT_FOUND = {"status_message": "The resource you requested could not be found.", "status_code": 34}
HTML_PAGE = b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>cdn error</body></html>"


def closed_port_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens (a port just bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def make_jpeg(seed: int, size: tuple[int, int] = (24, 36)) -> bytes:
    """A small, valid JPEG whose colour depends on `seed`."""
    image = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def movie_details(tmdb_id: int, poster_path: str | None) -> dict:
    """A `/3/movie/{id}` body with the fields and types of the real movie-details.json sample."""
    return {
        "adult": False, "backdrop_path": f"/backdrop{tmdb_id}.jpg", "belongs_to_collection": None,
        "budget": 63000000, "genres": [{"id": 18, "name": "Drama"}], "homepage": "", "id": tmdb_id,
        "imdb_id": f"tt{tmdb_id:07d}", "original_language": "en", "original_title": f"Movie {tmdb_id}",
        "overview": "A fake movie.", "popularity": 1.5, "poster_path": poster_path,
        "production_companies": [{"id": 1, "logo_path": None, "name": "Fake Pictures", "origin_country": "US"}],
        "production_countries": [{"iso_3166_1": "US", "name": "United States of America"}],
        "release_date": "1999-10-15", "revenue": 0, "runtime": 100,
        "spoken_languages": [{"english_name": "English", "iso_639_1": "en", "name": "English"}],
        "status": "Released", "tagline": "", "title": f"Movie {tmdb_id}", "video": False,
        "vote_average": 7.0, "vote_count": 10,
    }


def movie_credits(tmdb_id: int) -> dict:
    """The `credits` of `/3/movie/{id}?append_to_response=credits`: cast and crew items with the fields of the
    real movie-credits.json sample (no top-level `id`: the appended object lacks it). Names vary with the id
    and one is non-ASCII, so a test can tell movies apart and check UTF-8 round trips."""
    person = {"adult": False, "gender": 2, "known_for_department": "Acting", "popularity": 3.5, "profile_path": None}
    cast = [{**person, "id": tmdb_id * 10 + k, "name": name, "original_name": name, "cast_id": k + 1,
             "character": f"Role {k}", "credit_id": f"c{tmdb_id}x{k}", "order": k}
            for k, name in enumerate([f"Actor {tmdb_id}", f"Zoë {tmdb_id}", f"Extra {tmdb_id}"])]
    crew = [{**person, "id": tmdb_id * 10 + 8, "known_for_department": "Production", "name": f"Producer {tmdb_id}",
             "original_name": f"Producer {tmdb_id}", "credit_id": f"p{tmdb_id}", "department": "Production",
             "job": "Producer"},
            {**person, "id": tmdb_id * 10 + 9, "known_for_department": "Directing", "name": f"Director {tmdb_id}",
             "original_name": f"Director {tmdb_id}", "credit_id": f"d{tmdb_id}", "department": "Directing",
             "job": "Director"}]
    return {"cast": cast, "crew": crew}


def movie_keywords(tmdb_id: int) -> dict:
    """The `keywords` of `/3/movie/{id}?append_to_response=keywords` (items as in movie-keywords.json)."""
    return {"keywords": [{"id": 800 + tmdb_id % 7, "name": f"theme {tmdb_id % 7}"},
                         {"id": 9999, "name": "fake movie"}]}


class _Handler(BaseHTTPRequestHandler):
    """Hands every GET to the owning fake server's `handle`."""

    protocol_version = "HTTP/1.1"  # keep-alive, like the real servers

    def do_GET(self):  # noqa: N802 (http.server naming)
        self.server.fake.handle(self)

    def log_message(self, *args):  # keep test output quiet
        pass

    def send_body(self, status: int, body: bytes, content_type: str, extra_headers: dict | None = None,
                  declared_length: int | None = None) -> None:
        """Send a complete response (or, with `declared_length` > len(body), one cut short)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if declared_length is None else declared_length))
        for key, value in (extra_headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        try:
            self.wfile.write(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. its timeout expired): nothing to do

    def send_json(self, status: int, obj, extra_headers: dict | None = None) -> None:
        """Send compact UTF-8 JSON, as live TMDB does."""
        self.send_body(status, json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode(),
                       "application/json;charset=utf-8", extra_headers)


class _FakeServer:
    """Runs a ThreadingHTTPServer on 127.0.0.1:<free port> in a daemon thread; use as a context manager."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[dict] = []  # one record per request: path, headers, time

    def __enter__(self):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.httpd.fake = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:54321."""
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def record(self, handler: BaseHTTPRequestHandler) -> dict:
        """Remember a request (thread-safe) and return the record."""
        entry = {"path": handler.path, "headers": dict(handler.headers), "time": time.monotonic()}
        with self.lock:
            self.requests.append(entry)
        return entry

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        raise NotImplementedError


class FakeMovieLensServer(_FakeServer):
    """Serves `/<name>.zip` and `/<name>.zip.md5` (md5 of `md5_of`, default the zip itself).

    cut_requests: the first N zip requests send only `cut_after` bytes of their body, then close the connection.
    honour_range: False makes the server ignore Range and always answer 200 with the whole file.
    """

    def __init__(self, name: str, zip_bytes: bytes, md5_of: bytes | None = None, serve_md5: bool = True,
                 cut_requests: int = 0, cut_after: int = 100, honour_range: bool = True):
        super().__init__()
        self.name, self.zip_bytes = name, zip_bytes
        digest = hashlib.md5(zip_bytes if md5_of is None else md5_of).hexdigest()
        self.md5_text = f"MD5 ({name}.zip) = {digest}\n" if serve_md5 else None
        self.cut_requests, self.cut_after, self.honour_range = cut_requests, cut_after, honour_range

    def zip_requests(self) -> list[dict]:
        """Records of the requests for the zip itself."""
        return [r for r in self.requests if r["path"] == f"/{self.name}.zip"]

    def handle(self, handler):
        self.record(handler)
        if handler.path == f"/{self.name}.zip.md5" and self.md5_text is not None:
            return handler.send_body(200, self.md5_text.encode(), "text/plain")
        if handler.path != f"/{self.name}.zip":
            return handler.send_body(404, b"not found", "text/plain")
        body, status, headers = self.zip_bytes, 200, {"Accept-Ranges": "bytes"}
        range_header = handler.headers.get("Range")
        if range_header and self.honour_range:
            start = int(range_header.split("=")[1].split("-")[0])
            if start >= len(self.zip_bytes):
                return handler.send_body(416, b"", "text/plain", {"Content-Range": f"bytes */{len(self.zip_bytes)}"})
            body, status = self.zip_bytes[start:], 206
            headers["Content-Range"] = f"bytes {start}-{len(self.zip_bytes) - 1}/{len(self.zip_bytes)}"
        with self.lock:
            cut = self.cut_requests > 0
            self.cut_requests -= cut
        if cut:
            handler.close_connection = True
            return handler.send_body(status, body[:self.cut_after], "application/zip", headers, declared_length=len(body))
        handler.send_body(status, body, "application/zip", headers)


class FakeTmdbServer(_FakeServer):
    """A fake TMDB: `/3/movie/{id}` and `/t/p/<size><poster_path>`.

    movies: tmdb_id -> poster_path (None for a movie without poster); ids not listed answer 404.
    faults: request path -> list of faults consumed one per request, each one of
        "429" (with Retry-After: retry_after), "500", "503", "slow" (answer after slow_seconds),
        "truncated" (the image or JSON body cut in half, with a matching Content-Length), "html" (an HTML
        page, 200, instead of the image or the JSON).
    `/3/movie/{id}` honours append_to_response=credits,keywords (other names are ignored, as TMDB does).
    api_key / read_token: the credentials accepted; anything else answers 401 like TMDB.
    latency: seconds added to every request (benchmark).
    images: poster_path -> image bytes (default: a small generated JPEG per movie).
    """

    def __init__(self, movies: dict[int, str | None], api_key: str = "test-key", read_token: str | None = None,
                 faults: dict[str, list[str]] | None = None, latency: float = 0.0, slow_seconds: float = 2.0,
                 retry_after: str = "1", images: dict[str, bytes] | None = None):
        super().__init__()
        self.movies, self.api_key, self.read_token = movies, api_key, read_token
        self.faults = collections.defaultdict(list, {k: list(v) for k, v in (faults or {}).items()})
        self.latency, self.slow_seconds, self.retry_after = latency, slow_seconds, retry_after
        self.images = images if images is not None else {
            path: make_jpeg(tmdb_id) for tmdb_id, path in movies.items() if path}

    def image_path(self, poster_path: str, size: str = "w500") -> str:
        """Request path of a poster image."""
        return f"/t/p/{size}{poster_path}"

    def count(self, path: str) -> int:
        """How many requests hit exactly `path` (query string ignored)."""
        with self.lock:
            return sum(1 for r in self.requests if urlsplit(r["path"]).path == path)

    def _next_fault(self, path: str) -> str | None:
        with self.lock:
            queue = self.faults.get(path)
            return queue.pop(0) if queue else None

    def _authorised(self, handler, query: dict) -> bool:
        if self.api_key is not None and query.get("api_key") == [self.api_key]:
            return True
        bearer = handler.headers.get("Authorization", "")
        return self.read_token is not None and bearer == f"Bearer {self.read_token}"

    def handle(self, handler):
        self.record(handler)
        if self.latency:
            time.sleep(self.latency)
        split = urlsplit(handler.path)
        fault = self._next_fault(split.path)
        if fault == "slow":
            time.sleep(self.slow_seconds)
        elif fault == "429":
            return handler.send_json(429, {"status_code": 25, "status_message":
                                           "Your request count (41) is over the allowed limit of 40."},
                                     {"Retry-After": self.retry_after})
        elif fault in ("500", "503"):
            return handler.send_json(int(fault), {"status_code": 11, "status_message": "Internal error."})
        if split.path.startswith("/3/movie/"):
            return self._movie(handler, split, fault)
        if split.path.startswith("/t/p/"):
            return self._image(handler, split.path, fault)
        handler.send_json(404, RESOURCE_NOT_FOUND)

    def _movie(self, handler, split, fault):
        if not self._authorised(handler, parse_qs(split.query)):
            return handler.send_json(401, INVALID_API_KEY)
        try:
            tmdb_id = int(split.path.rsplit("/", 1)[1])
        except ValueError:
            return handler.send_json(404, RESOURCE_NOT_FOUND)
        if tmdb_id not in self.movies:
            return handler.send_json(404, RESOURCE_NOT_FOUND)
        body = movie_details(tmdb_id, self.movies[tmdb_id])
        appended = ",".join(parse_qs(split.query).get("append_to_response", [])).split(",")
        if "credits" in appended:
            body["credits"] = movie_credits(tmdb_id)
        if "keywords" in appended:
            body["keywords"] = movie_keywords(tmdb_id)
        if fault == "html":
            return handler.send_body(200, HTML_PAGE, "text/html")
        if fault == "truncated":
            text = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
            return handler.send_body(200, text[: len(text) // 2], "application/json;charset=utf-8")
        handler.send_json(200, body)

    def _image(self, handler, path, fault):
        poster_path = "/" + path.split("/", 4)[4]  # /t/p/<size>/<file>
        image = self.images.get(poster_path)
        if image is None:
            return handler.send_body(404, b"<html>404</html>", "text/html")
        if fault == "html":
            return handler.send_body(200, HTML_PAGE, "text/html")
        if fault == "truncated":
            return handler.send_body(200, image[: len(image) // 2], "image/jpeg")
        handler.send_body(200, image, "image/jpeg")
