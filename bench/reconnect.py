"""How soon a Milvus client succeeds again after an outage: gRPC's default reconnect backoff beside the one
every client of the worker uses (`worker.sinks.milvus.GRPC_OPTIONS`), interleaved.

    python bench/reconnect.py [--milvus-uri http://127.0.0.1:19530] [--outages 10,45,90] [--probe-s 0.5]

An outage is a TCP relay in front of the server (bench/relay.py) cut, then resumed on the same port: the
server itself keeps running. During the outage the client tries a call (`list_collections`, 2 s timeout)
every `--probe-s` seconds, as the sink's retries and the readiness probe do. Reported per outage length and
option set: `lag_s`, the seconds from the relay being back to the first successful call. gRPC reconnects on
a backoff that grows to 120 s by default; the sink's own retry waits at most NOTELLM_RETRY__MAX_WAIT_S (5 s).
Needs a Milvus server (`scripts/milvus start`). Prints one JSON document.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.relay import Relay  # noqa: E402


def lag_after_outage(uri: str, outage_s: float, grpc_options: dict | None, probe_s: float = 0.5) -> float:
    """Seconds from the end of an outage of `outage_s` to the first successful call of a client of `uri`
    (through a relay) created with `grpc_options` (None: gRPC's defaults)."""
    from pymilvus import MilvusClient

    relay = Relay(uri)
    kw: dict = {"uri": relay.uri}
    if grpc_options is not None:
        kw["grpc_options"] = dict(grpc_options)
    client = MilvusClient(**kw)
    try:
        client.list_collections(timeout=5)
        resume = relay.cut()
        down = time.monotonic()
        while time.monotonic() - down < outage_s:
            try:
                client.list_collections(timeout=2)
            except Exception:  # noqa: BLE001 - the outage
                pass
            time.sleep(probe_s)
        resume()
        back = time.monotonic()
        while True:
            try:
                client.list_collections(timeout=2)
                return time.monotonic() - back
            except Exception:  # noqa: BLE001 - not reconnected yet
                time.sleep(0.1)
    finally:
        client.close()
        relay.close()


def main(argv: list[str] | None = None) -> int:
    from worker.sinks.milvus import GRPC_OPTIONS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--milvus-uri", default="http://127.0.0.1:19530")
    ap.add_argument("--outages", default="10,45,90", help="outage lengths in seconds, comma-separated")
    ap.add_argument("--probe-s", type=float, default=0.5, help="seconds between calls during the outage")
    a = ap.parse_args(argv)
    outages = [float(x) for x in a.outages.split(",") if x]
    if not outages or min(outages) <= 0 or a.probe_s <= 0:
        raise SystemExit("--outages must be positive seconds and --probe-s > 0")
    rows = []
    for outage in outages:
        row: dict = {"outage_s": outage}
        for name, opts in (("grpc_default", None), ("worker", GRPC_OPTIONS)):
            row[f"{name}_lag_s"] = round(lag_after_outage(a.milvus_uri, outage, opts, a.probe_s), 2)
            print(f"[reconnect] outage {outage:g} s, {name}: back after {row[f'{name}_lag_s']} s",
                  file=sys.stderr, flush=True)
        rows.append(row)
    print(json.dumps({"bench": "reconnect", "milvus_uri": a.milvus_uri, "probe_s": a.probe_s,
                      "worker_grpc_options": GRPC_OPTIONS, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
