"""MilvusSink / MilvusStore on a real milvus-lite AND a real Milvus 2.3 server (every store test runs on both): hostile ids never reach another note's row, rows the store
refuses are isolated by bisection, strings are cut to their field's byte limit, staged work survives a
transient outage, and readiness never waits on a long write."""
from __future__ import annotations

import os
import re
import threading
import time

import numpy as np
import pytest

import worker.sinks.milvus as mv
from bench.relay import Relay
from worker.records import Batch, Encoded, Note, Tombstone
from worker.sinks import GiveUp, RetryLater
from worker.sinks.milvus import BadRow, MilvusSink, MilvusStore, StoreBusy, build_row, classify, id_filter, quote

DIM = 8
MV = "mv-test"

HOSTILE = [
    "'", '"', "\\", "\\\\", "\\'", "a\\", "n0\\", '\\"', "\\n", "'\\", "\"'\"",
    "zz'] or note_id not in ['n0", 'zz"] or note_id not in ["n0', '" or 1==1 or "', "' or 1==1 or '",
    "%", "_", "*", "n%", "n_", "[", "]", ",", " n0", "n0 ",
    "\u202en0", "\u200fn0", "\u200bn0", "\ufeffn0", "😀", "中文", "\U00021000", "é", "e\u0301",
    "x" * 256, "é" * 128, "a\tb", "a\nb",
]
INNOCENT = [f"n{i}" for i in range(10)] + ["a", "e", "zz", "x" * 255]


def _vec(seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def _note(note_id: str, *, title: str | None = None, author_id: str = "author", published_at: int = 1_700_000_000_000,
          offset: int = 0) -> Note:
    return Note(note_id=note_id, title=title if title is not None else f"title of {note_id}", content="c",
                author_id=author_id, published_at=published_at, topic=None, category=None, hashtags=None,
                partition=0, offset=offset)


def _enc(notes: list[Note], vectors=None, *, tombstones: list[str] = (), categories=None, hashtags=None) -> Encoded:
    b = Batch(seq=0, notes=list(notes), tombstones=[Tombstone(t, 0, 0) for t in tombstones], dead=[],
              offsets={0: 1}, records=len(notes) + len(tombstones), padded_tokens=0, opened_at=0.0, closed_at=0.0,
              reason="notes")
    if vectors is None:
        vectors = np.stack([_vec(i) for i in range(len(notes))]) if notes else np.zeros((0, DIM), np.float32)
    return Encoded(batch=b, embeddings=vectors, categories=categories if categories is not None else [None] * len(notes),
                   hashtags=hashtags if hashtags is not None else [[] for _ in notes], model_version=MV)


@pytest.fixture
def store(milvus_backend):
    """A store with its collection made, on milvus-lite and on the Milvus server (each test runs on both)."""
    s = milvus_backend.store()
    s.collection = s.ensure(DIM, MV)
    yield s
    try:
        s.close()
    except Exception:  # noqa: BLE001 - a test may have stopped the server
        pass


def _rows(store: MilvusStore, ids) -> dict[str, dict]:
    return {r["note_id"]: r for r in store.get(ids, ["title", "embedding", "category", "hashtags", "author_id"])}


# -- filters -------------------------------------------------------------------------------------------
# Plan.g4 (Milvus server) accepts, between double quotes, any char but " \ CR LF, or a simple escape.
_SERVER_LITERAL = re.compile(r'"(?:[^"\\\r\n]|\\["\\nrt])*"\Z')


def test_id_filter_literals_read_back_as_exactly_the_ids():
    from milvus_lite.search.filter.tokens import TokenKind, tokenize

    for i in HOSTILE + INNOCENT:
        lit = quote(i)
        assert _SERVER_LITERAL.match(lit), lit                     # the server's lexer takes it whole
        toks = tokenize(id_filter("note_id", [i, "n0"]))            # milvus-lite's own lexer
        assert [t.kind for t in toks] == [TokenKind.IDENT, TokenKind.IN, TokenKind.LBRACKET, TokenKind.STRING,
                                          TokenKind.COMMA, TokenKind.STRING, TokenKind.RBRACKET, TokenKind.EOF]
        assert [t.value for t in toks if t.kind is TokenKind.STRING] == [i, "n0"]
    for bad_field in ("note_id or 1", "", "1x", "a-b"):
        with pytest.raises(ValueError):
            id_filter(bad_field, ["n0"])
    with pytest.raises(ValueError):
        id_filter("note_id", [])
    with pytest.raises(ValueError):
        quote("a\ud800")


def test_hostile_ids_get_and_delete_exactly_their_own_row(store):
    ids = HOSTILE + INNOCENT
    sink = MilvusSink(store, store.collection)
    sink.add(_enc([_note(i) for i in ids]))
    assert sink.flush() == []
    assert sorted(store.all_ids()) == sorted(ids)
    for i in ids:  # get returns exactly the asked row
        got = store.get([i], ["title"])
        assert [(r["note_id"], r["title"]) for r in got] == [(i, f"title of {i}")]
    nb = store.similar(HOSTILE[11], k=3)
    assert nb["note"]["note_id"] == HOSTILE[11] and nb["note"]["title"] == f"title of {HOSTILE[11]}"
    assert len(nb["neighbours"]) == 3 and HOSTILE[11] not in {h["note_id"] for h in nb["neighbours"]}

    left = set(ids)
    for i in HOSTILE:  # each tombstone deletes exactly its note
        sink.add(_enc([], tombstones=[i]))
        assert sink.flush() == []
        left.discard(i)
        assert set(store.all_ids()) == left, i
        assert store.get([i], ["title"]) == []
    assert set(store.all_ids()) == set(INNOCENT)
    assert {r["note_id"]: r["title"] for r in store.get(INNOCENT, ["title"])} == {i: f"title of {i}" for i in INNOCENT}


# -- bisection -----------------------------------------------------------------------------------------
def test_rows_the_store_refuses_are_isolated_and_keep_their_previous_version(store, milvus_backend, monkeypatch):
    sink = MilvusSink(store, store.collection)
    old = ["long-a", "long-b", "ts", "author", "bytes"]
    sink.add(_enc([_note(i, title="v1") for i in old], np.stack([_vec(100 + k) for k in range(len(old))])))
    assert sink.flush() == []

    # build_row cuts a title to the collection's 4096 bytes; let it pass longer ones (as after a schema drift)
    # so that the store itself refuses them, and bisection has to find them among good rows.
    monkeypatch.setattr(mv, "TITLE_MAX", 4 * 4096)
    good = [_note(f"g{k:02d}", title="v2") for k in range(40)]
    too_long = [_note("long-a", title="x" * 5000), _note("long-b", title="x" * 4097), _note("long-c", title="y" * 6000)]
    # 2100 characters, 4200 UTF-8 bytes: a server counts max_length in bytes (refused), milvus-lite in characters.
    in_bytes = _note("bytes", title="é" * 2100)
    bad_data = [_note("ts", title="v2", published_at=2 ** 63), _note("author", title="v2", author_id="x\ud800y"),
                _note("i" * 300, title="v2")]
    notes = [too_long[0], *good[:17], too_long[1], in_bytes, *good[17:], bad_data[0], too_long[2], *bad_data[1:]]
    sink.add(_enc(notes))
    rejected = sink.flush()

    refused = too_long + ([in_bytes] if milvus_backend.is_server else [])
    assert sorted(r.note.note_id for r in rejected) == sorted(n.note_id for n in refused + bad_data)
    by_id = {r.note.note_id: r.reason for r in rejected}
    assert all(by_id[n.note_id].startswith("milvus refused the row") for n in refused)  # found by bisection
    assert "int64" in by_id["ts"] and "Unicode" in by_id["author"] and "300 bytes" in by_id["i" * 300]
    stored = {n.note_id for n in good} | set(old)
    assert set(store.all_ids()) == stored
    rows = _rows(store, sorted(stored))
    assert all(rows[n.note_id]["title"] == "v2" for n in good)
    for k, i in enumerate(old):  # a rejected update leaves the previous row as it was
        want = in_bytes.title if i == "bytes" and not milvus_backend.is_server else "v1"
        assert rows[i]["title"] == want, i
        if want == "v1":
            assert np.allclose(np.asarray(rows[i]["embedding"], np.float32), _vec(100 + k), atol=1e-6)
    assert sink.flush() == []  # each rejection is reported once


def test_a_vector_of_another_dimension_is_a_bug_not_a_rejection(store):
    """Both stores refuse it, differently (milvus-lite as a schema error, a 2.3 server as an "unexpected
    error"); the sink stops before either: no good note is dead-lettered, nothing is written."""
    sink = MilvusSink(store, store.collection)
    sink.add(_enc([_note("a"), _note("b"), _note("c")], [_vec(0), _vec(1, DIM + 1), _vec(2)]))
    with pytest.raises(GiveUp, match="dim"):
        sink.flush()
    assert store.all_ids() == []
    sink.discard()
    sink.add(_enc([_note("a"), _note("c")]))
    assert sink.flush() == [] and sorted(store.all_ids()) == ["a", "c"]


# -- rows ----------------------------------------------------------------------------------------------
def _assert_cut(original: str, cut: str, limit: int) -> None:
    """A maximal prefix at a character boundary within `limit` UTF-8 bytes."""
    assert original.startswith(cut) and len(cut.encode()) <= limit
    assert cut == original or len(original[:len(cut) + 1].encode()) > limit


def test_build_row_cuts_every_string_to_its_byte_limit_and_never_the_id(store):
    titles = ["é" * 3000, "€" * 2000, "😀" * 1100, "a" + "😀" * 1100, "x" * 4096, "y" * 5000]
    for t in titles:
        row = build_row(_note("n1", title=t), _vec(0), "類" * 100, ["標" * 90] * 70, "m" * 200)
        _assert_cut(t, row["title"], 4096)
        _assert_cut("類" * 100, row["category"], 256)
        assert len(row["hashtags"]) == mv.MAX_HASHTAGS
        assert all(h == "標" * 85 for h in row["hashtags"])       # 255 bytes: the 86th character would be 258
        assert row["model_version"] == "m" * 128
    assert len(build_row(_note("n1", title="é" * 3000), _vec(0), None, [], MV)["title"]) == 2048
    assert build_row(_note("n1", title="€" * 2000), _vec(0), None, [], MV)["title"] == "€" * 1365
    assert build_row(_note("n1", author_id="ü" * 300), _vec(0), None, [], MV)["author_id"] == "ü" * 128
    assert build_row(_note("n1"), _vec(0), None, [], MV)["category"] == ""      # missing category
    assert build_row(_note("é" * 128), _vec(0), None, [], MV)["note_id"] == "é" * 128  # 256 bytes: kept whole

    for bad in (_note("é" * 128 + "a"), _note(""), _note("a\udc00"), _note("n", published_at=2 ** 63),
                _note("n", published_at=-(2 ** 63) - 1), _note("n", published_at=True),
                _note("n", published_at=1.0), _note("n", title="\ud800")):
        with pytest.raises(BadRow):
            build_row(bad, _vec(0), None, [], MV)
    with pytest.raises(BadRow):
        build_row(_note("n"), _vec(0), "cat\udfff", [], MV)
    assert build_row(_note("n", published_at=-(2 ** 63)), _vec(0), None, [], MV)["published_at"] == -(2 ** 63)
    for vec in (np.full(DIM, np.nan, np.float32), np.array([np.inf] + [0.0] * (DIM - 1), np.float32),
                np.zeros(DIM, np.float32), np.ones((2, DIM), np.float32), np.zeros(0, np.float32)):
        with pytest.raises(ValueError) as e:
            build_row(_note("n"), vec, None, [], MV)
        assert not isinstance(e.value, BadRow)  # an upstream bug, never one note's fault

    # What is cut is what the store keeps (multi-byte strings exactly at their byte limits).
    sink = MilvusSink(store, store.collection)
    sink.add(_enc([_note("n1", title="😀" * 1100, author_id="ü" * 300)], categories=["類" * 100],
                  hashtags=[["標" * 90] * 70]))
    assert sink.flush() == []
    got = _rows(store, ["n1"])["n1"]
    assert got["title"] == "😀" * 1024 and got["author_id"] == "ü" * 128
    assert got["category"] == "類" * 85 and got["hashtags"] == ["標" * 85] * 64
    assert store.similar("n1", 1)["note"]["category"] == "類" * 85


# -- the sink contract ---------------------------------------------------------------------------------
def test_later_record_wins_tombstones_delete_and_bad_rows_are_rejected_before_the_store(store):
    sink = MilvusSink(store, store.collection)
    sink.add(_enc([_note("keep", title="v1"), _note("gone"), _note("upd", title="v1")]))
    assert sink.flush() == []
    sink.add(_enc([_note("new", title="first"), _note("upd", title="v2")]))
    sink.add(_enc([_note("new", title="second"), _note("upd", published_at=2 ** 63)], tombstones=["gone"]))
    rejected = sink.flush()
    assert [r.note.note_id for r in rejected] == ["upd"]
    assert set(store.all_ids()) == {"keep", "new", "upd"}
    rows = _rows(store, ["keep", "new", "upd"])
    assert rows["new"]["title"] == "second" and rows["upd"]["title"] == "v1" and rows["keep"]["title"] == "v1"
    sink.add(_enc([], tombstones=["new"]))
    sink.add(_enc([_note("new", title="third")]))          # a note after its tombstone: the note wins
    assert sink.flush() == []
    assert _rows(store, ["new"])["new"]["title"] == "third"


def test_discard_drops_everything_staged(store):
    sink = MilvusSink(store, store.collection)
    sink.add(_enc([_note("old")]))
    assert sink.flush() == []
    sink.add(_enc([_note("n1"), _note("bad", published_at=2 ** 63)], tombstones=["old"]))
    sink.discard()
    assert sink.flush() == []
    assert store.all_ids() == ["old"]


def _stop_server(uri: str):
    """Stop milvus-lite's in-process gRPC server (a real outage); returns a function that restarts it on
    the same port, so the client reconnects."""
    from milvus_lite.adapter.grpc.server import start_server_in_thread
    from milvus_lite.server_manager import server_manager_instance as mgr

    path = os.path.abspath(uri)
    port = mgr._servers[path][2]
    mgr.release_server(path)

    def restart() -> None:
        server, db, bound = start_server_in_thread(path, port=port)
        assert bound == port
        mgr._servers[path] = (server, db, bound)

    return restart


def test_a_transient_fault_keeps_staged_work_for_the_retry(store, milvus_backend):
    if milvus_backend.is_server:  # the same store, reached through a relay that the test cuts
        proxy = Relay(milvus_backend.uri)
        store = MilvusStore(proxy.uri, alias=milvus_backend.alias, timeout_s=5.0)
        store.collection = store.resolve()
        outage = proxy.cut
    else:
        outage = lambda: _stop_server(milvus_backend.uri)  # noqa: E731
    try:
        _transient_fault(store, outage)
    finally:
        if milvus_backend.is_server:
            store.close()


def _transient_fault(store: MilvusStore, outage) -> None:
    sink = MilvusSink(store, store.collection)
    sink.add(_enc([_note("gone")]))
    assert sink.flush() == []
    sink.add(_enc([_note(f"n{k}") for k in range(5)] + [_note("bad", published_at=2 ** 63)], tombstones=["gone"]))
    restart = outage()
    t0 = time.monotonic()
    with pytest.raises(RetryLater) as e:
        sink.flush()
    assert e.value.retryable and time.monotonic() - t0 < store.timeout_s + 5
    t0 = time.monotonic()
    assert store.reachable() is False and time.monotonic() - t0 < 1.5
    restart()
    deadline = time.monotonic() + 30
    while True:
        try:
            rejected = sink.flush()
            break
        except RetryLater:
            assert time.monotonic() < deadline, "Milvus did not come back"
            time.sleep(0.2)
    assert [r.note.note_id for r in rejected] == ["bad"]
    # Reads come back too. With a writer process they use the store's own connection, whose reconnect
    # (gRPC backoff after the failed probe above) need not be done when the writer's is.
    while not store.reachable():
        assert time.monotonic() < deadline, "reads did not come back"
        time.sleep(0.2)
    assert set(store.all_ids()) == {f"n{k}" for k in range(5)}
    assert sink.flush() == []


def test_after_a_long_outage_the_store_is_back_within_seconds(milvus_server_backend):
    """Every client's gRPC reconnect backoff is capped at 5 s (mv.GRPC_OPTIONS): after 30 s of outage,
    probed throughout as the sink's retries and the readiness probe do, a call succeeds within a few
    seconds of Milvus being back. With gRPC's default backoff (growing to 120 s) the wait is a lottery up to
    its current step (2-25 s after outages of 45-90 s, bench/reconnect.py); this test failed with it here."""
    proxy = Relay(milvus_server_backend.uri)
    store = MilvusStore(proxy.uri, alias=milvus_server_backend.alias, timeout_s=2.0)
    try:
        assert store.client._get_connection()._grpc_options == mv.GRPC_OPTIONS
        assert store.reachable()
        restart = proxy.cut()
        down = time.monotonic()
        while time.monotonic() - down < 30:
            assert store.reachable() is False
            time.sleep(0.5)
        restart()
        back = time.monotonic()
        while not store.reachable():
            assert time.monotonic() - back < 9, "no call succeeded within 9 s of Milvus being back"
            time.sleep(0.1)
    finally:
        store.close()


def test_errors_are_classified_by_whose_fault_they_are():
    from pymilvus.exceptions import DataNotMatchException, DescribeCollectionException, MilvusException, ParamError

    assert classify(DataNotMatchException(message="Value out of range")) == mv.DATA
    assert classify(ParamError(message="bad")) == mv.DATA
    assert classify(MilvusException(6, "VARCHAR field too long", 6)) == mv.DATA            # milvus-lite
    assert classify(MilvusException(1100, "invalid parameter", 5)) == mv.DATA              # Milvus server
    assert classify(MilvusException(1100 | (1 << 20), "invalid parameter", 5, retriable=True)) == mv.TRANSIENT
    assert classify(MilvusException(2, "Fail connecting to server")) == mv.TRANSIENT
    assert classify(MilvusException(65535, "unexpected error", 1)) == mv.TRANSIENT
    assert classify(DescribeCollectionException(100, "collection 'x' does not exist", 4)) == mv.FATAL
    assert classify(ConnectionResetError()) == mv.TRANSIENT and classify(TimeoutError()) == mv.TRANSIENT
    assert classify(TypeError("a bug")) == mv.FATAL


def test_a_missing_collection_is_no_rows_fault(store):
    sink = MilvusSink(store, "no_such_collection")
    sink.add(_enc([_note("n1")]))
    with pytest.raises(GiveUp):
        sink.flush()


# -- readiness and reads -------------------------------------------------------------------------------
def _hold(store: MilvusStore, ctx) -> tuple[threading.Event, threading.Event, threading.Thread]:
    held, release = threading.Event(), threading.Event()

    def run():
        with ctx:
            held.set()
            release.wait(30)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert held.wait(5)
    return held, release, t


def test_reachable_and_similar_never_wait_long_on_a_write_holding_the_store(store, monkeypatch):
    sink = MilvusSink(store, store.collection)
    sink.add(_enc([_note(f"n{k}") for k in range(5)]))
    assert sink.flush() == []
    assert store.reachable() is True

    monkeypatch.setattr(mv, "SIMILAR_WAIT_S", 0.3)
    _, release, t = _hold(store, store.lock)   # a long write holds the lock
    try:
        for _ in range(3):
            t0 = time.monotonic()
            assert store.reachable() is True                 # the last call's outcome
            assert time.monotonic() - t0 < 0.5
        t0 = time.monotonic()
        with pytest.raises(StoreBusy):
            store.similar("n1", 2)
        assert time.monotonic() - t0 < 2.0
    finally:
        release.set()
        t.join(5)
    assert [h["note_id"] for h in store.similar("n1", 2)["neighbours"]] != []

    # A call that has run past its own timeout is not "reachable".
    monkeypatch.setattr(mv, "OVERDUE_GRACE_S", 0.0)
    monkeypatch.setattr(store, "timeout_s", 0.2)
    _, release, t = _hold(store, store.locked())
    try:
        time.sleep(0.4)
        t0 = time.monotonic()
        assert store.reachable() is False and time.monotonic() - t0 < 0.5
    finally:
        release.set()
        t.join(5)
    assert store.reachable() is True


def test_similar_bounds_k_and_reports_absent_notes(store):
    sink = MilvusSink(store, store.collection)
    sink.add(_enc([_note("n1"), _note("n2")]))
    assert sink.flush() == []
    for k in (0, 101, -1, True, "5", 2.0):
        with pytest.raises(ValueError):
            store.similar("n1", k)
    for absent in ("nope", "a\ud800", "n1' or '1'=='1"):
        with pytest.raises(KeyError):
            store.similar(absent, 5)
    ans = store.similar("n1", 100)
    assert ans["note"]["category"] is None and [h["note_id"] for h in ans["neighbours"]] == ["n2"]


def test_similar_searches_with_the_settings_ef_raised_to_k(milvus_backend):
    """NOTELLM_MILVUS__SEARCH_EF reaches the search (HNSW's candidate list on a server, and milvus-lite's
    faiss HNSW), raised to k+1 when smaller; 0 leaves Milvus's default; the answers stay the exact top-k."""
    from worker.config import MilvusSettings

    m = MilvusSettings(uri=milvus_backend.uri, collection=milvus_backend.alias)
    assert m.search_ef == 128
    vecs = np.stack([_vec(i) for i in range(30)])
    s = MilvusStore.from_settings(m.model_copy(update={"search_ef": 8}))
    try:
        assert s.search_ef == 8
        coll = s.ensure(DIM, MV)
        sink = MilvusSink(s, coll)
        sink.add(_enc([_note(f"n{i}") for i in range(30)], vecs))
        assert sink.flush() == []
        seen = []
        real = s.client.search

        def spy(*a, **kw):
            seen.append(kw.get("search_params"))
            return real(*a, **kw)

        s.client.search = spy
        sims = vecs[1] @ vecs.T
        exact = [f"n{i}" for i in np.argsort(-sims) if i != 1]
        for k, ef in ((5, 8), (20, 21)):
            ans = s.similar("n1", k)
            assert seen[-1] == {"params": {"ef": ef}}
            assert [h["note_id"] for h in ans["neighbours"]] == exact[:k]
        r = s.reader(s.alias, consistency_level="Strong", timeout_s=10)
        try:
            assert r.search_ef == 8 and r.search_kwargs(11) == {"search_params": {"params": {"ef": 11}}}
        finally:
            r.close()
    finally:
        s.close()
    d = MilvusStore.from_settings(m.model_copy(update={"search_ef": 0}))
    try:
        assert d.search_ef is None and d.search_kwargs(11) == {}
        assert [h["note_id"] for h in d.similar("n1", 5, coll)["neighbours"]] == exact[:5]
    finally:
        d.close()
    for bad in (-3, True, 2.5, "64"):
        with pytest.raises(ValueError, match="search_ef"):
            MilvusStore(milvus_backend.uri, alias=milvus_backend.alias, search_ef=bad)


# -- the model guard and the alias -------------------------------------------------------------------
def test_the_collection_guards_its_model_and_the_alias_switches_to_a_backfilled_one(milvus_backend):
    from worker.sinks.milvus import CollectionMismatch, physical_name

    s = milvus_backend.store()
    alias = milvus_backend.alias
    try:
        phys = s.ensure(DIM, "mv-a")
        assert phys == physical_name(alias, "mv-a") and s.resolve() == phys
        assert s.describe(phys) == (DIM, "mv-a")
        sink = MilvusSink(s, phys)
        sink.add(_enc([_note("a1"), _note("a2")]))
        assert sink.flush() == []
        assert s.ensure(DIM, "mv-a") == phys            # a restart with the same model: the same collection
        with pytest.raises(CollectionMismatch, match="dim 8, but the model produces 9"):
            s.ensure(DIM + 1, "mv-a")
        with pytest.raises(CollectionMismatch, match="model_version 'mv-a', but the model is 'mv-b'"):
            s.ensure(DIM, "mv-b")

        # backfill: a new collection for the new model, written while readers still see the old one
        new = s.ensure(DIM, "mv-b", collection=physical_name(alias, "mv-b"), create_alias=False)
        assert new != phys and s.resolve() == phys and s.describe(new) == (DIM, "mv-b")
        sink_b = MilvusSink(s, new)
        sink_b.add(_enc([_note("b1", title="new model")]))
        assert sink_b.flush() == []
        assert sorted(s.all_ids()) == ["a1", "a2"]      # through the alias: still the old collection
        s.switch_alias(new)
        assert s.resolve() == new and s.all_ids() == ["b1"] and s.get(["b1"], ["title"])[0]["title"] == "new model"
        assert s.similar("b1", 5) == {"note": {"note_id": "b1", "title": "new model", "category": None, "hashtags": [],
                                               "published_at": 1_700_000_000_000, "model_version": MV},
                                      "neighbours": []}
        assert s.ensure(DIM, "mv-b") == new             # the worker restarted on the new model
        with pytest.raises(CollectionMismatch, match="model_version 'mv-b'"):
            s.ensure(DIM, "mv-a")                       # ... and the old model is refused
        assert sorted(s.all_ids(phys)) == ["a1", "a2"]  # the old collection is kept until dropped by hand
        s.switch_alias(phys)                            # switching back (a rollback) works the same way
        assert s.resolve() == phys and s.ensure(DIM, "mv-a") == phys
    finally:
        s.close()


def test_an_rpc_failure_with_a_grpc_status_code_is_transient():
    """pymilvus raises MilvusException(code=StatusCode.UNAVAILABLE) when the server is down mid-call (seen
    on a Milvus server restart): transient, retried — not a crash of the classifier."""
    import grpc
    from pymilvus.exceptions import MilvusException

    from worker.sinks.milvus import TRANSIENT, classify

    assert classify(MilvusException(code=grpc.StatusCode.UNAVAILABLE, message="Retry timeout: 5.0s")) == TRANSIENT
    assert classify(MilvusException(code=grpc.StatusCode.DEADLINE_EXCEEDED, message="deadline")) == TRANSIENT
