"""One HTTP port: /metrics (Prometheus), /healthz (loop alive, pipeline not failed, encoder answering
within its deadline), /readyz (partitions assigned, model warmed, Milvus reachable) and
/similar/{note_id}?k= (milvus-lite locks its db to the worker's process, so the worker answers
nearest-neighbour queries for the CLI) and /notes/{note_id} (is it indexed, with which tags: one primary-key
read, no search).

No authentication: it binds 127.0.0.1 unless configured (`NOTELLM_HTTP__HOST`). k is bounded
(1..`max_k`). Errors answer without internals: a 500 carries an error id, the log carries the detail.
Probes never wait on a long Milvus write (`MilvusStore.reachable`)."""
from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker.logs import get_logger

NOTE_FIELDS = ["note_id", "category", "hashtags", "model_version", "published_at", "author_id", "title"]

log = get_logger("notellm.http")


class HttpServer:
    def __init__(self, app, host: str, port: int, *, max_k: int = 100) -> None:
        self.app = app
        handler = type("Handler", (_Handler,), {"app": app, "max_k": max_k})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="notellm-http", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    app = None  # set per server
    max_k = 100
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # noqa: D401 - quiet: structlog carries the worker's logs
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, doc) -> None:
        self._send(code, json.dumps(doc, ensure_ascii=False).encode("utf-8", "backslashreplace"))

    def do_GET(self):  # noqa: N802
        try:
            self._route()
        except Exception as e:  # noqa: BLE001 - never an internal message to the client
            err = uuid.uuid4().hex[:12]
            log.error("http_error", error_id=err, path=self.path[:200], error=str(e), error_type=type(e).__name__)
            self._json(500, {"error": "internal error", "error_id": err})

    def _route(self) -> None:
        url = urlparse(self.path)
        app = self.app
        if url.path == "/metrics":
            self._send(200, generate_latest(app.metrics.registry), CONTENT_TYPE_LATEST)
        elif url.path == "/healthz":
            ok, checks = app.healthy()
            self._json(200 if ok else 503, {"ok": ok, **checks})
        elif url.path == "/readyz":
            ok, checks = app.ready()
            self._json(200 if ok else 503, {"ok": ok, **checks})
        elif url.path.startswith(("/notes/", "/similar/")):
            kind, _, raw = url.path[1:].partition("/")
            try:
                note_id = unquote(raw, errors="strict")
            except UnicodeDecodeError:
                return self._json(400, {"error": "note_id is not valid UTF-8"})
            if not note_id or len(note_id.encode("utf-8", "surrogatepass")) > 256:
                return self._json(400, {"error": "note_id must be 1 to 256 bytes"})
            if self.app.store is None:
                return self._json(503, {"error": "not started"})
            if kind == "notes":
                self._note(note_id)
            else:
                self._similar(note_id, parse_qs(url.query))
        else:
            self._json(404, {"error": "not found"})

    def _note(self, note_id: str) -> None:
        """Is this note indexed, and with what? One primary-key read (no vector search): 200 with its stored
        fields (no vector), 404 when it is not stored."""
        from worker.sinks.milvus import SIMILAR_WAIT_S, StoreBusy

        try:
            rows = self.app.store.get([note_id], NOTE_FIELDS, wait_s=SIMILAR_WAIT_S)
        except StoreBusy:
            return self._json(503, {"error": "store busy, retry"})
        if not rows:
            return self._json(404, {"error": "note not found", "note_id": note_id})
        self._json(200, {k: rows[0].get(k) for k in NOTE_FIELDS})

    def _similar(self, note_id: str, query: dict) -> None:
        from worker.sinks.milvus import StoreBusy

        raw_k = query.get("k", ["10"])[0]
        if not raw_k.isdigit() or not 1 <= int(raw_k) <= self.max_k:
            return self._json(400, {"error": f"k must be an integer from 1 to {self.max_k}"})
        try:
            self._json(200, self.app.store.similar(note_id, int(raw_k)))
        except KeyError:
            self._json(404, {"error": "note not found", "note_id": note_id})
        except StoreBusy:
            self._json(503, {"error": "store busy, retry"})
