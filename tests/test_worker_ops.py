"""Operations around the loop, on the real broker + milvus-lite + the tiny exported model: the HTTP
port (/metrics, /healthz, /readyz, /similar) and `notellm similar`, replay, backfill + alias switch,
and the startup check against a collection built for another model. Those whose outcome depends on the
store (similar, replay's re-upserts, backfill's alias switch, the model guard) run on a Milvus 2.3 server
too (`milvus_backend`: a collection alias of the test's own, dropped afterwards)."""
from __future__ import annotations

import json
import urllib.parse
import urllib.request

import pytest

from tests.test_worker_e2e import settings_for, settings_on, topics  # noqa: F401 - fixture
from tests.worker_support import encoder, tiny_dir  # noqa: F401 - fixtures
from tests.worker_support import (REPO, AppThread, dlq_events, free_port, high_watermarks, note_doc, produce_notes,
                                  produce_raw, wait_committed_to_end, wait_process_gone, wait_until)
from worker.app import WorkerApp

pytestmark = pytest.mark.timeout(300)
from worker.sinks.milvus import CollectionMismatch, MilvusStore


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_http_probes_metrics_and_similar(kafka_bootstrap, topics, milvus_backend, encoder, capsys):
    port = free_port()
    s = settings_on(kafka_bootstrap, topics, milvus_backend, http={"port": port, "host": "127.0.0.1"})
    ids = produce_notes(kafka_bootstrap, topics["notes"], [note_doc(i) for i in range(40)])
    app = WorkerApp(s, encoder=encoder)
    t = AppThread(app)
    wait_committed_to_end(kafka_bootstrap, s.kafka.group_id, topics["notes"], timeout=60, alive=t.alive)
    base = f"http://127.0.0.1:{port}"
    assert _get(f"{base}/healthz")[0] == 200
    code, body = _get(f"{base}/readyz")
    assert code == 200 and json.loads(body) == {"ok": True, "partitions_assigned": True, "model_warmed": True,
                                                 "milvus_reachable": True}
    code, body = _get(f"{base}/metrics")
    text = body.decode()
    for name in ("notellm_consumed_total", "notellm_embedded_total", "notellm_dead_lettered", "notellm_deleted_total",
                 "notellm_batch_notes_bucket", "notellm_batch_tokens_bucket", "notellm_encode_seconds_bucket",
                 "notellm_freshness_seconds_bucket", "notellm_consumer_lag"):
        assert name in text, name
    assert 'notellm_embedded_total 40.0' in text

    # Freshness as a reader sees it: a sampled probe finds a note at the readers' level (Bounded: on a
    # server that can take a moment after the commit).
    def visible_count() -> float:
        lines = [ln for ln in _get(f"{base}/metrics")[1].decode().splitlines()
                 if ln.startswith("notellm_visible_seconds_count")]
        return float(lines[0].split()[-1]) if lines else 0.0

    wait_until(lambda: visible_count() >= 1, "a visibility probe to find a note", timeout=30)
    code, body = _get(f"{base}/similar/{ids[0]}?k=3")
    ans = json.loads(body)
    assert code == 200 and ans["note"]["note_id"] == ids[0] and len(ans["neighbours"]) == 3
    assert all(h["note_id"] != ids[0] and -1.0 <= h["score"] <= 1.0001 for h in ans["neighbours"])
    assert ans["note"]["category"] is not None or ans["note"]["hashtags"] is not None
    assert _get(f"{base}/similar/nope")[0] == 404
    # Bounded k, hostile ids, undecodable paths: client errors, never a traceback or an internal message.
    for bad in ("k=0", "k=101", "k=abc", "k=-1", "k=1e3"):
        assert _get(f"{base}/similar/{ids[0]}?{bad}")[0] == 400, bad
    assert _get(f"{base}/similar/%ff%fe")[0] == 400
    code, body = _get(f"{base}/similar/" + urllib.parse.quote("zz'] or note_id not in ['" + ids[0], safe=""))
    assert code == 404 and json.loads(body)["error"] == "note not found"
    # /notes/{id}: is it indexed, with which tags (one primary-key read); hostile ids reach no other note.
    code, body = _get(f"{base}/notes/{ids[0]}")
    row = json.loads(body)
    assert code == 200 and row["note_id"] == ids[0] and row["model_version"] and "embedding" not in row
    assert _get(f"{base}/notes/nope")[0] == 404
    assert _get(f"{base}/notes/%ff%fe")[0] == 400
    assert _get(f"{base}/notes/" + "x" * 257)[0] == 400
    code, body = _get(f"{base}/notes/" + urllib.parse.quote('zz" or note_id != "' + ids[0], safe=""))
    assert code == 404 and json.loads(body)["error"] == "note not found"
    real = app.store.similar
    app.store.similar = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("secret /internal/path detail"))
    code, body = _get(f"{base}/similar/{ids[0]}")
    app.store.similar = real
    assert code == 500 and b"secret" not in body and json.loads(body)["error_id"]
    # The CLI goes through the worker while the worker holds the lite db.
    from notellm.cli import main
    assert main(["similar", ids[0], "-k", "2", "--url", base]) == 0
    out = capsys.readouterr().out
    assert ids[0] in out and "rank" in out
    assert t.stop() == 0
    # With no worker running, the CLI opens Milvus directly.
    assert main(["similar", ids[0], "-k", "2", "--url", f"http://127.0.0.1:{free_port()}", "--milvus-uri",
                 milvus_backend.uri, "--collection", milvus_backend.alias, "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{\n"):])["note"]["note_id"] == ids[0]


def test_replay_reprocesses_a_range_with_the_same_code_path(kafka_bootstrap, topics, milvus_backend, encoder):
    s = settings_on(kafka_bootstrap, topics, milvus_backend, model={"generate": "none"})
    ids = produce_notes(kafka_bootstrap, topics["notes"], [note_doc(i) for i in range(90)])
    store = milvus_backend.store()
    from worker.replay import replay

    # Replay partitions 0 and 1 from offset 0 to 10 (exclusive) only.
    rc = replay(s, from_offsets="0:0,1:0", until="0:10,1:10", group="replay-test", encoder=encoder, store=store)
    assert rc == 0 and store.count() == 20
    # Then everything from a timestamp before the first note, to the end: the first 20 are upserted again.
    rc = replay(s, from_timestamp="2000-01-01T00:00:00Z", group="replay-test-2", encoder=encoder, store=store)
    assert rc == 0
    got = store.all_ids()
    assert len(got) == len(set(got)) == 90 and set(got) == set(ids) and store.count() == 90
    store.close()


def test_backfill_builds_new_collection_and_switches_alias(kafka_bootstrap, topics, milvus_backend, encoder):
    from tests.fakes import FakeEncoder
    from worker.backfill import backfill

    s = settings_on(kafka_bootstrap, topics, milvus_backend, model={"generate": "none"})
    ids = produce_notes(kafka_bootstrap, topics["notes"], [note_doc(i) for i in range(60)])
    store = milvus_backend.store()
    app = WorkerApp(s, encoder=encoder, store=store)
    t = AppThread(app)
    wait_committed_to_end(kafka_bootstrap, s.kafka.group_id, topics["notes"], timeout=60, alive=t.alive)
    assert t.stop() == 0
    old = store.resolve()
    # A "new model" (different version and dimension) cannot write into the live collection ...
    new = FakeEncoder(dim=24, model_version="fake-v2")
    with pytest.raises(CollectionMismatch, match="dim"):
        WorkerApp(s, encoder=new, store=store).start()
    # ... so backfill builds its own from the topic's start and switches the alias when caught up.
    assert backfill(s, encoder=new, store=store) == 0
    cur = store.resolve()
    assert cur != old and "fake_v2" in cur
    assert set(store.all_ids()) == set(ids)                     # readers (through the alias) see the new model
    rows = store.get(ids, ["model_version"])
    assert len(rows) == len(ids) and {r["model_version"] for r in rows} == {"fake-v2"}
    assert set(store.all_ids(old)) == set(ids)                  # the old collection is untouched
    # The worker with the new model now starts against the alias (no mismatch).
    assert store.ensure(new.dim, new.model_version) == cur
    # ... and the old model is now the mismatch (the guard follows the alias).
    with pytest.raises(CollectionMismatch):
        WorkerApp(s, encoder=encoder, store=store).start()
    store.close()


def test_a_stopped_backfill_exits_3_without_switching_the_alias(kafka_bootstrap, topics, milvus_uri):
    """SIGTERM during a backfill (an evicted Job pod) must not look like success: exit 3, alias unchanged."""
    import threading

    from tests.fakes import FakeEncoder
    from worker.backfill import STOPPED, backfill

    s = settings_for(kafka_bootstrap, topics, milvus_uri, model={"generate": "none"})
    produce_notes(kafka_bootstrap, topics["notes"], [note_doc(i) for i in range(6)])
    store = MilvusStore(milvus_uri, alias="notes")
    old = FakeEncoder(dim=24, model_version="fake-v1")
    store.ensure(old.dim, old.model_version)
    before = store.resolve()
    stop = threading.Event()
    stop.set()
    assert backfill(s, encoder=FakeEncoder(dim=24, model_version="fake-v4"), store=store, stop=stop) == STOPPED == 3
    assert store.resolve() == before
    store.close()


def test_replay_and_backfill_do_not_dead_letter_input_errors_twice(kafka_bootstrap, topics, milvus_uri, encoder):
    from tests.fakes import FakeEncoder
    from worker.backfill import backfill
    from worker.replay import replay

    s = settings_for(kafka_bootstrap, topics, milvus_uri, model={"generate": "none"})
    ids = produce_notes(kafka_bootstrap, topics["notes"], [note_doc(i) for i in range(12)])
    produce_raw(kafka_bootstrap, topics["notes"], [(b"bad-json", b"{not json"), (b"bad-utf8", b"\xff\xfe")])
    store = MilvusStore(milvus_uri, alias="notes")
    t = AppThread(WorkerApp(s, encoder=encoder, store=store))
    wait_committed_to_end(kafka_bootstrap, s.kafka.group_id, topics["notes"], timeout=60, alive=t.alive)
    assert t.stop() == 0
    assert sorted(e["error_kind"] for e, _h in dlq_events(kafka_bootstrap, topics["dlq"])) == ["not_json", "not_utf8"]
    # A replay over the same records skips them by default ...
    assert replay(s, from_timestamp="2000-01-01T00:00:00Z", group="replay-dlq", encoder=encoder, store=store) == 0
    assert len(dlq_events(kafka_bootstrap, topics["dlq"])) == 2
    # ... unless asked to send them again ...
    assert replay(s, from_timestamp="2000-01-01T00:00:00Z", group="replay-dlq-2", encoder=encoder, store=store,
                  resend_dead_letters=True) == 0
    assert len(dlq_events(kafka_bootstrap, topics["dlq"])) == 4
    # ... and a backfill (which still embeds every good note) skips them too.
    assert backfill(s, encoder=FakeEncoder(dim=24, model_version="fake-v3"), store=store) == 0
    assert set(store.all_ids()) == set(ids) and "fake_v3" in store.resolve()
    assert len(dlq_events(kafka_bootstrap, topics["dlq"])) == 4
    store.close()


def test_model_version_mismatch_is_a_startup_error(kafka_bootstrap, topics, milvus_backend, encoder):
    from tests.fakes import FakeEncoder

    s = settings_on(kafka_bootstrap, topics, milvus_backend)
    store = milvus_backend.store()
    store.ensure(encoder.dim, encoder.model_version)
    with pytest.raises(CollectionMismatch, match="model_version"):
        WorkerApp(s, encoder=FakeEncoder(dim=encoder.dim, model_version="other"), store=store).start()
    store.close()


def test_process_encoder_matches_the_in_process_one(tiny_dir, encoder):
    import numpy as np

    from notellm.prompts import NoteText
    from worker.encoders import load_encoder

    notes = [NoteText(d["title"], d["content"], None) for d in (note_doc(i) for i in range(5))]
    notes.append(NoteText("Amélie (2001)", "Comedy|Romance — \"quoted\" {json}", "Comedy"))
    pe = load_encoder(tiny_dir, device="cpu", intra_op_threads=1, isolation="process")
    try:
        assert (pe.dim, pe.model_version) == (encoder.dim, encoder.model_version)
        # Tokenised once, in the parent, by the same code as the in-process encoder.
        prompts = [pe.tokenize(n, "both") for n in notes]
        assert prompts == [encoder.tokenize(n, "both") for n in notes]
        v0, _, _ = pe.encode(prompts, "none")
        v1, c1, h1 = pe.encode(prompts, "both")
        v2, c2, h2 = encoder.encode(prompts, "both")
        assert np.allclose(v0, v2, atol=1e-5) and np.allclose(v1, v2, atol=1e-5) and c1 == c2 and h1 == h2
    finally:
        pe.close()
    assert not pe._proc.is_alive()


def test_process_encoder_left_open_does_not_hang_interpreter_exit(tiny_dir, tmp_path):
    """The child ignores SIGTERM (shutdown is the parent's job), so multiprocessing's exit-time
    terminate()+join() alone would wait forever for an encoder nobody closed."""
    import subprocess
    import sys

    script = tmp_path / "left_open.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "if __name__ == '__main__':\n"
        "    from worker.encoders import load_encoder\n"
        f"    e = load_encoder({str(tiny_dir)!r}, device='cpu', intra_op_threads=1, isolation='process')\n"
        "    e.warmup()\n"
        "    print('pid', e._proc.pid, flush=True)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    child = int(r.stdout.split()[-1])
    wait_process_gone(child, f"encoder child {child} outlived its parent")
