"""Data adapters: MIND, MovieLens and a generic JSONL/CSV format -> one internal form.

Internal form (pure Python, no torch):

- `Note(id, title, topic, content, category, hashtags, published_at)` — `published_at` is seconds since the
  epoch (float) or None when unknown.
- `Click(user, note, timestamp)` — timestamp in seconds since the epoch (float).
- `Dataset(name, notes, clicks)` — `notes` maps note id -> Note; every click refers to a known note
  (clicks on notes without text are dropped and counted in `Dataset.dropped_clicks`).

`load_dataset(path)` recognises the layout of a directory:

| files                               | adapter            |
|-------------------------------------|--------------------|
| `news.tsv` + `behaviors.tsv`        | `load_mind`        |
| `movies.csv` + `ratings.csv`        | `load_movielens`   |
| `notes.jsonl` + `clicks.csv`        | `load_generic`     |
| `<P>.item.json` + `<P>.inter.json`  | `load_amazon`      |

The generic format and the Amazon layout are documented in docs/data-format.md.
"""
from __future__ import annotations

import csv
import html
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

__all__ = [
    "Note", "Click", "Dataset", "load_dataset", "load_mind", "load_movielens", "load_generic", "load_amazon",
    "write_generic", "parse_time", "detect_format", "amazon_files",
]


@dataclass(frozen=True)
class Note:
    id: str
    title: str
    topic: str = ""
    content: str = ""
    category: str = ""
    hashtags: tuple[str, ...] = ()
    published_at: float | None = None


@dataclass(frozen=True)
class Click:
    user: str
    note: str
    timestamp: float


@dataclass
class Dataset:
    name: str
    notes: dict[str, Note]
    clicks: list[Click]
    dropped_clicks: int = 0
    meta: dict = field(default_factory=dict)

    def summary(self) -> dict:
        users = {c.user for c in self.clicks}
        clicked = {c.note for c in self.clicks}
        cats = Counter(n.category for n in self.notes.values() if n.category)
        return {
            "name": self.name, "notes": len(self.notes), "clicked_notes": len(clicked),
            "clicks": len(self.clicks), "users": len(users), "categories": len(cats),
            "notes_with_hashtags": sum(1 for n in self.notes.values() if n.hashtags),
            "dropped_clicks": self.dropped_clicks,
        }


# --------------------------------------------------------------------------------------------- helpers

def parse_time(value) -> float | None:
    """Seconds since the epoch from an int/float, a numeric string, ISO 8601, or MIND's `M/D/YYYY h:mm:ss AM`.

    Naive datetimes are taken as UTC. Empty / None -> None.
    """
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    s = str(value).strip()
    if not s:
        return None
    try:
        return float(s)
    except ValueError:
        pass
    for fmt in ("%m/%d/%Y %I:%M:%S %p",):
        try:
            return datetime.strptime(s, fmt).replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            pass
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError as e:
        raise ValueError(f"unrecognised timestamp {value!r} (use epoch seconds or ISO 8601)") from e
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _first_seen(clicks: list[Click]) -> dict[str, float]:
    first: dict[str, float] = {}
    for c in clicks:
        if c.note not in first or c.timestamp < first[c.note]:
            first[c.note] = c.timestamp
    return first


def _with_published(notes: dict[str, Note], clicks: list[Click]) -> dict[str, Note]:
    """Fill a missing published_at with the note's first click time (the best proxy the logs give)."""
    first = _first_seen(clicks)
    out = {}
    for nid, n in notes.items():
        if n.published_at is None and nid in first:
            n = Note(n.id, n.title, n.topic, n.content, n.category, n.hashtags, first[nid])
        out[nid] = n
    return out


def detect_format(path: str | Path) -> str:
    p = Path(path)
    if (p / "news.tsv").exists() and (p / "behaviors.tsv").exists():
        return "mind"
    if (p / "movies.csv").exists() and (p / "ratings.csv").exists():
        return "movielens"
    if (p / "notes.jsonl").exists() and (p / "clicks.csv").exists():
        return "generic"
    if amazon_files(p):
        return "amazon"
    raise ValueError(
        f"{p}: no known layout (want news.tsv+behaviors.tsv, movies.csv+ratings.csv, notes.jsonl+clicks.csv, "
        "or <P>.item.json+<P>.inter.json)")


def load_dataset(path: str | Path, **kwargs) -> Dataset:
    """Load any supported layout from a directory (see module docstring)."""
    fmt = detect_format(path)
    return {"mind": load_mind, "movielens": load_movielens, "generic": load_generic,
            "amazon": load_amazon}[fmt](path, **kwargs)


# ------------------------------------------------------------------------------------------------ MIND

def _humanize(tag: str) -> str:
    """MIND subcategories look like `newspolitics` / `more_sports`: keep them as hashtags, readable."""
    return tag.replace("_", " ").strip()


def load_mind(path: str | Path, *, include_history: bool = True) -> Dataset:
    """MIND `news.tsv` + `behaviors.tsv`.

    Notes: title -> title, abstract -> content, category -> category, subcategory -> the one hashtag.
    Clicks: impressions marked `-1` at the impression time; with `include_history`, the user's history
    list too. MIND gives no time for history clicks, only that they happened before the impression and in
    order, so they are stamped at the user's earliest impression time minus (len(history) - i) seconds:
    order preserved, all inside any co-occurrence window. A history seen in several impressions of the
    same user is taken once. Clicks on news outside `news.tsv` (no text) are dropped and counted.
    """
    p = Path(path)
    notes: dict[str, Note] = {}
    with open(p / "news.tsv", encoding="utf-8", newline="") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) < 4:
                continue
            nid, cat, sub, title = row[0], row[1], row[2], row[3]
            abstract = row[4] if len(row) > 4 else ""
            notes[nid] = Note(nid, title.strip(), "", abstract.strip(), cat.strip(),
                              (_humanize(sub),) if sub.strip() else ())
    raw: list[Click] = []
    histories: dict[str, list[str]] = {}
    first_imp: dict[str, float] = {}
    with open(p / "behaviors.tsv", encoding="utf-8", newline="") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) < 5:
                continue
            user, ts = row[1], parse_time(row[2])
            if ts is None:
                continue
            first_imp[user] = min(ts, first_imp.get(user, ts))
            hist = row[3].split()
            if len(hist) > len(histories.get(user, [])):
                histories[user] = hist  # a later impression's history extends an earlier one
            for item in row[4].split():
                nid, _, label = item.rpartition("-")
                if label == "1":
                    raw.append(Click(user, nid, ts))
    if include_history:
        for user, hist in histories.items():
            t0 = first_imp[user]
            n = len(hist)
            for i, nid in enumerate(hist):
                raw.append(Click(user, nid, t0 - (n - i)))
    clicks = [c for c in raw if c.note in notes]
    clicks.sort(key=lambda c: (c.timestamp, c.user, c.note))
    return Dataset("mind", _with_published(notes, clicks), clicks, len(raw) - len(clicks),
                   {"source": str(p), "history_clicks": include_history})


# ------------------------------------------------------------------------------------------- MovieLens

_YEAR = re.compile(r"\s*\((\d{4})\)\s*$")


def load_movielens(path: str | Path, *, min_rating: float = 4.0, max_hashtags: int = 8) -> Dataset:
    """MovieLens `movies.csv` (+ `tags.csv`) + `ratings.csv`.

    Notes: the title (year kept) -> title; "Genres: a, b, c" -> content; the first genre -> category
    (`(no genres listed)` -> empty category); user tags (lower-cased, most frequent first, at most
    `max_hashtags`) -> hashtags. Clicks: ratings >= `min_rating`. published_at: the movie's first rating.
    """
    p = Path(path)
    tag_counts: dict[str, Counter] = defaultdict(Counter)
    tags_file = p / "tags.csv"
    if tags_file.exists():
        with open(tags_file, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                t = " ".join(row["tag"].strip().lower().split())
                if t:
                    tag_counts[row["movieId"]][t] += 1
    notes: dict[str, Note] = {}
    with open(p / "movies.csv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            mid = row["movieId"]
            genres = [g for g in row["genres"].split("|") if g and g != "(no genres listed)"]
            tags = tuple(t for t, _ in sorted(tag_counts.get(mid, Counter()).items(),
                                              key=lambda kv: (-kv[1], kv[0]))[:max_hashtags])
            notes[mid] = Note(mid, row["title"].strip(), "",
                              ("Genres: " + ", ".join(genres)) if genres else "",
                              genres[0] if genres else "", tags)
    raw = 0
    clicks: list[Click] = []
    with open(p / "ratings.csv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if float(row["rating"]) < min_rating:
                continue
            raw += 1
            if row["movieId"] in notes:
                clicks.append(Click(row["userId"], row["movieId"], float(row["timestamp"])))
    clicks.sort(key=lambda c: (c.timestamp, c.user, c.note))
    return Dataset("movielens", _with_published(notes, clicks), clicks, raw - len(clicks),
                   {"source": str(p), "min_rating": min_rating})


# --------------------------------------------------------------------------------------------- generic

def _hashtags(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [v for v in re.split(r"[,\s]+", value) if v]
    return tuple(str(v).lstrip("#").strip() for v in value if str(v).lstrip("#").strip())


def load_generic(path: str | Path) -> Dataset:
    """`notes.jsonl` (one JSON object per line) + `clicks.csv` (header `user,note,timestamp`).

    See docs/data-format.md. Required note field: `id` (string or number); optional: title, topic,
    content, category, hashtags (list or comma/space-separated string, leading '#' stripped),
    published_at (epoch seconds or ISO 8601).
    """
    p = Path(path)
    notes: dict[str, Note] = {}
    with open(p / "notes.jsonl", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p / 'notes.jsonl'}:{lineno}: bad JSON: {e}") from e
            if "id" not in d:
                raise ValueError(f"{p / 'notes.jsonl'}:{lineno}: missing 'id'")
            nid = str(d["id"])
            notes[nid] = Note(nid, str(d.get("title") or ""), str(d.get("topic") or ""),
                              str(d.get("content") or ""), str(d.get("category") or ""),
                              _hashtags(d.get("hashtags")), parse_time(d.get("published_at")))
    raw = 0
    clicks: list[Click] = []
    with open(p / "clicks.csv", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"user", "note", "timestamp"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{p / 'clicks.csv'}: missing columns {sorted(missing)}")
        for row in reader:
            raw += 1
            if row["note"] in notes:
                clicks.append(Click(row["user"], row["note"], parse_time(row["timestamp"])))
    clicks.sort(key=lambda c: (c.timestamp, c.user, c.note))
    return Dataset("generic", _with_published(notes, clicks), clicks, raw - len(clicks), {"source": str(p)})


# ---------------------------------------------------------------------------------------------- Amazon

_AMAZON_ITEMS, _AMAZON_INTER = ".item.json", ".inter.json"
_HTML_TAG = re.compile(r"<[A-Za-z/][^<>]{0,200}>")  # a whole tag: <br>, </p>, <li class="x">
_TAG_NAMES = r"(?:li|ul|ol|br|p|div|span|b|i|u|em|strong|hr|h[1-6])"
_STRAY_TAG = re.compile(rf"</?{_TAG_NAMES}(?=[^A-Za-z0-9>])\.?", re.I)  # an unclosed one: "<li.Fits"
# the tail of a tag cut off at the start ("P>proto-pasta", "Style=color: red>Upgrade") or a stray "/b>"
_CUT_TAG = re.compile(rf"^(?:/?{_TAG_NAMES}>|[A-Za-z-]+=[^<>]{{0,200}}>)|(?<![\w<])/{_TAG_NAMES}>", re.I)
_PATH_SEP = re.compile(r",(?!\s)")  # "A,B & C,D, E" -> A | B & C | D, E (a name's own comma has a space)
_NO_BRAND = {"", "unknown", "generic", "n/a", "na", "none", "null"}


def _clean_text(value) -> str:
    """Plain text from a product field: HTML entities decoded, tags removed, whitespace collapsed."""
    s = html.unescape(str(value or ""))
    s = _HTML_TAG.sub(" ", s)
    s = _STRAY_TAG.sub(" ", s)
    s = _CUT_TAG.sub("", s.strip())
    return " ".join(s.split())


def _clean_tag(value, max_chars: int) -> str:
    """A hashtag: clean text without the characters the hashtag output format splits on (`,` `;` `#`) or
    quotes; empty when longer than `max_chars` (a sentence that leaked into a category path is no tag)."""
    t = " ".join(re.sub(r"[,;#\"]", " ", _clean_text(value)).split()).strip(" .:'`")
    return t if len(t) <= max_chars else ""


def amazon_files(path: str | Path, prefix: str | None = None) -> list[tuple[str, Path, Path]]:
    """`(prefix, items file, interactions file)` for every `<prefix>.item.json` with a matching
    `<prefix>.inter.json` in the directory (sorted by prefix); only `prefix` when given."""
    p = Path(path)
    out = []
    for items in sorted(p.glob("*" + _AMAZON_ITEMS)):
        pre = items.name[: -len(_AMAZON_ITEMS)]
        inter = p / (pre + _AMAZON_INTER)
        if pre and inter.is_file() and (prefix is None or pre == prefix):
            out.append((pre, items, inter))
    return out


def load_amazon(path: str | Path, *, prefix: str | None = None, step_seconds: float = 86400.0,
                max_tag_chars: int = 60) -> Dataset:
    """Amazon review sequences: `<P>.item.json` + `<P>.inter.json` (e.g. Scientific, Beauty; any prefix).

    `<P>.item.json`: object keyed by item index -> {title, description, brand, categories}, `categories`
    a comma-separated path ("Industrial & Scientific,Test, Measure & Inspect,Electrical Testing,..."; a
    comma followed by a space belongs to a name). `<P>.inter.json`: object keyed by user index -> that
    user's item indices in chronological order (no timestamps).

    Notes: id = the item index (string); title -> title; description -> content (HTML entities decoded,
    tags removed); the path's second element -> category ("" when the path has none); hashtags = the
    deeper path elements, then the brand (placeholder brands such as "Unknown" / "Generic" skipped),
    cleaned for the hashtag format (no `,` `;` `#`), de-duplicated case-insensitively; topic empty.
    Items with neither title nor description are no notes (their clicks are dropped and counted).

    Clicks: one per (user, item) (a repeat keeps the first position), at `position * step_seconds`
    (default one day per step): each user's order is kept, users are aligned at their first review, so
    the time split cuts every sequence at the same position and `--window-days W` pairs items at most W
    positions apart. published_at: the item's first click (= its earliest position over all users).
    Several `<P>` pairs in one directory: pass `prefix`.
    """
    p = Path(path)
    found = amazon_files(p, prefix)
    if not found:
        pre = prefix or "*"
        want = f"{pre}{_AMAZON_ITEMS} + {pre}{_AMAZON_INTER}"
        raise ValueError(f"{p}: no Amazon layout ({want})")
    if len(found) > 1:
        raise ValueError(f"{p}: several Amazon datasets ({', '.join(f[0] for f in found)}): pass prefix=")
    pre, items_file, inter_file = found[0]
    with open(items_file, encoding="utf-8") as f:
        items = json.load(f)
    with open(inter_file, encoding="utf-8") as f:
        inter = json.load(f)
    if not isinstance(items, dict) or not isinstance(inter, dict):
        raise ValueError(f"{p}: {items_file.name} and {inter_file.name} must each hold one JSON object")
    notes: dict[str, Note] = {}
    for key, d in items.items():
        d = d if isinstance(d, dict) else {}
        title, content = _clean_text(d.get("title")), _clean_text(d.get("description"))
        if not title and not content:
            continue
        cats = d.get("categories") or ""
        if isinstance(cats, list):  # a variant stores the path as a list (or a list of paths: the first)
            cats = cats[0] if cats and isinstance(cats[0], list) else cats
            raw_path = [str(x) for x in cats]
        else:
            raw_path = _PATH_SEP.split(str(cats))
        path_ = [" ".join(html.unescape(x).split()) for x in raw_path]
        category = path_[1] if len(path_) > 1 else ""
        tags: list[str] = []
        seen = {category.lower()} if category else set()
        brand = _clean_text(d.get("brand"))
        for t in [_clean_tag(x, max_tag_chars) for x in path_[2:]] + (
                [_clean_tag(brand, max_tag_chars)] if brand.lower() not in _NO_BRAND else []):
            if t and t.lower() not in seen:
                seen.add(t.lower())
                tags.append(t)
        nid = str(key)
        notes[nid] = Note(nid, title, "", content, category, tuple(tags))
    raw = 0
    clicks: list[Click] = []
    for user, seq in inter.items():
        done: set[str] = set()
        for pos, item in enumerate(seq or []):
            nid = str(item)
            if nid in done:
                continue
            done.add(nid)
            raw += 1
            if nid in notes:
                clicks.append(Click(str(user), nid, pos * float(step_seconds)))
    clicks.sort(key=lambda c: (c.timestamp, c.user, c.note))
    return Dataset("amazon", _with_published(notes, clicks), clicks, raw - len(clicks),
                   {"source": str(p), "domain": pre, "time": "position", "step_seconds": float(step_seconds)})


def write_generic(ds: Dataset, path: str | Path) -> Path:
    """Write a Dataset in the generic format (round-trips through `load_generic`)."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    with open(p / "notes.jsonl", "w", encoding="utf-8") as f:
        for n in ds.notes.values():
            f.write(json.dumps({"id": n.id, "title": n.title, "topic": n.topic, "content": n.content,
                                "category": n.category, "hashtags": list(n.hashtags),
                                "published_at": n.published_at}, ensure_ascii=False) + "\n")
    with open(p / "clicks.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user", "note", "timestamp"])
        for c in ds.clicks:
            w.writerow([c.user, c.note, repr(c.timestamp)])
    return p
