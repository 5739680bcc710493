"""One HTTP port: /metrics (Prometheus), /healthz (loop alive), /readyz (partitions assigned, model
warmed, Milvus reachable) and /similar/{note_id}?k= (milvus-lite locks its db to the worker's
process, so the worker answers nearest-neighbour queries for the CLI)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


class HttpServer:
    def __init__(self, app, host: str, port: int) -> None:
        self.app = app
        handler = type("Handler", (_Handler,), {"app": app})
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
        self._send(code, json.dumps(doc, ensure_ascii=False).encode())

    def do_GET(self):  # noqa: N802
        url = urlparse(self.path)
        app = self.app
        if url.path == "/metrics":
            self._send(200, generate_latest(app.metrics.registry), CONTENT_TYPE_LATEST)
        elif url.path == "/healthz":
            ok = app.healthy()
            self._json(200 if ok else 503, {"ok": ok})
        elif url.path == "/readyz":
            ok, checks = app.ready()
            self._json(200 if ok else 503, {"ok": ok, **checks})
        elif url.path.startswith("/similar/"):
            note_id = unquote(url.path[len("/similar/"):])
            try:
                k = int(parse_qs(url.query).get("k", ["10"])[0])
            except ValueError:
                return self._json(400, {"error": "k must be an integer"})
            if app.store is None:
                return self._json(503, {"error": "not started"})
            try:
                self._json(200, app.store.similar(note_id, k))
            except KeyError:
                self._json(404, {"error": f"note {note_id!r} not found"})
            except Exception as e:  # noqa: BLE001
                self._json(500, {"error": str(e)})
        else:
            self._json(404, {"error": "not found"})
