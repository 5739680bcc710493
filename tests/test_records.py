"""worker.records: the record types' own helpers."""
import dataclasses

from worker.records import Note, Prompt, Raw


def test_with_prompt_is_replace_for_every_field():
    """Note.with_prompt lists every field by hand (the polling thread's fast path): each field set to a
    value other than its default comes through, so a field added to Note and not to with_prompt fails."""
    note = Note(note_id="n1", title="t", content="c", author_id="a", published_at=7, topic="top", category="cat",
                hashtags=("x", "y"), partition=3, offset=11, timestamp_ms=13, raw=Raw(b"k", b"v", (("h", b"1"),)),
                prompt=Prompt(category=(9,), hashtags=None, tokens=1))
    for f in dataclasses.fields(Note):
        assert getattr(note, f.name) != f.default, f"give {f.name} a non-default value in this test"
    p = Prompt(category=(1, 2, 3), hashtags=(4, 5), tokens=12)
    assert note.with_prompt(p) == dataclasses.replace(note, prompt=p)
    assert note.with_prompt(p).prompt is p and note.prompt.tokens == 1
