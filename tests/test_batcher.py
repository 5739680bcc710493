"""The batcher is pure: records + a clock in, closed batches out."""
from __future__ import annotations

import pytest

from worker.batcher import Batcher
from worker.records import DeadLetter, Note, Prompt, Tombstone


def note(i: int, p: int = 0, off: int | None = None, tokens: int = 10, nid: str | None = None, title: str = "t") -> Note:
    return Note(note_id=nid or f"n{i}", title=title, content="c", author_id="a", published_at=0, topic=None,
                category=None, hashtags=None, partition=p, offset=i if off is None else off,
                prompt=Prompt(category=(1,) * tokens, hashtags=None, tokens=tokens))


def dead(off: int, p: int = 0) -> DeadLetter:
    return DeadLetter(key=b"k", value=b"\xff", error_kind="not_utf8", error_message="x", topic="t", partition=p, offset=off)


def mk(**kw) -> Batcher:
    args = dict(max_notes=4, max_tokens=1000, linger_s=0.05)
    args.update(kw)
    return Batcher(**args)


def test_closes_at_max_notes():
    b = mk()
    out = []
    for i in range(9):
        out += b.add(note(i), now=0.0)
    assert [len(x.notes) for x in out] == [4, 4]
    assert all(x.reason == "notes" for x in out)
    assert out[0].offsets == {0: 4} and out[1].offsets == {0: 8}
    assert b.flush(0.0).records == 1


def test_closes_at_padded_token_budget():
    b = mk(max_notes=100, max_tokens=100)
    out = []
    out += b.add(note(0, tokens=10), 0.0)
    out += b.add(note(1, tokens=10), 0.0)
    # A 40-token prompt would pad 3 notes to 120 > 100: the open batch closes first.
    out += b.add(note(2, tokens=40), 0.0)
    assert len(out) == 1 and out[0].reason == "tokens" and len(out[0].notes) == 2 and out[0].padded_tokens == 20
    out += b.add(note(3, tokens=40), 0.0)  # 2 * 40 = 80 <= 100
    assert len(out) == 1
    out += b.add(note(4, tokens=20), 0.0)  # 3 * 40 = 120 > 100
    assert len(out) == 2 and [n.note_id for n in out[1].notes] == ["n2", "n3"] and out[1].padded_tokens == 80


def test_budget_exactly_reached_closes_and_oversized_note_goes_alone():
    b = mk(max_notes=100, max_tokens=100)
    out = b.add(note(0, tokens=50), 0.0) + b.add(note(1, tokens=50), 0.0)
    assert len(out) == 1 and out[0].padded_tokens == 100
    out = b.add(note(2, tokens=500), 0.0)
    assert len(out) == 1 and [n.note_id for n in out[0].notes] == ["n2"]


def test_linger_from_first_record():
    b = mk(linger_s=0.05)
    assert b.poll(0.0) is None and b.deadline() is None
    b.add(note(0), now=1.0)
    b.add(note(1), now=1.04)
    assert b.deadline() == pytest.approx(1.05)
    assert b.poll(1.049) is None
    got = b.poll(1.05)
    assert got is not None and got.reason == "linger" and len(got.notes) == 2
    assert b.poll(2.0) is None


def test_linger_expired_before_add_closes_old_batch_first():
    b = mk(linger_s=0.05)
    b.add(note(0), 0.0)
    out = b.add(note(1), 1.0)
    assert len(out) == 1 and [n.note_id for n in out[0].notes] == ["n0"]
    assert [n.note_id for n in b.flush(1.0).notes] == ["n1"]


def test_linger_waits_while_the_encoder_is_backed_up_but_budgets_still_close():
    b = mk(max_notes=4)
    assert b.add(note(0), 0.0, ready=False) == []
    assert b.add(note(1), 1.0, ready=False) == []   # long past linger: kept open, still filling
    assert b.poll(1.0, ready=False) is None
    full = b.add(note(2), 1.0, ready=False) + b.add(note(3), 1.0, ready=False)
    assert [(len(x.notes), x.reason) for x in full] == [(4, "notes")]   # the count budget closes regardless
    b.add(note(4), 2.0, ready=False)
    late = b.poll(2.1, ready=True)                  # the slot freed up: linger closes what waited
    assert late is not None and late.reason == "linger" and [n.note_id for n in late.notes] == ["n4"]


def test_duplicate_note_id_keeps_later_offset_and_tombstone_wins_if_later():
    b = mk(max_notes=10)
    b.add(note(0, nid="x", title="old"), 0.0)
    b.add(note(1, nid="y"), 0.0)
    b.add(note(2, nid="x", title="new"), 0.0)
    b.add(Tombstone(note_id="y", partition=0, offset=3), 0.0)
    b.add(dead(4), 0.0)
    got = b.flush(0.0)
    assert [(n.note_id, n.title, n.offset) for n in got.notes] == [("x", "new", 2)]
    assert [t.note_id for t in got.tombstones] == ["y"]
    assert len(got.dead) == 1
    assert got.offsets == {0: 5} and got.records == 5


def test_offsets_per_partition_and_drop_partitions():
    b = mk(max_notes=10)
    for i in range(3):
        b.add(note(i, p=0, nid=f"a{i}"), 0.0)
        b.add(note(10 + i, p=1, nid=f"b{i}"), 0.0)
    b.add(dead(20, p=1), 0.0)
    assert b.drop_partitions([1]) == 4
    got = b.flush(0.0)
    assert got.offsets == {0: 3} and {n.note_id for n in got.notes} == {"a0", "a1", "a2"} and not got.dead
    b.add(note(0, p=2), 0.0)
    assert b.drop_partitions([2]) == 1 and b.flush(0.0) is None


def test_budget_is_the_encoders_padded_tokens_function():
    from worker.encoding import padded_tokens

    b = Batcher(max_notes=10, max_tokens=1000, linger_s=1)
    for i, t in enumerate((7, 30, 12)):
        b.add(note(i, tokens=t), 0.0)
    got = b.flush(0.0)
    assert got.padded_tokens == padded_tokens([7, 30, 12]) == 90


class _RecountingBatcher(Batcher):
    """The reference: the token budget recomputed from every kept note at every record (what the batcher
    did before it kept a running maximum)."""

    def _would_overflow(self, note):
        from worker.encoding import padded_tokens

        lengths = {**self._tokens, note.note_id: note.tokens}
        return self._records + 1 > self.max_notes or padded_tokens(list(lengths.values())) > self.max_tokens

    def _budget_reached(self):
        from worker.encoding import padded_tokens

        return padded_tokens(list(self._tokens.values())) >= self.max_tokens


def test_running_token_budget_closes_exactly_where_recounting_does():
    """Random streams with repeated note ids (a replaced note may have been the longest), tombstones, dead
    letters, lingering and partition drops: the same batches as recounting the budget at every record."""
    import random

    def summary(batches):
        return [(b.reason, [(n.note_id, n.offset) for n in b.notes], [t.note_id for t in b.tombstones],
                 b.offsets, b.records, b.padded_tokens) for b in batches if b is not None]

    for seed in range(60):
        rng = random.Random(seed)
        kw = dict(max_notes=rng.choice([3, 8, 50]), max_tokens=rng.choice([60, 200, 1000]), linger_s=0.5)
        fast, ref = Batcher(**kw), _RecountingBatcher(**kw)
        got, want = [], []
        now = 0.0
        for off in range(200):
            now += rng.choice([0.0, 0.0, 0.1, 0.6])
            r = rng.random()
            nid = f"n{rng.randrange(12)}"  # few ids: replacements inside a batch are common
            if r < 0.75:
                rec = note(off, p=rng.randrange(2), off=off, tokens=rng.randint(1, 70), nid=nid)
            elif r < 0.9:
                rec = Tombstone(note_id=nid, partition=rng.randrange(2), offset=off)
            else:
                rec = dead(off, p=rng.randrange(2))
            ready = rng.random() < 0.8
            got += fast.add(rec, now, ready)
            want += ref.add(rec, now, ready)
            if rng.random() < 0.03:
                p = rng.randrange(2)
                assert fast.drop_partitions([p]) == ref.drop_partitions([p])
        got.append(fast.flush(now))
        want.append(ref.flush(now))
        assert summary(got) == summary(want), seed
