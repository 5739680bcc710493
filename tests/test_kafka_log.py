"""worker/kafka_log.py: Kafka client errors are logged on state changes, repeats are summarised, recovery is
one line. Unit tests with an injected clock and real `KafkaError` objects (no broker, no sleeps)."""
from __future__ import annotations

import logging
import threading

from confluent_kafka import KafkaError

from worker.kafka_log import KafkaErrorLog


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Lines:
    """Records (level, event, fields) like a structlog logger would print them."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []

    def __getattr__(self, level):
        if level not in ("debug", "info", "warning", "error"):
            raise AttributeError(level)
        return lambda event, **kw: self.lines.append((level, event, kw))

    def events(self) -> list[str]:
        return [e for _, e, _ in self.lines]


def transport(n: int = 0) -> KafkaError:
    return KafkaError(KafkaError._TRANSPORT, f"127.0.0.1:9092/1: Connect to ipv4#127.0.0.1:9092 failed ({n})")


def make(**kw):
    out, clock = Lines(), Clock()
    return KafkaErrorLog(out, "consumer", clock=clock, **kw), out, clock


def test_an_outage_is_a_handful_of_lines_not_one_per_retry():
    el, out, clock = make(summary_s=30, quiet_s=15)
    # 20 s outage: a connection error every 50 ms plus "all brokers down" now and then (~420 errors).
    for i in range(400):
        clock.t += 0.05
        el.error(transport(i))
        if i % 20 == 0:
            el.error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
        el.ok()  # the poll loop keeps turning: no recovery while errors keep coming
    assert el.failing
    assert out.events() == ["kafka_error", "kafka_error"]  # first of each kind only
    first = out.lines[0]
    assert first[0] == "warning" and first[2]["code"] == "_TRANSPORT" and first[2]["client"] == "consumer"
    assert "(0)" in first[2]["error"] and first[2]["fatal"] is False
    assert out.lines[1][2]["code"] == "_ALL_BROKERS_DOWN"
    # The broker is back: no error for the quiet window, then the next ok() ends the outage, once.
    clock.t += 14.9
    el.ok()
    assert len(out.lines) == 2
    clock.t += 0.2
    el.ok()
    el.ok()
    assert out.events() == ["kafka_error", "kafka_error", "kafka_recovered"]
    level, _, rec = out.lines[-1]
    assert level == "info" and rec["errors"] == 420 and abs(rec["outage_s"] - 19.95) <= 0.06
    assert "(399)" in rec["last_error"]
    assert not el.failing
    # A later outage starts with a first-occurrence line again.
    el.error(transport(1000))
    assert out.events()[-1] == "kafka_error" and "(1000)" in out.lines[-1][2]["error"]


def test_repeats_are_summarised_at_most_once_per_interval_with_counts():
    el, out, clock = make(summary_s=10, quiet_s=15)
    down = KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down")
    el.error(transport())
    el.error(down)
    for i in range(1, 96):  # 95 repeats over 47.5 s (+ 9 "all down"): summaries at 10, 20, 30, 40 s
        clock.t += 0.5
        el.error(transport(i))
        if i % 10 == 0:
            el.error(down)
    summaries = [kw for _, e, kw in out.lines if e == "kafka_errors_repeated"]
    assert len(summaries) == 4
    assert summaries[0]["repeats"] == {"kafka_error:_TRANSPORT": 20, "kafka_error:_ALL_BROKERS_DOWN": 1}
    assert summaries[0]["failing_s"] == 10.0 and "(20)" in summaries[0]["last_error"]
    assert summaries[1]["repeats"] == {"kafka_error:_TRANSPORT": 20, "kafka_error:_ALL_BROKERS_DOWN": 2}
    assert summaries[3]["failing_s"] == 40.0
    # Counted: first lines + summaries + repeats not yet summarised = every error.
    total = 2 + 95 + 9
    clock.t += 20
    el.ok()
    assert out.lines[-1][1] == "kafka_recovered" and out.lines[-1][2]["errors"] == total
    assert len(out.lines) == 2 + 4 + 1


def test_fatal_errors_are_always_logged_at_error_level():
    el, out, clock = make()
    fatal = KafkaError(KafkaError._FENCED, "producer fenced", fatal=True)
    el.error(fatal, "producer_error")
    clock.t += 1
    el.error(fatal, "producer_error")
    assert [(lvl, e, kw["fatal"]) for lvl, e, kw in out.lines] == [("error", "producer_error", True)] * 2


def test_no_recovery_line_without_an_outage_and_none_without_a_logger():
    el, out, clock = make()
    for _ in range(5):
        clock.t += 100
        el.ok()
    assert out.lines == []
    silent = KafkaErrorLog(None, "consumer")
    silent.error(transport())
    silent.ok()
    silent.log(logging.ERROR, "%s [%s] %s", "SESSTMOUT", "c", "session timed out")  # no AttributeError


def test_librdkafka_log_lines_go_through_the_same_state_machine():
    el, out, clock = make(summary_s=30, quiet_s=15)
    # What confluent-kafka calls on a `logger`: log(level, "%s [%s] %s", facility, client name, message).
    for _ in range(50):
        el.log(logging.ERROR, "%s [%s] %s", "FAIL", "notellm-worker#consumer-1", "Connect to ... failed")
        el.log(logging.INFO, "%s [%s] %s", "FAIL", "notellm-worker#consumer-1", "Disconnected")
    assert out.lines == []  # FAIL duplicates error_cb; informational lines are dropped
    for _ in range(3):
        el.log(logging.WARNING, "%s [%s] %s", "SESSTMOUT", "notellm-worker#consumer-1",
               "Consumer group session timed out")
    assert len(out.lines) == 1
    level, event, kw = out.lines[0]
    assert (level, event, kw["code"]) == ("warning", "kafka_client_log", "SESSTMOUT")
    assert kw["error"] == "SESSTMOUT [notellm-worker#consumer-1] Consumer group session timed out"
    el.log(logging.ERROR, "%s [%s] %s", "MAXPOLL", "c", "Application maximum poll interval exceeded")
    assert out.lines[-1][0] == "error" and out.lines[-1][2]["code"] == "MAXPOLL"
    clock.t += 16
    el.ok()
    assert out.lines[-1][1] == "kafka_recovered" and out.lines[-1][2]["errors"] == 4


def test_threads_share_one_state_machine():
    el, out, clock = make(summary_s=1e9)

    def hammer():
        for _ in range(2000):
            el.error(transport())

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out.events() == ["kafka_error"]
    clock.t += 100
    el.ok()
    assert out.lines[-1][2]["errors"] == 8000


def _dead_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: connections are refused


def test_real_clients_facing_a_dead_broker_write_a_few_lines_not_a_flood(capfd):
    """The worker's own consumer and producer (real librdkafka clients) against a port where no broker
    listens: librdkafka reports a refused connection every ~50 ms; the log gets one line per kind."""
    import time

    from worker.sinks.kafka import TagsSink
    from worker.source import KafkaSource

    bootstrap = f"127.0.0.1:{_dead_port()}"
    common = {"bootstrap.servers": bootstrap, "client.id": "notellm-worker"}
    c_out, p_out = Lines(), Lines()
    src = KafkaSource({**common, "group.id": "g-dead", "enable.auto.commit": False}, "notes", max_note_bytes=1024,
                      log=c_out)
    sink = TagsSink({**common, "enable.idempotence": True, "acks": "all"}, "tags", log=p_out)
    try:
        t_end = time.monotonic() + 3.0
        while time.monotonic() < t_end:
            assert src.poll(0.1) == []
            assert sink.flush() == []  # idle: serves the producer's callbacks
    finally:
        src.close()
    assert src._errors._total >= 10, "librdkafka reported fewer errors than a flood"
    assert src._errors.failing and sink._errors.failing  # no recovery without a broker
    for out, client in ((c_out, "consumer"), (p_out, "producer:tags")):
        assert 1 <= len(out.lines) <= 3, out.lines
        assert {kw["client"] for _, _, kw in out.lines} == {client}
        assert {kw["code"] for _, _, kw in out.lines} <= {"_TRANSPORT", "_ALL_BROKERS_DOWN"}
    err = capfd.readouterr().err
    assert "notellm-worker#" not in err, err[-2000:]  # librdkafka's own lines went through the logger


def test_routed_short_lived_clients_write_a_few_lines_where_a_bare_one_floods(capfd):
    """`routed()` (the short-lived clients' config): the same dead port, a bare consumer next to a routed
    one. The bare one's librdkafka prints a `%3|...|FAIL|` line to stderr per connection attempt; the
    routed one's errors come out as one log line per kind and nothing of it reaches stderr."""
    import time

    from confluent_kafka import Consumer

    from worker.kafka_log import LOG_LEVEL_WARNING, routed

    bootstrap = f"127.0.0.1:{_dead_port()}"
    out = Lines()
    conf = routed({"bootstrap.servers": bootstrap, "client.id": "routed-client", "group.id": "g-dead"}, out, "probe")
    assert conf["log_level"] == LOG_LEVEL_WARNING and conf["logger"] is not None and conf["error_cb"]
    assert routed({"bootstrap.servers": bootstrap, "debug": "broker"}, out, "x").get("log_level") is None
    routed_c = Consumer(conf)
    bare_c = Consumer({"bootstrap.servers": bootstrap, "client.id": "bare-client", "group.id": "g-dead"})
    try:
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end:
            assert routed_c.poll(0.05) is None
            assert bare_c.poll(0.05) is None
    finally:
        routed_c.close()
        bare_c.close()
    err = capfd.readouterr().err
    assert err.count("bare-client#") >= 10, err[-2000:]     # the flood this avoids
    assert "routed-client#" not in err, err[-2000:]
    assert 1 <= len(out.lines) <= 3, out.lines
    assert {kw["client"] for _, _, kw in out.lines} == {"probe"}
    assert {kw["code"] for _, _, kw in out.lines} <= {"_TRANSPORT", "_ALL_BROKERS_DOWN"}


def test_redrive_against_a_dead_broker_prints_a_clear_error_not_a_flood():
    """`notellm worker redrive`, a short-lived client, as a process against a port where no broker listens:
    exit 2 within its --timeout, one line saying which Kafka failed and why, and at most a few log lines
    on stderr (it printed ~20 librdkafka lines a second before its clients went through kafka_log)."""
    import json
    import subprocess
    import sys
    import time
    from pathlib import Path

    bootstrap = f"127.0.0.1:{_dead_port()}"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "notellm.cli", "worker", "redrive", "--bootstrap", bootstrap,
                        "--timeout", "3", "--log-format", "json"], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[1])
    took = time.monotonic() - t0
    lines = r.stderr.splitlines()
    assert r.returncode == 2, r.stderr[-3000:]
    assert took < 20, f"redrive took {took:.1f} s with --timeout 3"
    assert r.stdout == ""
    assert 1 <= len(lines) <= 6, r.stderr[-3000:]
    assert not any(ln.startswith("%") for ln in lines), r.stderr[-3000:]  # no raw librdkafka lines
    assert lines[-1].startswith(f"notellm worker redrive: Kafka at {bootstrap} failed: "), lines[-1]
    assert "transport failure" in lines[-1].lower() or "timed out" in lines[-1].lower(), lines[-1]
    logged = [json.loads(ln) for ln in lines[:-1]]  # everything else is a JSON log line
    assert all(e["event"] in ("command_starting", "kafka_error", "kafka_client_log", "kafka_errors_repeated")
               for e in logged), logged


def test_a_security_error_is_reported_the_same_way_by_every_command():
    import io

    from worker.kafka_log import AUTHENTICATION_FAILED, KafkaSecurityError

    lines = []

    class Log:
        def error(self, event, **kw):
            lines.append((event, kw))

    e = KafkaSecurityError(AUTHENTICATION_FAILED, "worker:consumer", "_AUTHENTICATION", "SASL PLAIN refused")
    out = io.StringIO()
    e.report(Log(), "b:9093", command="notellm smoke", stream=out, security_protocol="SASL_SSL")
    assert lines == [("kafka_security_error", {"bootstrap": "b:9093", "security_protocol": "SASL_SSL",
                                               **e.log_fields()})]
    assert out.getvalue() == f"notellm smoke: Kafka at b:9093: {AUTHENTICATION_FAILED} ({e.hint})\n"
    e.report(Log(), "b:9093")  # the long-running worker: the log line only
    assert len(lines) == 2
