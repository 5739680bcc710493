"""Milvus: the store (`MilvusStore`) and the sink that writes the worker's rows into it (`MilvusSink`).

`MilvusStore` owns the client and the collection: created on first start (dimension from the model
manifest, COSINE, an index suited to the deployment), reached through an alias (`collection`) that
points at a physical collection named after the model version, so `worker backfill` can build a new
one and switch the alias atomically. A dimension or model_version mismatch is a startup error. Reads are
at `consistency_level` (default "Strong": see MilvusStore).
One store may be shared by several sinks in one process (milvus-lite locks its db to one process);
calls are serialised by `lock`. `reachable()` never waits more than ~0.1 s for it, `similar()` a few
seconds (then `StoreBusy`).
Every Milvus client takes its arguments from `client_kwargs()`: the same address, credentials, gRPC
options and TLS (`MilvusTLS`: a private CA, a server name, mutual TLS) for the store, the writer process
and the visibility probe. `open_client()` makes the store's: TLS that cannot work is a `MilvusConfigError`
naming why (not retried).

Data never becomes code: a filter naming ids is built only by `id_filter()`, which escapes every id
into a string literal that both expression parsers in use read back as exactly that id (see there).
Rows are built only by `build_row()`, which cuts every string to its field's limit.
"""
from __future__ import annotations

import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from worker.records import Encoded, Note
from worker.sinks import GiveUp, Rejected, RetryLater, SinkError

PROP_MODEL_VERSION = "notellm.model_version"
PROP_DIM = "notellm.dim"

# Field limits, in UTF-8 bytes. A Milvus server counts VARCHAR max_length in bytes; milvus-lite 3.2 counts
# characters (checked: it stores an 8-character, 16-byte id in a max_length=8 field, and never checks
# array elements), so a string cut to its limit in bytes fits both.
ID_MAX = 256           # never cut: an id over the limit is rejected (a cut id could be another note's)
MODEL_VERSION_MAX = 128
CATEGORY_MAX = 256
HASHTAG_MAX = 256
AUTHOR_MAX = 256
TITLE_MAX = 4096
MAX_HASHTAGS = 64
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
# A note without a category is stored as "" (Milvus 2.3 has no nullable fields; milvus-lite does, but one
# schema serves both); readers map "" back to None.
NO_CATEGORY = ""

QUERY_WINDOW = 16384     # a server's largest query limit (quotaAndLimits maxQueryResultWindow)
MAX_K = 100              # similar(): neighbours per query
IDS_PER_FILTER = 100     # ids per delete/get expression (keeps expressions small for the server's parser)
READY_WAIT_S = 0.1       # reachable(): longest wait for the store lock
SIMILAR_WAIT_S = 3.0     # similar(): longest wait for the store lock, then StoreBusy
PROBE_TIMEOUT_S = 1.0    # reachable(): the probe call's own timeout
OVERDUE_GRACE_S = 5.0    # reachable(): a call holding the lock longer than its timeout + this is stuck
# gRPC channel options of every Milvus client here (the store's, the writer's, the visibility probe's). After
# an outage a channel reconnects on gRPC's backoff, which grows to 120 s by default, so the first call
# succeeds at the next step of it after Milvus is back: up to ~25 s later after outages of 45-90 s
# (bench/reconnect.py, a relay cut, calls retried throughout: 2.3-24.8 s; 0.2-4.0 s with this cap), while
# the sink's own retry waits at most NOTELLM_RETRY__MAX_WAIT_S (5 s).
GRPC_OPTIONS = {"grpc.max_reconnect_backoff_ms": 5000}
CONNECT_FAILED = 2       # pymilvus's Status.CONNECT_FAILED: a client's first connection got no answer


class MilvusConfigError(ValueError):
    """Milvus cannot be reached as configured, and retrying cannot help: a TLS file missing or not PEM, the
    server's certificate not trusted or not for that name, this client's certificate refused."""


class MilvusUnreachable(ConnectionError):
    """No Milvus answered at the configured address (nothing listens, or the network does not get there):
    a client could not be made. Transient: the worker waits for it at start-up."""


@dataclass(frozen=True)
class MilvusTLS:
    """TLS to a Milvus server beyond what an https:// uri does by itself (verify the server against the
    system's roots): a private CA (`ca_path`), another name to check the certificate against
    (`server_name`), a client certificate for mutual TLS (`client_cert_path` + `client_key_path`, with
    `ca_path`). Every path is PEM."""
    ca_path: str | None = None
    server_name: str | None = None
    client_cert_path: str | None = None
    client_key_path: str | None = None

    @classmethod
    def from_settings(cls, m: Any) -> "MilvusTLS | None":
        """The TLS `m` (the worker's `MilvusSettings`) configures; None without any TLS setting."""
        t = cls(m.tls_ca_path, m.tls_server_name, m.tls_client_cert_path, m.tls_client_key_path)
        return t if any((t.ca_path, t.server_name, t.client_cert_path, t.client_key_path)) else None

    def check_files(self) -> None:
        """MilvusConfigError naming the setting when a file is missing, unreadable or not PEM (gRPC would
        only say that the server is unavailable)."""
        for setting, path, marker in (("tls_ca_path", self.ca_path, b"CERTIFICATE"),
                                      ("tls_client_cert_path", self.client_cert_path, b"CERTIFICATE"),
                                      ("tls_client_key_path", self.client_key_path, b"PRIVATE KEY")):
            if not path:
                continue
            try:
                with open(path, "rb") as f:
                    head = f.read(1 << 20)
            except OSError as e:
                raise MilvusConfigError(f"milvus.{setting}: cannot read {path}: {e.strerror or e}") from None
            if b"-----BEGIN" not in head or marker not in head:
                raise MilvusConfigError(f"milvus.{setting}: {path} holds no PEM {marker.decode().lower()}")

    def client_kwargs(self) -> dict[str, str]:
        """pymilvus's names: one-way TLS takes the CA as `server_pem_path`; mutual TLS takes it as
        `ca_pem_path` beside the client's pair (pymilvus reads the client pair only without
        `server_pem_path`)."""
        kw: dict[str, str] = {}
        if self.server_name:
            kw["server_name"] = self.server_name
        if self.client_cert_path:
            kw.update(ca_pem_path=self.ca_path or "", client_pem_path=self.client_cert_path,
                      client_key_path=self.client_key_path or "")
        elif self.ca_path:
            kw["server_pem_path"] = self.ca_path
        return kw

    def describe(self) -> str:
        parts = [f"CA {self.ca_path}" if self.ca_path else "the system's CAs"]
        if self.server_name:
            parts.append(f"name {self.server_name}")
        if self.client_cert_path:
            parts.append(f"client certificate {self.client_cert_path}")
        return ", ".join(parts)


def shown(uri: str) -> str:
    """`uri` fit for logs and messages: without user:password@ (pymilvus takes credentials in the uri too)."""
    return re.sub(r"^([a-z][a-z0-9+.-]*://)[^/@]*@", r"\1***@", uri, flags=re.IGNORECASE)


def connection_of(m: Any) -> dict[str, Any]:
    """How to reach the Milvus of `m` (the worker's `MilvusSettings`) beside its uri: the token, the database
    and the TLS, as keyword arguments of `MilvusStore` and `open_client`."""
    return {"token": m.token.get_secret_value() if m.token else None, "db_name": m.db_name,
            "tls": MilvusTLS.from_settings(m)}


def client_kwargs(uri: str, *, token: str | None = None, db_name: str | None = None,
                  tls: MilvusTLS | None = None) -> dict[str, Any]:
    """MilvusClient's keyword arguments for `uri`: the same for every client of one store (the store's own,
    the writer process's, the visibility probe's)."""
    kw: dict[str, Any] = {"uri": uri, "grpc_options": dict(GRPC_OPTIONS)}
    if token:
        kw["token"] = token
    if db_name:
        kw["db_name"] = db_name
    if tls is not None:
        kw.update(tls.client_kwargs())
    return kw


def open_client(uri: str, *, token: str | None = None, db_name: str | None = None,
                tls: MilvusTLS | None = None):
    """A MilvusClient of `uri` (pymilvus connects here). MilvusConfigError when the TLS settings cannot work:
    a file missing or not PEM, TLS settings without an https:// uri, a failed handshake (`tls_problem`)."""
    from pymilvus import MilvusClient

    if tls is not None and not uri.startswith("https://"):
        raise MilvusConfigError(f"TLS settings ({tls.describe()}) need an https:// Milvus uri, not {shown(uri)!r}")
    if tls is not None:
        tls.check_files()
    try:
        return MilvusClient(**client_kwargs(uri, token=token, db_name=db_name, tls=tls))
    except Exception as e:
        problem = tls_problem(uri, tls) if uri.startswith("https://") else None
        if problem is not None:
            raise MilvusConfigError(f"Milvus at {shown(uri)}: {problem}") from e
        if getattr(e, "code", None) == CONNECT_FAILED:
            # (not pymilvus's message: it names the address with any user:password in the uri)
            raise MilvusUnreachable(f"no Milvus answered at {shown(uri)}") from e
        raise


def tls_problem(uri: str, tls: MilvusTLS | None, timeout_s: float = 5.0) -> str | None:
    """Why a TLS handshake with the server at https:// `uri` fails, as configured (the certificate not
    trusted, not for the name, this client's certificate refused); None when it succeeds or when the server
    cannot be reached at all (that is not a TLS problem). gRPC logs the handshake's error only to stderr and
    tells pymilvus "server unavailable", so after a failed connect the store asks here."""
    import socket
    import ssl
    from urllib.parse import urlsplit

    u = urlsplit(uri)
    if u.scheme != "https" or not u.hostname:
        return None
    tls = tls or MilvusTLS()
    try:
        ctx = ssl.create_default_context(cafile=tls.ca_path or None)
    except ssl.SSLError as e:
        return f"the CA file {tls.ca_path} does not load: {e.reason or e}"
    ctx.set_alpn_protocols(["h2"])  # gRPC's servers may refuse a handshake without it
    if tls.client_cert_path:
        try:
            ctx.load_cert_chain(tls.client_cert_path, tls.client_key_path)
        except ssl.SSLError as e:
            return (f"this client's certificate {tls.client_cert_path} and key {tls.client_key_path} do not "
                    f"load together: {e.reason or e}")
    try:
        with socket.create_connection((u.hostname, u.port or 443), timeout=timeout_s) as raw:
            with ctx.wrap_socket(raw, server_hostname=tls.server_name or u.hostname) as t:
                # TLS 1.3: a server that refuses this client's certificate says so after the handshake
                t.settimeout(min(timeout_s, 1.0))
                try:
                    t.recv(1)
                except (TimeoutError, socket.timeout):
                    pass
    except ssl.SSLCertVerificationError as e:
        return f"the server's certificate was not accepted: {e.verify_message} (checked against " \
               f"{tls.describe()})"
    except ssl.SSLError as e:
        why = str(e.reason or e)
        if "ALERT" in why and "CERTIFICATE" in why:  # the server's alert: this client's certificate
            why += (" (the server refused this client's certificate, " + tls.client_cert_path + ")"
                    if tls.client_cert_path else " (the server asks for a client certificate: mutual TLS "
                    "needs milvus.tls_client_cert_path and milvus.tls_client_key_path)")
        return f"the TLS handshake failed: {why}"
    except (OSError, ValueError):
        return None
    return None


class CollectionMismatch(RuntimeError):
    """The existing collection was built for another model (dimension or model_version)."""


class StoreBusy(RuntimeError):
    """The store lock was held (a long write) for longer than a reader is willing to wait."""


class BadRow(ValueError):
    """This note's own data cannot be stored (the sink rejects the note; other notes are unaffected)."""


# -- filters -------------------------------------------------------------------------------------------
# The string literal is the intersection of the two grammars that parse our filters:
#   * milvus-lite 3.2 (milvus_lite/search/filter/tokens.py): a quoted string; escapes \" \' \\ \n \r \t only
#     (anything else, \u and \x included, is a parse error); any other character, raw, stands for itself
#     except a raw CR/LF, which ends the literal with an error.
#   * Milvus server (internal/parser/planparserv2, 2.3.x): Plan.g4 lexes '"' (~["\\\r\n] | EscapeSequence)* '"',
#     then VisitString -> convertEscapeSingle (only rewrites quotes outside a double-quoted literal's escapes)
#     -> strconv.Unquote, which decodes \\ \" \n \r \t and takes any other valid UTF-8 raw.
# So: double quotes, with \ " CR LF TAB escaped as \\ \" \r \n \t and every other character raw. Filter
# templates (`filter_params`) would avoid the parser altogether, but Milvus 2.3 and milvus-lite 3.2 ignore
# or reject them.
# Caveat for a later server upgrade: Milvus >= 2.4.14/2.5 first rewrites Han characters as \uXXXX with
# four hex digits (convertHanToASCII), which corrupts Han characters above U+FFFF (CJK Extension B+):
# "\U00021000" would then match U+1000. Use filter templates on such a server.
_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def quote(value: str) -> str:
    """`value` as a Milvus expression string literal that both parsers read back as exactly `value`.
    Raises ValueError when `value` is not text that UTF-8 can carry (a lone surrogate)."""
    if not isinstance(value, str):
        raise TypeError(f"expected str, got {type(value).__name__}")
    value.encode("utf-8")  # UnicodeEncodeError (a ValueError) for a lone surrogate
    return '"' + value.translate(_ESCAPES) + '"'


def id_filter(field: str, ids: Iterable[str]) -> str:
    """The filter `field in ["id", ...]` for `ids` (at least one), every id escaped by `quote()`."""
    if not _FIELD.match(field):
        raise ValueError(f"not a field name: {field!r}")
    lits = [quote(i) for i in ids]
    if not lits:
        raise ValueError("id_filter needs at least one id")
    return f"{field} in [{', '.join(lits)}]"


def _storable_id(note_id: object) -> bool:
    """Whether `note_id` could be a stored row's id (text UTF-8 can carry). Ids that cannot are never
    stored, so there is nothing to read or delete for them."""
    if not isinstance(note_id, str):
        return False
    try:
        note_id.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


# -- rows ----------------------------------------------------------------------------------------------
def _cut(text: object, limit: int, what: str) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, at a character boundary."""
    if not isinstance(text, str):
        raise BadRow(f"{what} is not text ({type(text).__name__})")
    try:
        b = text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRow(f"{what} is not valid Unicode text ({e.reason} at {e.start})") from None
    if len(b) <= limit:
        return text
    return b[:limit].decode("utf-8", "ignore")  # drops only the character the cut split


def build_row(note: Note, vector, category: str | None, hashtags: list[str], model_version: str) -> dict:
    """The Milvus row for `note`. Every string is cut to its field's limit in UTF-8 bytes at a character
    boundary (title 4096, author_id/category/each hashtag 256, model_version 128); hashtags are capped at
    MAX_HASHTAGS; a missing category is stored as NO_CATEGORY ("").

    Raises BadRow when the note's own data cannot be stored: note_id empty, not valid Unicode text or over
    256 UTF-8 bytes (never cut: a cut id could be another note's); a string with a lone surrogate;
    published_at not an integer within int64. Decode rejects all of these upstream.
    Raises ValueError (not BadRow) for a vector that is not 1-D, finite and of non-zero norm: the encoder
    stage checks its output, so such a vector is a bug upstream, never one note's fault."""
    vec = np.asarray(vector, dtype=np.float32)
    if vec.ndim != 1 or vec.size == 0 or not np.isfinite(vec).all():
        raise ValueError(f"note {note.note_id!r}: vector must be 1-D, finite and non-empty (shape {vec.shape})")
    if not np.linalg.norm(vec.astype(np.float64)) > 0.0:
        raise ValueError(f"note {note.note_id!r}: vector has zero norm")
    note_id = note.note_id
    if not isinstance(note_id, str) or not note_id:
        raise BadRow("note_id is empty")
    try:
        id_bytes = len(note_id.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRow("note_id is not valid Unicode text") from None
    if id_bytes > ID_MAX:
        raise BadRow(f"note_id is {id_bytes} bytes; the store holds at most {ID_MAX}")
    published_at = note.published_at
    if isinstance(published_at, bool) or not isinstance(published_at, int) or not INT64_MIN <= published_at <= INT64_MAX:
        raise BadRow(f"published_at {published_at!r} is not an int64")
    tags = list(hashtags or [])[:MAX_HASHTAGS]
    return {
        "note_id": note_id,
        "embedding": vec,
        "model_version": _cut(model_version, MODEL_VERSION_MAX, "model_version"),
        "category": NO_CATEGORY if category is None else _cut(category, CATEGORY_MAX, "category"),
        "hashtags": [_cut(t, HASHTAG_MAX, "hashtag") for t in tags],
        "published_at": published_at,
        "author_id": _cut(note.author_id, AUTHOR_MAX, "author_id"),
        "title": _cut(note.title, TITLE_MAX, "title"),
    }


# -- error classes -------------------------------------------------------------------------------------
DATA, TRANSIENT, FATAL = "data", "transient", "fatal"
# Milvus server codes (merr, low 16 bits): collection / database not found, not authenticated / permitted.
_FATAL_CODES = frozenset({100, 800, 1400, 1401})
_FATAL_LEGACY = frozenset({3, 4})            # common.ErrorCode PermissionDenied, CollectionNotExists
_DATA_CODES = frozenset({1100, 1101, 1102})  # merr: parameter invalid / missing / too large
_DATA_LEGACY = frozenset({5, 7, 11})         # common.ErrorCode IllegalArgument, IllegalDimension, IllegalRowRecord
_LITE_DATA = (6, 6)                          # milvus-lite: SchemaValidationError -> code 6, error_code 6


def classify(exc: BaseException) -> str:
    """DATA: the store refused the request for the data in it (pymilvus found a row not matching the schema,
    or the server answered invalid-parameter); retrying the same rows cannot help, bisecting can.
    FATAL: retrying cannot help and it is no row's fault (collection or database gone, no permission, a
    bug: an exception that is not Milvus's nor the network's). TRANSIENT: anything else Milvus or the
    network raises (unavailable, timeout, rate limit, ...)."""
    from pymilvus.exceptions import (DataNotMatchException, DataTypeNotMatchException, MilvusException,
                                     ParamError)

    kind = getattr(exc, "milvus_kind", None)  # classified where it happened (the writer process)
    if kind in (DATA, TRANSIENT, FATAL):
        return kind
    if isinstance(exc, (ParamError, DataNotMatchException, DataTypeNotMatchException)):
        return DATA
    if isinstance(exc, MilvusException):
        # `code` is an int from the server, but a grpc.StatusCode when the RPC itself failed (server down,
        # deadline): those are transient.
        if not isinstance(exc.code, (int, type(None))) or not isinstance(exc.compatible_code, (int, type(None))):
            return TRANSIENT
        code, legacy = int(exc.code or 0) & 0xFFFF, int(exc.compatible_code or 0)
        if code in _FATAL_CODES or legacy in _FATAL_LEGACY:
            return FATAL
        if getattr(exc, "retriable", False):
            return TRANSIENT
        if (code in _DATA_CODES or legacy in _DATA_LEGACY or (code, legacy) == _LITE_DATA
                or getattr(exc, "is_input_error", False)):
            return DATA
        return TRANSIENT
    import grpc

    if isinstance(exc, (grpc.RpcError, ConnectionError, TimeoutError, OSError)):
        return TRANSIENT
    return FATAL


def _message(exc: BaseException) -> str:
    msg = getattr(exc, "message", None) or str(exc)
    return f"{type(exc).__name__}: {msg}"[:500]


def physical_name(alias: str, model_version: str) -> str:
    return f"{alias}__{re.sub(r'[^0-9A-Za-z_]', '_', model_version)[:24]}"


CONSISTENCY_LEVELS = ("Strong", "Bounded", "Session", "Eventually")


class MilvusStore:
    """The client of one Milvus (a milvus-lite db path or a server URI) and the collection behind `alias`.

    `consistency_level` is the level of this store's reads (`get`, `similar`, `count`, `all_ids`). On a
    server an acknowledged upsert is not yet visible to a read at the server's default level (Bounded: it
    may miss the last few seconds of writes); "Strong" (the default here) makes a read wait until the
    server has applied every write acknowledged before the read began, so `similar()` right after a flush
    finds the note. The trade-off: a Strong read waits for the server's time tick (typically up to
    ~0.2 s more latency per read, more under write load); "Bounded" reads answer at once from
    slightly stale data; "Session" sees this client's own writes only. milvus-lite applies every write
    before it acknowledges it, so the level makes no difference there.

    `lite_process` (milvus-lite only): serve the db from a child process (`worker.lite_server`) instead of
    pymilvus's server in this process, whose Python work would share this process's GIL. A call that
    fails because that child has died raises `LiteServerGone` (fatal).

    `write_process`: upserts and deletes go through a child process with its own client
    (`worker.milvus_writer`), so that pymilvus's request building does not share this process's GIL;
    reads stay here, and run beside a write in flight instead of waiting for it (the writer serialises
    its own calls; the store lock is this process's client's). It needs a server URI or `lite_process`
    (an embedded db cannot be written from another process): ValueError otherwise."""

    def __init__(self, uri: str, *, token: str | None = None, db_name: str | None = None,
                 alias: str = "notes", timeout_s: float = 30.0, consistency_level: str = "Strong",
                 lite_process: bool = False, write_process: bool = False, tls: MilvusTLS | None = None,
                 search_ef: int | None = None) -> None:
        if consistency_level not in CONSISTENCY_LEVELS:
            raise ValueError(f"consistency_level must be one of {', '.join(CONSISTENCY_LEVELS)}, "
                             f"got {consistency_level!r}")
        self.uri = uri
        self._token, self._db_name = token, db_name
        self.alias = alias
        self.timeout_s = timeout_s
        self.consistency_level = consistency_level
        if search_ef is not None and (isinstance(search_ef, bool) or not isinstance(search_ef, int) or search_ef < 0):
            raise ValueError(f"search_ef must be an integer >= 0 (0 or None: Milvus's default), got {search_ef!r}")
        self.search_ef = search_ef or None
        self.is_lite = not uri.startswith(("http://", "https://", "tcp://", "unix:"))
        if write_process and self.is_lite and not lite_process:
            raise ValueError("write_process needs a Milvus server URI or lite_process: an embedded milvus-lite db "
                             "belongs to this process and cannot be written from another")
        self.tls = tls
        self.lite_server = None
        self.writer = None
        if self.is_lite:
            os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
            if lite_process:
                from worker.lite_server import LiteServer

                self.lite_server = LiteServer(uri)
        try:
            self.client = open_client(self.client_uri, token=token, db_name=db_name, tls=tls)
            if write_process:
                from worker.milvus_writer import MilvusWriter

                self.writer = MilvusWriter(self.client_uri, token=token, db_name=db_name, tls=tls)
        except BaseException:
            if self.lite_server is not None:
                self.lite_server.close()
            raise
        self.lock = threading.RLock()
        self._depth = 0                          # nesting of locked() in the thread holding the lock
        self._held_since: float | None = None    # when the outermost locked() began
        self._last_ok = True                     # outcome of the last store call (for reachable())

    @classmethod
    def from_settings(cls, m: Any) -> "MilvusStore":
        """The store `m` (the worker's `MilvusSettings`) configures: the worker's and the backfill's."""
        return cls(m.uri, **connection_of(m), alias=m.collection, timeout_s=m.timeout_s,
                   lite_process=m.lite_process, write_process=m.write_process, search_ef=m.search_ef)

    def reader(self, alias: str, *, consistency_level: str, timeout_s: float) -> "MilvusStore":
        """Another store on the same Milvus with a client of its own (the same address, credentials and
        TLS), reading `alias` at `consistency_level`: the visibility probe's."""
        return MilvusStore(self.client_uri, token=self._token, db_name=self._db_name, alias=alias,
                           timeout_s=timeout_s, consistency_level=consistency_level, tls=self.tls,
                           search_ef=self.search_ef)

    @property
    def client_uri(self) -> str:
        """What another client in this process connects to: the child's gRPC address when a child process
        serves the milvus-lite db (opening the db path again would fight it for the db's LOCK), else `uri`
        (a second client of an embedded db reuses pymilvus's in-process server)."""
        return self.lite_server.uri if self.lite_server is not None else self.uri

    @contextmanager
    def locked(self, wait_s: float | None = None) -> Iterator[Any]:
        """Hold the store lock around client calls (yields the client); records the calls' outcome for
        `reachable()`. With `wait_s`, raises StoreBusy when the lock is not free within that time."""
        if not self.lock.acquire(timeout=-1 if wait_s is None else wait_s):
            raise StoreBusy(f"the Milvus store is busy (a write has held it for over {wait_s:g} s); try again")
        self._depth += 1
        if self._depth == 1:
            self._held_since = time.monotonic()
        try:
            yield self.client
            self._last_ok = True
        except BaseException as e:
            if not isinstance(e, (SinkError, StoreBusy, KeyError)):
                self._last_ok = classify(e) != TRANSIENT
                if self.lite_server is not None and not self.lite_server.alive():
                    self._last_ok = False
                    raise self._lite_gone(e) from e
            raise
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._held_since = None
            self.lock.release()

    @contextmanager
    def _writing(self) -> Iterator[Any]:
        """Around one write (yields this process's client, or None with a writer process). In this
        process's client a write holds the store lock (`locked`). Through the writer process it does not:
        the writer serialises its own calls, and reads on this process's client (`similar`, `/readyz`)
        then answer beside a long upsert instead of waiting up to SIMILAR_WAIT_S for it. A write that fails
        because the milvus-lite child serving the db has died raises LiteServerGone either way."""
        if self.writer is None:
            with self.locked() as c:
                yield c
            return
        try:
            yield None
        except BaseException as e:
            if not isinstance(e, SinkError) and self.lite_server is not None and not self.lite_server.alive():
                raise self._lite_gone(e) from e
            raise

    def _lite_gone(self, e: BaseException) -> Exception:
        from worker.lite_server import LiteServerGone

        return LiteServerGone(f"the milvus-lite server process for {self.lite_server.data_dir} "
                              f"({self.lite_server.exit_status()}) is gone: {_message(e)}")

    # -- collection management -------------------------------------------------------------------
    def resolve(self, name: str | None = None) -> str | None:
        """Physical collection behind alias `name` (or the collection itself), None if absent."""
        name = name or self.alias
        with self.locked() as c:
            # list first: describe_alias on a missing alias makes pymilvus log an ERROR on a normal first start
            if name in c.list_aliases().get("aliases", []):
                return c.describe_alias(name)["collection_name"]
            return name if c.has_collection(name) else None

    def describe(self, collection: str) -> tuple[int | None, str | None]:
        with self.locked() as c:
            d = c.describe_collection(collection)
        dim = next((int(f["params"]["dim"]) for f in d["fields"] if f["name"] == "embedding"), None)
        return dim, (d.get("properties") or {}).get(PROP_MODEL_VERSION)

    def create(self, collection: str, dim: int, model_version: str) -> None:
        from pymilvus import DataType, MilvusClient

        s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                       description=f"notellm embeddings, model_version={model_version}")
        s.add_field("note_id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX)
        s.add_field("embedding", DataType.FLOAT_VECTOR, dim=dim)
        s.add_field("model_version", DataType.VARCHAR, max_length=MODEL_VERSION_MAX)
        s.add_field("category", DataType.VARCHAR, max_length=CATEGORY_MAX)  # "" = none (NO_CATEGORY)
        s.add_field("hashtags", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=MAX_HASHTAGS,
                    max_length=HASHTAG_MAX)
        s.add_field("published_at", DataType.INT64)
        s.add_field("author_id", DataType.VARCHAR, max_length=AUTHOR_MAX)
        s.add_field("title", DataType.VARCHAR, max_length=TITLE_MAX)
        ip = self.client.prepare_index_params()
        if self.is_lite:
            ip.add_index(field_name="embedding", index_type="AUTOINDEX", metric_type="COSINE")
        else:  # a server: HNSW is a good default for low-latency top-k at this scale
            ip.add_index(field_name="embedding", index_type="HNSW", metric_type="COSINE",
                         params={"M": 16, "efConstruction": 200})
        with self.locked() as c:
            # The index is created without waiting for it (sync=False): the wait asks the server for a
            # timestamp (AllocTimestamp), which milvus-lite does not implement; its in-process gRPC server
            # then prints a traceback into the worker's output. Loading waits for what it needs.
            c.create_collection(collection, schema=s,
                                properties={PROP_MODEL_VERSION: model_version, PROP_DIM: str(dim)})
            c.create_index(collection, ip, sync=False)
            c.load_collection(collection)

    def ensure(self, dim: int, model_version: str, *, collection: str | None = None, create_alias: bool = True) -> str:
        """The physical collection to write to; created (and aliased) if missing. Raises
        CollectionMismatch when the existing one was built for another model."""
        with self.locked() as c:
            phys = collection or self.resolve()
            if phys is None or (collection and not c.has_collection(collection)):
                phys = collection or physical_name(self.alias, model_version)
                if not c.has_collection(phys):
                    self.create(phys, dim, model_version)
                if create_alias and collection is None:
                    c.create_alias(phys, self.alias)
                return phys
            have_dim, have_mv = self.describe(phys)
            if have_dim != dim:
                raise CollectionMismatch(
                    f"Milvus collection {phys!r} (alias {self.alias!r}) has embedding dim {have_dim}, but the model "
                    f"produces {dim}: point the worker at the model it was built with, or run `notellm worker backfill`.")
            if have_mv is not None and have_mv != model_version:
                raise CollectionMismatch(
                    f"Milvus collection {phys!r} (alias {self.alias!r}) holds vectors of model_version {have_mv!r}, "
                    f"but the model is {model_version!r}: mixing them would corrupt search. Run "
                    f"`notellm worker backfill --model DIR` to build a new collection and switch the alias.")
            self.load(phys)
            return phys

    def load(self, collection: str | None = None) -> None:
        """Load a collection that is released (a reopened milvus-lite db starts released)."""
        name = collection or self.alias
        with self.locked() as c:
            state = str(c.get_load_state(name).get("state", ""))
            if "NotLoad" in state or "released" in state.lower():
                c.load_collection(name)

    def switch_alias(self, collection: str) -> None:
        with self.locked() as c:
            if self.alias in c.list_aliases().get("aliases", []):
                c.alter_alias(collection, self.alias)
            else:
                c.create_alias(collection, self.alias)

    def reachable(self) -> bool:
        """Whether Milvus answers. Never waits more than READY_WAIT_S for the store lock: while a call holds
        it, the answer is the last call's outcome, unless that call has run past its own timeout."""
        if not self.lock.acquire(timeout=READY_WAIT_S):
            since = self._held_since
            overdue = since is not None and time.monotonic() - since > self.timeout_s + OVERDUE_GRACE_S
            return self._last_ok and not overdue
        try:
            with self.locked() as c:
                c.has_collection(self.alias, timeout=PROBE_TIMEOUT_S)
            return True
        except Exception:  # noqa: BLE001 - any failure means "not reachable"; locked() recorded it
            return False
        finally:
            self.lock.release()

    # -- writes (MilvusSink) ---------------------------------------------------------------------
    def upsert(self, collection: str, rows: list[dict]) -> None:
        with self._writing() as c:
            if self.writer is not None:
                self.writer.upsert(collection, rows, self.timeout_s)
            else:
                c.upsert(collection, rows, timeout=self.timeout_s)

    def delete(self, collection: str, ids: Iterable[str]) -> None:
        """Delete the rows of `ids` (ids no row can have are skipped), IDS_PER_FILTER ids per call."""
        todo = [i for i in ids if _storable_id(i)]
        for part in _chunks(todo, IDS_PER_FILTER):
            with self._writing() as c:
                if self.writer is not None:
                    self.writer.delete(collection, id_filter("note_id", part), self.timeout_s)
                else:
                    c.delete(collection, filter=id_filter("note_id", part), timeout=self.timeout_s)

    # -- reads -----------------------------------------------------------------------------------
    def get(self, ids: Iterable[str], output_fields: list[str], collection: str | None = None,
            wait_s: float | None = None) -> list[dict]:
        """The stored rows of `ids` (absent ids are simply missing from the answer)."""
        coll = collection or self.alias
        todo = list(dict.fromkeys(i for i in ids if _storable_id(i)))
        out: list[dict] = []
        with self.locked(wait_s):
            self.load(coll)
            for part in _chunks(todo, IDS_PER_FILTER):
                out.extend(self.client.query(coll, filter=id_filter("note_id", part), output_fields=output_fields,
                                             timeout=self.timeout_s, consistency_level=self.consistency_level))
        return out

    def similar(self, note_id: str, k: int = 10, collection: str | None = None) -> dict:
        """The stored note `note_id` and its `k` (1..MAX_K) nearest other notes. Raises ValueError for a bad
        k, KeyError when the note is not stored, StoreBusy when a write holds the store for over
        SIMILAR_WAIT_S."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise ValueError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
        coll = collection or self.alias
        fields = ["title", "category", "hashtags", "published_at", "model_version"]
        with self.locked(SIMILAR_WAIT_S):
            got = self.get([note_id], ["embedding", *fields], coll)
            if not got:
                raise KeyError(note_id)
            me = got[0]
            hits = self.client.search(coll, data=[list(me["embedding"])], limit=k + 1, output_fields=fields,
                                      timeout=self.timeout_s, consistency_level=self.consistency_level,
                                      **self.search_kwargs(k + 1))[0]
        out = []
        for h in hits:
            hid = h.get("id", h.get("note_id"))
            if hid == note_id:
                continue
            ent = h.get("entity", {})
            out.append({"note_id": hid, "score": float(h["distance"]),
                        **{f: ent.get(f) for f in fields[:3]}, "category": ent.get("category") or None})
        q = {f: me.get(f) for f in fields}
        q["category"] = q["category"] or None
        q["note_id"] = note_id
        return {"note": q, "neighbours": out[:k]}

    def search_kwargs(self, limit: int) -> dict[str, Any]:
        """The search parameters of a top-`limit` search: the HNSW candidate list `ef` is `search_ef`, raised
        to `limit` (HNSW returns at most ef hits); none when `search_ef` is None (Milvus's default). This
        store indexes a server's collections with HNSW and milvus-lite's with AUTOINDEX, which milvus-lite
        builds as a faiss HNSW (exact search without faiss, which ignores ef)."""
        if self.search_ef is None:
            return {}
        return {"search_params": {"params": {"ef": max(self.search_ef, limit)}}}

    def count(self, collection: str | None = None) -> int:
        with self.locked() as c:
            self.load(collection)
            r = c.query(collection or self.alias, filter="", output_fields=["count(*)"], timeout=self.timeout_s,
                        consistency_level=self.consistency_level)
        return int(r[0]["count(*)"])

    def all_ids(self, collection: str | None = None) -> list[str]:
        """Every note_id in the collection (tests, backfill checks)."""
        coll = collection or self.alias
        with self.locked() as c:
            n = self.count(coll)
            if n <= QUERY_WINDOW:  # one query (a server's query_iterator needs 2.4+ for its snapshot timestamp)
                rows = c.query(coll, filter="", output_fields=["note_id"], limit=max(n, 1), timeout=self.timeout_s,
                               consistency_level=self.consistency_level) if n else []
                return [r["note_id"] for r in rows]
            it = c.query_iterator(coll, batch_size=1000, filter="", output_fields=["note_id"],
                                  consistency_level=self.consistency_level)
            out: list[str] = []
            while True:
                page = it.next()
                if not page:
                    it.close()
                    return out
                out.extend(r["note_id"] for r in page)

    def close(self) -> None:
        try:
            with self.locked() as c:
                if self.writer is not None:
                    self.writer.close()
                c.close()
        finally:
            if self.lite_server is not None:
                self.lite_server.close()


class MilvusSink:
    """The Milvus side of the sink contract (worker/sinks/__init__.py), writing to one physical collection.

    add(enc)   stages one row per note (a later record of the same note_id wins) and a delete per tombstone.
               A note whose data cannot be stored (`BadRow`) is staged as rejected; a vector that is not
               finite with a non-zero norm raises ValueError (a bug upstream).
    flush()    upserts the staged rows, then deletes the tombstoned ids. When the store refuses a batch for
               its data, the batch is bisected: every good row is written, each bad row comes back as
               `Rejected` and nothing of it is written (a rejected update keeps the note's previous row).
               A transient fault raises RetryLater, anything else that is no row's fault GiveUp (a staged
               vector whose dimension is not the collection's included: checked before writing); what was
               written or rejected before the fault stays done, the rest stays staged for the next flush.
    discard()  drops everything staged, rejections included.
    """

    name = "milvus"

    def __init__(self, store: MilvusStore, collection: str) -> None:
        self.store = store
        self.collection = collection
        self._rows: dict[str, dict] = {}          # note_id -> row to upsert
        self._notes: dict[str, Note] = {}         # note_id -> the note of that row
        self._deletes: set[str] = set()
        self._rejected: dict[str, Rejected] = {}  # note_id -> rejection not yet returned by flush()
        self._dim: int | None = None              # the collection's embedding dim, read at the first flush

    def add(self, enc: Encoded) -> None:
        b = enc.batch
        for i, n in enumerate(b.notes):
            self._forget(n.note_id)
            try:
                row = build_row(n, enc.embeddings[i], enc.categories[i] if enc.categories else None,
                                enc.hashtags[i] if enc.hashtags else [], enc.model_version)
            except BadRow as e:
                self._rejected[n.note_id] = Rejected(n, str(e))
                continue
            self._rows[n.note_id] = row
            self._notes[n.note_id] = n
        for t in b.tombstones:
            self._forget(t.note_id)
            self._deletes.add(t.note_id)

    def flush(self) -> list[Rejected]:
        if self._rows:
            self._check_dim()
            self._upsert(list(self._rows))
        if self._deletes:
            ids = sorted(self._deletes)
            for part in _chunks(ids, IDS_PER_FILTER):
                try:
                    self.store.delete(self.collection, part)
                except Exception as e:  # noqa: BLE001 - classified; a data error here is our bug, not a record's
                    kind = classify(e)
                    raise (RetryLater if kind == TRANSIENT else GiveUp)(
                        "milvus", f"delete of {len(part)} ids: {_message(e)}") from e
                self._deletes.difference_update(part)
        out, self._rejected = list(self._rejected.values()), {}
        return out

    def discard(self) -> None:
        self._rows.clear()
        self._notes.clear()
        self._deletes.clear()
        self._rejected.clear()

    def _forget(self, note_id: str) -> None:
        """Drop what is staged for `note_id` (a later record of it replaces it)."""
        self._rows.pop(note_id, None)
        self._notes.pop(note_id, None)
        self._deletes.discard(note_id)
        self._rejected.pop(note_id, None)

    def _check_dim(self) -> None:
        """GiveUp when a staged vector's dimension is not the collection's. The encoder stage checks its
        output against the model, and the store's start-up check the model against the collection, so such
        a vector is a bug, never one note's fault. Checked here because the stores refuse it differently:
        milvus-lite as a schema error (which would dead-letter good notes), a 2.3 server as an "unexpected
        error" (code 65535, indistinguishable from a transient fault)."""
        if self._dim is None:
            try:
                self._dim = self.store.describe(self.collection)[0]
            except Exception as e:  # noqa: BLE001 - classified
                raise (RetryLater if classify(e) == TRANSIENT else GiveUp)(
                    "milvus", f"describe {self.collection!r}: {_message(e)}") from e
        wrong = sorted({len(r["embedding"]) for r in self._rows.values()} - {self._dim})
        if wrong:
            raise GiveUp("milvus", f"vectors of dim {wrong} for collection {self.collection!r} of dim {self._dim} "
                                   f"(a bug upstream: the encoder's output must match the model's dim)")

    def _upsert(self, ids: list[str]) -> None:
        """Write the staged rows `ids`; on a data error, bisect down to the rows the store refuses."""
        try:
            self.store.upsert(self.collection, [self._rows[i] for i in ids])
        except Exception as e:  # noqa: BLE001 - classified below
            kind = classify(e)
            if kind == TRANSIENT:
                raise RetryLater("milvus", f"upsert of {len(ids)} rows: {_message(e)}") from e
            if kind == FATAL:
                raise GiveUp("milvus", f"upsert of {len(ids)} rows: {_message(e)}") from e
            if len(ids) == 1:
                note_id = ids[0]
                self._rejected[note_id] = Rejected(self._notes[note_id], f"milvus refused the row: {_message(e)}")
                self._rows.pop(note_id)
                self._notes.pop(note_id)
                return
            mid = len(ids) // 2
            self._upsert(ids[:mid])
            self._upsert(ids[mid:])
            return
        for i in ids:
            del self._rows[i]
            del self._notes[i]
