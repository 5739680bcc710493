"""`notellm similar NOTE_ID [-k 10]`: the nearest notes of a stored note.

milvus-lite locks its database to one process, so while a worker holds the db this asks the worker's
HTTP port (`GET /similar/{note_id}?k=`); when no worker answers it opens Milvus directly. With a Milvus
server URI it asks the server directly (unless `--url` names a worker)."""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("note_id")
    p.add_argument("-k", type=int, default=10, help="number of neighbours (default 10)")
    p.add_argument("--url", help="worker HTTP base URL (default http://127.0.0.1:$NOTELLM_HTTP__PORT, 8088)")
    p.add_argument("--milvus-uri", help="Milvus uri when no worker answers (default: NOTELLM_MILVUS__URI)")
    p.add_argument("--collection", help="collection alias (default: NOTELLM_MILVUS__COLLECTION)")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")


def via_http(base: str, note_id: str, k: int, timeout: float = 10.0) -> dict | None:
    """The worker's answer; None when no worker listens there. Raises KeyError for an unknown note."""
    url = f"{base.rstrip('/')}/similar/{urllib.parse.quote(note_id, safe='')}?k={k}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise KeyError(note_id) from None
        raise RuntimeError(f"worker answered {e.code}: {e.read()[:300]!r}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def via_milvus(m, note_id: str, k: int) -> dict:
    """The answer read from the Milvus `m` (the worker's `MilvusSettings`: address, credentials, TLS)."""
    from worker.sinks.milvus import MilvusStore, connection_of

    store = MilvusStore(m.uri, **connection_of(m), alias=m.collection, timeout_s=m.timeout_s, search_ef=m.search_ef)
    try:
        return store.similar(note_id, k)
    finally:
        store.close()


def render(ans: dict) -> str:
    q = ans["note"]
    lines = [f"note {q['note_id']}: {q.get('title') or ''}",
             f"  category: {q.get('category')}  hashtags: {' '.join(q.get('hashtags') or [])}  "
             f"model: {q.get('model_version')}",
             f"{'rank':>4}  {'score':>6}  {'note_id':<24} {'category':<16} title"]
    for i, h in enumerate(ans["neighbours"], 1):
        lines.append(f"{i:>4}  {h['score']:6.3f}  {h['note_id']:<24} {str(h.get('category') or '-')[:16]:<16} "
                     f"{(h.get('title') or '')[:70]}")
    return "\n".join(lines)


def run(args) -> int:
    from worker.config import load_settings

    s = load_settings({"milvus": {"uri": args.milvus_uri, "collection": args.collection}})
    base = args.url or f"http://127.0.0.1:{s.http.port or 8088}"
    try:
        # milvus-lite: a running worker holds the db, so ask it first. A Milvus server: ask it directly
        # (any number of readers), unless a worker URL was given explicitly.
        ans = via_http(base, args.note_id, args.k) if (s.milvus.is_lite or args.url) else None
        if ans is None:
            ans = via_milvus(s.milvus, args.note_id, args.k)
    except KeyError:
        print(f"notellm similar: note {args.note_id!r} is not in the collection", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001
        print(f"notellm similar: {e}", file=sys.stderr)
        return 2
    print(json.dumps(ans, ensure_ascii=False, indent=2) if args.json else render(ans))
    return 0
