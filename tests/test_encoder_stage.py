"""The encoder stage's contract (worker/encoding.py): tokenise once, a note error dead-letters one note,
an engine error restarts the encoder and retries, past the budget EngineFailed and no dead letters;
invalid output is an engine error; health. Unit tests on FakeEncoder, then the supervised child
(ProcessEncoder) on the real tiny model with tests/faulty_engine.py."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from tests.fakes import FakeEncoder
from tests.worker_support import tiny_dir  # noqa: F401 - fixture
from tests.worker_support import wait_process_gone
from worker.encoding import (EncodeStage, Encoder, EncoderHealth, EngineError, EngineFailed, NoteError, padded_tokens,
                             prepare, prepare_many)
from worker.records import Batch, DeadLetter, Encoded, Note, Raw

TOPIC = "notes.published"


def note(i: int, title: str | None = None, partition: int = 0) -> Note:
    title = f"title {i}" if title is None else title
    value = json.dumps({"note_id": f"n{i}", "title": title}).encode("utf-8", "surrogatepass")
    return Note(note_id=f"n{i}", title=title, content=f"content of note {i}", author_id="a", published_at=0,
                topic=None, category=None, hashtags=None, partition=partition, offset=100 + i,
                raw=Raw(key=f"n{i}".encode(), value=value, headers=(("h", b"1"),)))


def batch_of(enc, notes: list[Note], generate: str = "both") -> Batch:
    ready = [prepare(enc, n, generate, TOPIC) for n in notes]
    assert all(isinstance(n, Note) for n in ready)
    return Batch(seq=7, notes=ready, tombstones=[], dead=[], offsets={0: 200, 2: 50}, records=len(ready),
                 padded_tokens=padded_tokens([n.tokens for n in ready]), opened_at=0.0, closed_at=0.0, reason="flush")


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def error(self, event: str, **kw) -> None:
        self.events.append((event, kw))

    warning = error


def test_padded_tokens_is_notes_times_longest():
    assert padded_tokens([]) == 0
    assert padded_tokens([7]) == 7
    assert padded_tokens([3, 9, 4]) == 27


def test_fake_implements_the_protocol():
    assert isinstance(FakeEncoder(), Encoder)


# ------------------------------------------------------------------------------------------ prepare
def test_prepare_tokenises_once_or_dead_letters():
    enc = FakeEncoder(fail_titles=("bad",))
    n = prepare(enc, note(1, "two words"), "both", TOPIC)
    assert isinstance(n, Note) and n.prompt is not None
    assert n.tokens == 8 + 2 + 4 and n.prompt.hashtags is not None
    assert prepare(enc, note(1), "none", TOPIC).prompt.hashtags is None
    assert prepare(enc, note(1), "category", TOPIC).prompt.hashtags is None

    bad = note(2, "bad")
    d = prepare(enc, bad, "both", TOPIC)
    assert isinstance(d, DeadLetter) and d.error_kind == "encode_failed" and "bad" in d.error_message
    assert (d.key, d.value, d.headers, d.partition, d.offset, d.topic) == (
        bad.raw.key, bad.raw.value, bad.raw.headers, 0, 102, TOPIC)


def test_prepare_is_total_whatever_tokenize_raises():
    class Broken(FakeEncoder):
        def tokenize(self, note, generate):
            raise TypeError(f"unexpected \ud800 in {note.title}")

    d = prepare(Broken(), note(3), "both", TOPIC)
    assert isinstance(d, DeadLetter) and d.error_kind == "encode_failed"
    assert d.error_message.startswith("TypeError: unexpected")
    d.error_message.encode("utf-8")  # a lone surrogate in the reason does not survive into the dead letter


def test_prepare_many_keeps_order_and_dead_letters_in_place():
    enc = FakeEncoder(fail_titles=("bad",))
    notes = [note(1, "one"), note(2, "bad"), note(3, "three")]
    out = prepare_many(enc, notes, "both", TOPIC)
    assert [type(x) for x in out] == [Note, DeadLetter, Note]
    assert out[0] == prepare(enc, notes[0], "both", TOPIC) and out[2] == prepare(enc, notes[2], "both", TOPIC)
    assert out[1].error_kind == "encode_failed" and "bad" in out[1].error_message and out[1].offset == notes[1].offset
    assert prepare_many(enc, [], "both", TOPIC) == []


def test_prepare_many_is_total_when_the_batched_call_breaks():
    """An encoder whose batched call raises, or returns the wrong count, costs no note: each is prepared alone."""
    class Raises(FakeEncoder):
        def tokenize_many(self, notes, generate):
            raise RuntimeError("batched tokenizer crashed")

    class Short(FakeEncoder):
        def tokenize_many(self, notes, generate):
            return super().tokenize_many(notes[1:], generate)

    notes = [note(1, "one"), note(2, "bad"), note(3, "three")]
    for enc in (Raises(fail_titles=("bad",)), Short(fail_titles=("bad",))):
        out = prepare_many(enc, notes, "category", TOPIC)
        assert [type(x) for x in out] == [Note, DeadLetter, Note]
        assert [x.offset for x in out] == [n.offset for n in notes]


# -------------------------------------------------------------------------------------- note errors
def test_note_error_dead_letters_that_note_only():
    enc = FakeEncoder(reject_titles=("title 2", "title 4"))
    notes = [note(i) for i in range(6)]
    b = batch_of(enc, notes)
    out = EncodeStage(enc, topic=TOPIC)(b, "both")
    assert isinstance(out, Encoded) and out.batch is b
    assert [n.note_id for n in b.notes] == ["n0", "n1", "n3", "n5"]
    assert [(d.note_id, d.error_kind, d.offset, d.value) for d in out.failed] == [
        ("n2", "encode_failed", 102, notes[2].raw.value), ("n4", "encode_failed", 104, notes[4].raw.value)]
    assert out.embeddings.shape == (4, enc.dim) and len(out.categories) == len(out.hashtags) == 4
    alone = FakeEncoder()
    ref = alone.encode([alone.tokenize(n, "none") for n in b.notes], "none")[0]
    np.testing.assert_array_equal(out.embeddings, ref)  # the other notes' rows are their own
    assert enc.restarts == 0 and enc.calls == 3


def test_every_note_rejected_gives_an_empty_encoded():
    enc = FakeEncoder(reject_titles=("title 0", "title 1"))
    out = EncodeStage(enc, topic=TOPIC)(batch_of(enc, [note(0), note(1)]), "category")
    assert out.batch.notes == [] and out.embeddings.shape == (0, enc.dim) and len(out.failed) == 2


def test_note_error_without_a_valid_index_is_an_engine_fault():
    class NoIndex(FakeEncoder):
        def encode(self, prompts, generate, *, timeout_s=None):
            raise NoteError("which one?")

    enc = NoIndex()
    with pytest.raises(EngineFailed):
        EncodeStage(enc, topic=TOPIC, restarts=1, log=Log())(batch_of(enc, [note(0)]), "none")
    assert enc.restarts == 1


# ------------------------------------------------------------------------------------ engine faults
def test_engine_error_restarts_then_succeeds():
    enc, log, counted = FakeEncoder(fault="raise", faults=2), Log(), []
    b = batch_of(enc, [note(i, partition=i % 2 * 2) for i in range(4)])
    out = EncodeStage(enc, topic=TOPIC, restarts=2, log=log, on_restart=lambda: counted.append(1))(b, "both")
    assert len(out.batch.notes) == 4 and out.failed == [] and enc.restarts == 2 and enc.calls == 3
    assert len(counted) == 2, "each restart is counted (notellm_engine_restarts_total)"
    assert [e for e, _ in log.events] == ["encoder_engine_error"] * 2
    ev = log.events[0][1]
    assert ev["batch"] == 7 and ev["partitions"] == [0, 2] and ev["offsets"] == {0: 200, 2: 50}
    assert "injected engine fault" in ev["error"]


@pytest.mark.parametrize("fault", ["raise", "memory", "nan", "zero", "shape", "short"])
def test_engine_fault_past_the_budget_fails_without_dead_letters(fault):
    enc, log = FakeEncoder(fault=fault), Log()
    b = batch_of(enc, [note(i) for i in range(3)])
    before = list(b.notes)
    stage = EncodeStage(enc, topic=TOPIC, restarts=2, log=log)
    with pytest.raises(EngineFailed):
        stage(b, "both")
    assert b.notes == before, "no note is dead-lettered or dropped for an engine fault"
    assert enc.restarts == 2 and enc.calls == 3 and len(log.events) == 3
    assert not stage.health().ok and "engine failed" in stage.health().detail
    with pytest.raises(EngineFailed):  # stays failed: the worker is exiting
        stage(batch_of(enc, [note(9)]), "both")
    assert enc.calls == 3


@pytest.mark.parametrize("fault", ["nan", "zero", "shape", "short", "memory"])
def test_invalid_output_is_an_engine_fault_that_a_restart_clears(fault):
    enc = FakeEncoder(fault=fault, faults=1)
    out = EncodeStage(enc, topic=TOPIC, restarts=1, log=Log())(batch_of(enc, [note(0), note(1)]), "both")
    assert enc.restarts == 1 and out.failed == [] and np.isfinite(out.embeddings).all()
    np.testing.assert_allclose(np.linalg.norm(out.embeddings, axis=1), 1.0, atol=1e-5)


def test_a_hang_is_cut_by_the_deadline_then_retried():
    enc = FakeEncoder(fault="hang", faults=1, hang_s=30.0)
    t0 = time.monotonic()
    out = EncodeStage(enc, topic=TOPIC, restarts=1, timeout_s=0.2, log=Log())(batch_of(enc, [note(0)]), "none")
    assert time.monotonic() - t0 < 5 and enc.restarts == 1 and len(out.batch.notes) == 1


def test_restart_that_raises_counts_against_the_budget():
    class NoRestart(FakeEncoder):
        def restart(self):
            super().restart()
            raise EngineError("cannot restart")

    enc, log = NoRestart(fault="raise"), Log()
    with pytest.raises(EngineFailed):
        EncodeStage(enc, topic=TOPIC, restarts=2, log=log)(batch_of(enc, [note(0)]), "none")
    assert enc.restarts == 2 and [e for e, _ in log.events].count("encoder_restart_failed") == 2


# ------------------------------------------------------------------------------------------ wiring
def test_empty_batch_does_not_call_the_encoder():
    enc = FakeEncoder()
    out = EncodeStage(enc, topic=TOPIC)(batch_of(enc, []), "both")
    assert out.embeddings.shape == (0, enc.dim) and out.categories == [] and enc.calls == 0


def test_early_vectors_from_notes_prepared_for_generation():
    enc = FakeEncoder()
    notes = [note(i) for i in range(3)]
    stage = EncodeStage(enc, topic=TOPIC)
    early = stage(batch_of(enc, notes, "both"), "none")
    full = stage(batch_of(enc, notes, "both"), "both")
    assert early.categories == [None] * 3 and early.hashtags == [[], [], []]
    assert full.categories == ["title"] * 3 and all(full.hashtags)
    np.testing.assert_array_equal(early.embeddings, full.embeddings)


def test_unprepared_notes_are_a_wiring_error_not_a_retry():
    enc = FakeEncoder()
    b = batch_of(enc, [note(0)], "none")
    with pytest.raises(ValueError, match="prepare"):
        EncodeStage(enc, topic=TOPIC)(b, "both")  # no hashtag segment
    b.notes = [note(1)]  # no prompt at all
    with pytest.raises(ValueError, match="prepare"):
        EncodeStage(enc, topic=TOPIC)(b, "none")
    assert enc.calls == 0 and enc.restarts == 0


def test_health_transitions():
    enc = FakeEncoder(fault="slow", faults=1, hang_s=1.0)
    stage = EncodeStage(enc, topic=TOPIC, timeout_s=0.2)
    assert stage.health() == EncoderHealth(True, "")
    result: list = []
    t = threading.Thread(target=lambda: result.append(stage(batch_of(enc, [note(0)]), "none")))
    t.start()
    seen = []
    while t.is_alive():
        seen.append(stage.health())
        time.sleep(0.02)
    t.join()
    assert any(not h.ok and "more than 0.2 s" in h.detail for h in seen), "a call past its deadline is unhealthy"
    assert seen[0].ok and result and stage.health().ok  # the late answer was accepted; healthy again
    enc.close()
    assert not stage.health().ok and stage.health().detail == "closed"


# --------------------------------------------------------------- the supervised child, real tiny model
NOTES_TEXT = [("Toy Story (1995)", "Adventure|Animation|Children", "Adventure"), ("Heat (1995)", "Action|Crime", None),
              ("Amélie (2001)", 'Comedy|Romance — "quoted" {json} back\\slash', "Comedy"), ("Quick tip", "", None)]
ENGINE = dict(device="cpu", intra_op_threads=1, max_batch_notes=4, max_batch_tokens=600, max_new_tokens=4)


@pytest.fixture(scope="module")
def onnx(tiny_dir):
    from worker.encoder import OnnxNoteEncoder

    return OnnxNoteEncoder(tiny_dir, **ENGINE)


def real_notes() -> list[Note]:
    return [Note(note_id=f"r{i}", title=t, content=c, author_id="a", published_at=0, topic=tp, category=None,
                 hashtags=None, partition=0, offset=i, raw=Raw(key=f"r{i}".encode()))
            for i, (t, c, tp) in enumerate(NOTES_TEXT)]


def faulty(tiny_dir, fault: str, **kw):
    from worker.encoder_process import ProcessEncoder

    return ProcessEncoder(tiny_dir, factory="tests.faulty_engine:FaultyEngine", fault=fault, log_level="WARNING",
                          **ENGINE, **kw)


@pytest.mark.timeout(120)
def test_process_and_in_process_encoders_agree(tiny_dir, onnx):
    from worker.encoders import load_encoder

    pe = load_encoder(tiny_dir, isolation="process", log=("console", "WARNING"), **ENGINE)
    try:
        assert (pe.dim, pe.model_version, pe.manifest) == (onnx.dim, onnx.model_version, onnx.manifest)
        pe.warmup()
        notes = real_notes()
        prompts = [pe.tokenize(n, "both") for n in notes]
        assert prompts == [onnx.tokenize(n, "both") for n in notes]
        for generate in ("none", "both"):
            v1, c1, h1 = pe.encode(prompts, generate, timeout_s=60)
            v2, c2, h2 = onnx.encode(prompts, generate)
            np.testing.assert_allclose(v1, v2, atol=1e-6)
            assert (c1, h1) == (c2, h2)
        np.testing.assert_allclose(v1, onnx.embed(notes), atol=1e-6)
        assert pe.health().ok
    finally:
        pe.close()
    assert not pe._proc.is_alive() and not pe.health().ok


@pytest.mark.timeout(120)
def test_a_hung_child_is_killed_at_the_deadline_and_restart_brings_back_a_working_one(tiny_dir, onnx, tmp_path):
    pe = faulty(tiny_dir, "hang", once=str(tmp_path / "fired"))
    try:
        prompts = [pe.tokenize(n, "none") for n in real_notes()]
        t0 = time.monotonic()
        with pytest.raises(EngineError, match="did not answer within 1 s"):
            pe.encode(prompts, "none", timeout_s=1.0)
        assert time.monotonic() - t0 < 10
        h = pe.health()
        assert not h.ok and "killed" in h.detail and not pe._proc.is_alive()
        with pytest.raises(EngineError):
            pe.encode(prompts, "none", timeout_s=5)
        # restart from a thread that then ends: the new child must outlive it (PR_SET_PDEATHSIG is per thread)
        t = threading.Thread(target=pe.restart)
        t.start()
        t.join()
        time.sleep(0.5)
        assert pe.health().ok and pe.restarts == 1
        v, _, _ = pe.encode(prompts, "none", timeout_s=30)
        np.testing.assert_allclose(v, onnx.encode(prompts, "none")[0], atol=1e-6)
    finally:
        pe.close()


@pytest.mark.timeout(120)
def test_a_raising_engine_is_an_engine_error_and_fails_the_stage_without_dead_letters(tiny_dir):
    pe = faulty(tiny_dir, "raise")
    try:
        b = batch_of(pe, real_notes())
        with pytest.raises(EngineError, match="RuntimeError: injected engine fault"):
            pe.encode([n.prompt for n in b.notes], "none", timeout_s=30)
        stage = EncodeStage(pe, topic=TOPIC, restarts=1, timeout_s=30, log=Log())
        with pytest.raises(EngineFailed, match="injected engine fault"):
            stage(b, "both")
        assert len(b.notes) == 4 and pe.restarts == 1 and not stage.health().ok
        # a child that dies under the worker is an engine error too
        os.kill(pe._proc.pid, signal.SIGKILL)
        pe._proc.join(5)
        assert not pe.health().ok
        with pytest.raises(EngineError, match="exited"):
            pe.encode([n.prompt for n in b.notes], "none", timeout_s=30)
    finally:
        pe.close()


@pytest.mark.timeout(120)
def test_child_nan_output_is_retried_and_child_note_errors_keep_their_index(tiny_dir, tmp_path):
    pe = faulty(tiny_dir, "nan", once=str(tmp_path / "fired"))
    try:
        b = batch_of(pe, real_notes(), "none")
        out = EncodeStage(pe, topic=TOPIC, restarts=1, timeout_s=30, log=Log())(b, "none")
        assert pe.restarts == 1 and len(out.batch.notes) == 4 and np.isfinite(out.embeddings).all()
    finally:
        pe.close()
    pe = faulty(tiny_dir, "note", once=str(tmp_path / "note-fired"))
    try:
        b = batch_of(pe, real_notes(), "none")
        out = EncodeStage(pe, topic=TOPIC, timeout_s=30, log=Log())(b, "none")
        assert [d.note_id for d in out.failed] == ["r3"] and [d.offset for d in out.failed] == [3]
        assert [n.note_id for n in out.batch.notes] == ["r0", "r1", "r2"] and pe.restarts == 0
    finally:
        pe.close()


@pytest.mark.timeout(120)
def test_a_busy_child_dies_with_a_killed_parent(tiny_dir, tmp_path):
    """PR_SET_PDEATHSIG ends a child that is busy (here: hung, so it never sees its pipe close) when the
    parent is SIGKILLed: children are started from the long-lived spawner thread, which dies with the process."""
    import subprocess
    import sys

    from tests.worker_support import REPO

    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, threading, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "if __name__ == '__main__':\n"
        "    from worker.encoder_process import ProcessEncoder\n"
        f"    e = ProcessEncoder({str(tiny_dir)!r}, factory='tests.faulty_engine:FaultyEngine', fault='hang',\n"
        "                       device='cpu', intra_op_threads=1, log_level='WARNING')\n"
        "    p = e.tokenize(type('N', (), {'title': 't', 'content': 'c', 'topic': None})(), 'none')\n"
        "    threading.Thread(target=e.encode, args=([p], 'none'), daemon=True).start()\n"
        "    time.sleep(0.5)\n"
        "    print(e._proc.pid, flush=True)\n"
        "    time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
    try:
        child = int(p.stdout.readline())
        os.kill(child, 0)
    finally:
        p.kill()
        p.wait(10)
    wait_process_gone(child, f"encoder child {child} outlived its SIGKILLed parent")
