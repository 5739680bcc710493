"""The worker on the production Milvus path (issue 10): a real Milvus 2.3.5 server, the real tiny model.
Upserts, tombstone deletes, hostile ids and `similar` behave as on milvus-lite, with the store's writes in
the worker's process and in a writer process of their own (`write_process`), and freshness is measured as
a reader sees it (the visibility probe at the readers' consistency level, a client of its own)."""
from __future__ import annotations

import uuid

import pytest

from tests.test_worker_e2e import settings_for, topics  # noqa: F401 - fixture
from tests.worker_support import encoder, tiny_dir  # noqa: F401 - fixtures
from tests.worker_support import AppThread, note_doc, produce_notes, produce_raw, wait_committed_to_end
from worker.app import WorkerApp
from worker.sinks.milvus import MilvusStore

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("write_process", [False, True], ids=["in-process", "writer-process"])
def test_worker_on_a_milvus_server(kafka_bootstrap, topics, milvus_server, encoder, write_process):
    alias = f"notes_{uuid.uuid4().hex[:8]}"
    s = settings_for(kafka_bootstrap, topics, milvus_server, model={"generate": "category"},
                     milvus={"collection": alias, "read_consistency": "Bounded", "write_process": write_process})
    hostile = ["q'uote", "back\\slash", "zz'] or note_id not in ['n00000", "rtl\u202eid"]
    docs = [note_doc(i) for i in range(40)] + [{**note_doc(100 + i), "note_id": h} for i, h in enumerate(hostile)]
    ids = produce_notes(kafka_bootstrap, topics["notes"], docs)
    app = WorkerApp(s, encoder=encoder)
    t = AppThread(app)
    store = MilvusStore(milvus_server, alias=alias)  # a reader of its own
    try:
        wait_committed_to_end(kafka_bootstrap, s.kafka.group_id, topics["notes"], timeout=120, alive=t.alive)
        produce_raw(kafka_bootstrap, topics["notes"], [(b"q'uote", None), (b"zz'] or note_id not in ['n00001", None)])
        wait_committed_to_end(kafka_bootstrap, s.kafka.group_id, topics["notes"], timeout=60, alive=t.alive)
        assert app.healthy()[0] and app.ready()[0]
        assert (app.store.writer is not None) == write_process
        got = store.all_ids()
        assert len(got) == len(set(got)) and set(got) == set(ids) - {"q'uote"}
        ans = store.similar("back\\slash", 3)
        assert ans["note"]["note_id"] == "back\\slash" and len(ans["neighbours"]) == 3
        assert ans["note"]["category"] is None or isinstance(ans["note"]["category"], str)
        assert app.metrics.visible._sum.get() > 0 and app.probe is not None
        assert t.stop() == 0
    finally:
        if t.alive():
            t.stop()
        phys = store.resolve()
        with store.locked() as c:
            c.drop_alias(alias)
            if phys:
                c.drop_collection(phys)
        store.close()
