"""Kafka client errors in the log without a flood.

librdkafka reports every failed connection attempt of every client (the consumer, the tags producer,
the DLQ producer) through `error_cb`, and, without a `logger`, prints its own `%3|...|FAIL|...` lines
to stderr as well: a 20 s outage of the single local broker wrote ~650 lines. A `KafkaErrorLog` per
client, used as its `error_cb` target and its `logger`, turns that into state changes:

- the first error of a kind (event + error code, or librdkafka log facility) since the client last
  worked: one warning line (error level when fatal; a fatal error is always logged);
- repeats of a known kind: counted, at most one `kafka_errors_repeated` line per `summary_s` with the
  counts per kind since the previous line;
- `ok()` (evidence that the client works: a consumer poll turn without an error message, a producer
  flush whose every delivery was acknowledged, an idle producer's poll turn) once no error has come for
  `quiet_s`: one `kafka_recovered` line (how long errors came, how many), and the next error is a first
  occurrence again. The quiet window (longer than librdkafka's `reconnect.backoff.max.ms`, 10 s) keeps a
  partial outage (one broker of three down while the client works through the others) from flapping
  between error and recovered lines;
- librdkafka's log lines (`log`, the `logger` protocol): informational ones and `FAIL` (the same
  failures error_cb reports) are dropped, other warnings go through the same state machine.

Thread-safe (a producer's callbacks run on whichever thread serves it); `ok()` outside an outage is
one attribute test. The clock is injectable for tests.

Short-lived clients (`notellm worker redrive`, `notellm smoke`, the backfill probes, the demo's admin
client and producer) get the same treatment from `routed()`: their config with a `KafkaErrorLog` as
`error_cb` and `logger`, and `log_level` at warning, so a broker outage costs them one line per kind of
error, not one per connection attempt (redrive against an unreachable bootstrap printed ~20 lines a second).

Security failures are not outages: the broker refusing this client's credentials (librdkafka `_AUTHENTICATION`,
SASL_AUTHENTICATION_FAILED) or a broker certificate that fails verification against the configured CA (`_SSL`
with "certificate verify failed") never heal by retrying, and librdkafka retries them forever. `security_failure`
classifies an error; a `KafkaErrorLog(..., fatal_security=True)` raises `KafkaSecurityError` from its `error_cb`
(confluent-kafka re-raises it from the poll/consume/flush that served the callback) instead of logging, so the
command can stop with one error line and exit 2 (a configuration error). Every log also remembers the first
security failure it saw (`security_failure`, from error_cb or from librdkafka's FAIL log lines, which arrive
even while a metadata request blocks), so a command whose request timed out can say why. librdkafka's texts
name the broker, the mechanism and the TLS error, never the password.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, Callable, TextIO

from confluent_kafka import KafkaError


AUTHENTICATION_FAILED = "authentication failed"
CERTIFICATE_UNTRUSTED = "TLS certificate verification failed"
_HINTS = {
    AUTHENTICATION_FAILED: "check kafka.sasl_mechanism, kafka.sasl_username and kafka.sasl_password "
                           "(NOTELLM_KAFKA__SASL_*) against the broker's user",
    CERTIFICATE_UNTRUSTED: "check kafka.ssl_ca_location (NOTELLM_KAFKA__SSL_CA_LOCATION): the CA that signed the "
                           "broker's certificate, whose SAN must name the bootstrap host",
}
_AUTH_CODES = (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED)
_CERT_TEXT = ("certificate verify failed", "could not be verified")
_AUTH_TEXT = ("sasl authentication error", "authentication failed")


class KafkaSecurityError(Exception):
    """The broker refused this client's credentials, or its certificate failed verification: a configuration
    error that retrying cannot fix. `cause` is AUTHENTICATION_FAILED or CERTIFICATE_UNTRUSTED; `detail` is
    librdkafka's text (broker, mechanism, TLS error: no secret)."""

    def __init__(self, cause: str, client: str, code: str, detail: str) -> None:
        super().__init__(f"Kafka {cause} ({client}): {detail}")
        self.cause, self.client, self.code, self.detail = cause, client, code, detail

    @property
    def hint(self) -> str:
        return _HINTS[self.cause]

    def log_fields(self) -> dict:
        """The fields of the one error line a command writes for it."""
        return {"cause": self.cause, "client": self.client, "code": self.code, "error": self.detail, "hint": self.hint}

    def report(self, log: Any, bootstrap: str, *, command: str | None = None, stream: TextIO | None = None,
               **fields: Any) -> None:
        """What every command does with it: the one `kafka_security_error` line (plus `fields`) and, for a
        short-lived command, one line for a person naming the cause and the fix (on `stream`, stderr)."""
        log.error("kafka_security_error", bootstrap=bootstrap, **fields, **self.log_fields())
        if command:
            print(f"{command}: Kafka at {bootstrap}: {self.cause} ({self.hint})", file=stream or sys.stderr)


def security_failure(err: KafkaError) -> str | None:
    """AUTHENTICATION_FAILED, CERTIFICATE_UNTRUSTED, or None (anything else: an outage, retried)."""
    code = err.code()
    if code in _AUTH_CODES:
        return AUTHENTICATION_FAILED
    if code == KafkaError._SSL and any(t in (err.str() or "").lower() for t in _CERT_TEXT):
        return CERTIFICATE_UNTRUSTED
    return None


def _text_failure(text: str) -> str | None:
    """The same classification for a librdkafka FAIL log line (its text only)."""
    low = text.lower()
    if any(t in low for t in _CERT_TEXT):
        return CERTIFICATE_UNTRUSTED
    if any(t in low for t in _AUTH_TEXT):
        return AUTHENTICATION_FAILED
    return None


def _code_name(err: KafkaError) -> str:
    try:
        return err.name()
    except Exception:  # noqa: BLE001 - a KafkaError without a known code still gets a kind
        return str(err.code())


class KafkaErrorLog:
    def __init__(self, log, client: str, *, summary_s: float = 30.0, quiet_s: float = 15.0,
                 clock: Callable[[], float] = time.monotonic, fatal_security: bool = False) -> None:
        self._out = log
        self.client = client
        self.fatal_security = fatal_security
        self.security_failure: KafkaSecurityError | None = None  # the first one seen
        self._raised = False
        self.summary_s = summary_s
        self.quiet_s = quiet_s
        self.clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None  # first error of the current outage
        self._total = 0                    # errors in the current outage
        self._kinds: set[tuple[str, str]] = set()
        self._repeats: dict[str, int] = {}  # "event:CODE" -> repeats since the last line
        self._last_line = 0.0
        self._last_error_at = 0.0
        self._last_error = ""

    @property
    def failing(self) -> bool:
        return self._since is not None

    def error(self, err: KafkaError, event: str = "kafka_error") -> None:
        """One client error (error_cb, or an error message from consume). With `fatal_security`, a security
        failure raises KafkaSecurityError, once (not logged here: the command logs it); its repeats, served
        while the command closes its clients, are dropped."""
        cause = security_failure(err)
        if cause is not None:
            found = KafkaSecurityError(cause, self.client, _code_name(err), err.str())
            if self.security_failure is None or self.security_failure.code == "FAIL":
                self.security_failure = found  # error_cb's code beats a log line's facility
            if self.fatal_security:
                if not self._raised:
                    self._raised = True
                    raise found
                return
        self._record(event, _code_name(err), err.str(), fatal=bool(err.fatal()), retriable=bool(err.retriable()))

    def log(self, level: int, fmt: str, *args) -> None:
        """A librdkafka log line (confluent-kafka calls `logger.log(level, "%s [%s] %s", facility, name,
        message)`). Warnings and worse, except `FAIL`, go through the state machine, one kind per facility."""
        if level < logging.WARNING:
            return
        fac = str(args[0]) if args else ""
        try:
            text = fmt % args
        except (TypeError, ValueError):
            text = " ".join(map(str, (fmt, *args)))
        if fac == "FAIL":
            # Dropped (error_cb reports the same failure), but a security failure is remembered: these lines
            # come from librdkafka's threads, also while the application waits in a metadata request.
            cause = _text_failure(text)
            if cause is not None and self.security_failure is None:
                self.security_failure = KafkaSecurityError(cause, self.client, fac, str(args[-1]) if args else text)
            return
        self._record("kafka_client_log", fac or "?", text, fatal=False, retriable=None, level=level)

    def _record(self, event: str, code: str, text: str, *, fatal: bool, retriable: bool | None,
                level: int = logging.WARNING) -> None:
        if self._out is None:
            return
        line = None
        with self._lock:
            now = self.clock()
            if self._since is None:
                self._since = now
            self._total += 1
            self._last_error = text
            self._last_error_at = now
            kind = (event, code)
            if fatal or kind not in self._kinds:
                self._kinds.add(kind)
                self._last_line = now
                kw = {"error": text, "code": code, "fatal": fatal}
                if retriable is not None:
                    kw["retriable"] = retriable
                line = ("error" if fatal or (event == "kafka_client_log" and level >= logging.ERROR) else "warning",
                        event, kw)
            else:
                key = f"{event}:{code}"
                self._repeats[key] = self._repeats.get(key, 0) + 1
                if now - self._last_line >= self.summary_s:
                    line = ("warning", "kafka_errors_repeated",
                            {"repeats": dict(self._repeats), "last_error": text,
                             "failing_s": round(now - self._since, 1)})
                    self._repeats.clear()
                    self._last_line = now
        if line is not None:
            lvl, ev, kw = line
            getattr(self._out, lvl)(ev, client=self.client, **kw)

    def ok(self) -> None:
        """The client works: ends an outage with one line once no error has come for `quiet_s`."""
        if self._since is None or self._out is None:  # the common case, without the lock
            return
        with self._lock:
            now = self.clock()
            if self._since is None or now - self._last_error_at < self.quiet_s:
                return
            kw = {"outage_s": round(self._last_error_at - self._since, 1), "errors": self._total,
                  "last_error": self._last_error}
            self._since = None
            self._total = 0
            self._kinds.clear()
            self._repeats.clear()
            self._last_error = ""
        self._out.info("kafka_recovered", client=self.client, **kw)


# librdkafka's `log_level` (syslog levels): warnings and worse. KafkaErrorLog.log drops the lower levels
# anyway; this keeps librdkafka from formatting and queueing them at all.
LOG_LEVEL_WARNING = 4


def routed(conf: dict, log, client: str, **kw) -> dict:
    """`conf` for a client whose errors and librdkafka log lines go through a new `KafkaErrorLog(log, client)`:
    its `error_cb`, `logger` and `log_level` (an `error_cb` or `log_level` already in `conf` is kept; with
    `debug` set, `log_level` is left alone). Nothing reaches raw stderr. `log` is a structlog-style logger
    (`worker.logs.get_logger`); None drops every client error and log line. `kw` goes to KafkaErrorLog
    (`fatal_security=True`: authentication / certificate failures raise KafkaSecurityError). The
    KafkaErrorLog is `conf["logger"]` (its `security_failure` says why a request timed out)."""
    errors = KafkaErrorLog(log, client, **kw)
    out = dict(conf)
    out.setdefault("error_cb", errors.error)
    out["logger"] = errors
    if "debug" not in out:
        out.setdefault("log_level", LOG_LEVEL_WARNING)
    return out


__all__ = ["AUTHENTICATION_FAILED", "CERTIFICATE_UNTRUSTED", "KafkaErrorLog", "KafkaSecurityError",
           "LOG_LEVEL_WARNING", "routed", "security_failure"]
