"""Data adapters: MIND, MovieLens, generic JSONL/CSV -> Note/Click."""
from __future__ import annotations

import json

import pytest

from notellm.data import (Click, Dataset, Note, detect_format, load_dataset, load_generic, parse_time,
                          write_generic)


def test_parse_time():
    assert parse_time("11/12/2019 2:14:46 PM") == parse_time("2019-11-12T14:14:46Z")
    assert parse_time("1700000000") == 1_700_000_000.0
    assert parse_time("") is None
    with pytest.raises(ValueError):
        parse_time("yesterday")


def test_generic_roundtrip(tmp_path):
    (tmp_path / "notes.jsonl").write_text("\n".join(json.dumps(d) for d in [
        {"id": 1, "title": "Pasta", "content": "carbonara", "category": "food", "hashtags": "#pasta, rome"},
        {"id": "2", "title": "Hike", "hashtags": ["#alps"], "published_at": "2024-05-01T10:00:00Z"},
    ]) + "\n")
    (tmp_path / "clicks.csv").write_text("user,note,timestamp\nu1,1,100\nu1,2,2024-05-02T00:00:00Z\nu2,99,5\n")
    ds = load_dataset(tmp_path)
    assert ds.name == "generic" and ds.dropped_clicks == 1
    assert ds.notes["1"].hashtags == ("pasta", "rome")
    assert ds.notes["1"].published_at == 100.0  # first click fills a missing published_at
    assert ds.notes["2"].published_at == parse_time("2024-05-01T10:00:00Z")
    out = write_generic(ds, tmp_path / "copy")
    ds2 = load_generic(out)
    assert ds2.notes == ds.notes and ds2.clicks == ds.clicks


def test_movielens(shared_data):
    ds = load_dataset(shared_data / "movielens-latest-small")
    assert ds.name == "movielens"
    toy = ds.notes["1"]
    assert toy.title == "Toy Story (1995)" and toy.category == "Adventure"
    assert toy.content.startswith("Genres: Adventure, Animation") and toy.hashtags
    assert all(isinstance(c, Click) for c in ds.clicks[:10])
    assert len(ds.clicks) > 40_000 and ds.dropped_clicks == 0


def test_mind(shared_data):
    ds = load_dataset(shared_data / "mind-small-sample")
    assert ds.name == "mind" and len(ds.notes) == 2000
    n = ds.notes["N16278"]
    assert n.category == "sports" and n.hashtags == ("more sports",)
    assert ds.clicks and all(c.note in ds.notes for c in ds.clicks)
    assert ds.dropped_clicks > 0


def _write_amazon(d, prefix, items, inter):
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{prefix}.item.json").write_text(json.dumps(items))
    (d / f"{prefix}.inter.json").write_text(json.dumps(inter))


def test_amazon_layout_any_prefix(tmp_path):
    items = {
        "0": {"title": "Lip &amp; cheek tint", "description": "<p>Rosy&nbsp;glow.</p><li.Lasts all day",
              "brand": "ACME", "categories": "Beauty,Makeup, Lips & Cheeks,Tints,Tints,acme"},
        "1": {"title": "Shampoo", "description": "", "brand": "Unknown", "categories": ""},
        "2": {"title": "", "description": "  ", "brand": "X", "categories": "Beauty,Hair"},  # no text: no note
        "3": {"title": "Comb", "brand": "N/A", "categories": [["Beauty", "Hair", "Combs"]]},  # list variant
    }
    inter = {"0": [1, 0, 7, 0], "1": [0, 2]}  # item 7 unknown, item 0 repeated (first position kept)
    _write_amazon(tmp_path, "Beauty", items, inter)
    assert detect_format(tmp_path) == "amazon"
    ds = load_dataset(tmp_path)
    assert ds.name == "amazon" and ds.meta["domain"] == "Beauty" and set(ds.notes) == {"0", "1", "3"}
    n = ds.notes["0"]
    assert n.title == "Lip & cheek tint" and n.content == "Rosy glow. Lasts all day"
    assert n.category == "Makeup, Lips & Cheeks" and n.topic == ""
    assert n.hashtags == ("Tints", "acme")  # path elements, then the brand; de-duplicated case-insensitively
    assert ds.notes["1"].category == "" and ds.notes["1"].hashtags == ()
    assert ds.notes["3"].category == "Hair" and ds.notes["3"].hashtags == ("Combs",)
    assert [(c.user, c.note, c.timestamp) for c in ds.clicks] == [
        ("0", "1", 0.0), ("1", "0", 0.0), ("0", "0", 86400.0)]
    assert ds.dropped_clicks == 2  # item 7 (unknown) and item 2 (no text)
    assert n.published_at == 0.0 and ds.notes["1"].published_at == 0.0
    ds2 = load_dataset(tmp_path, step_seconds=1.0)
    assert [c.timestamp for c in ds2.clicks] == [0.0, 0.0, 1.0]


def test_amazon_several_prefixes(tmp_path):
    _write_amazon(tmp_path, "Beauty", {"0": {"title": "a"}}, {"u": [0]})
    _write_amazon(tmp_path, "Toys", {"0": {"title": "b"}}, {"u": [0]})
    (tmp_path / "Orphan.item.json").write_text("{}")  # no matching .inter.json: ignored
    with pytest.raises(ValueError, match="several"):
        load_dataset(tmp_path)
    assert load_dataset(tmp_path, prefix="Toys").notes["0"].title == "b"
    with pytest.raises(ValueError, match="no known layout"):
        detect_format(tmp_path / "Orphan")
