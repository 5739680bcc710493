#!/usr/bin/env python3
"""`scripts/image test`: run the worker image the way the Kubernetes manifests run it and check what a
platform engineer would check before shipping it.

The container runs as uid 10001 with a read-only root filesystem, every capability dropped, no privilege
escalation, /tmp a tmpfs, the model package mounted read-only at /models/notellm (copied there by the
init container of deploy/base/deployment.yaml from a model image built with deploy/model-image), `--network host`,
against the host's real Kafka broker and Milvus server (started with scripts/kafka and scripts/milvus if
they are not running). It checks:

1. the image's user, read-only root, and that nothing in the image can be written;
2. notes published to a fresh topic become searchable in Milvus (one row each) and tagged (one tags
   record each), /readyz, /similar/{id} and /notes/{id} answer;
3. SIGTERM while a second, ten times larger burst is in flight: the container exits 0 within the grace period, and every
   committed offset is covered by Milvus rows (a drain, not an abandon);
4. a second container resumes from the committed offsets: every note of both bursts is in Milvus exactly
   once, and the group's offsets reach the end of the topic;
5. --gpu: the image lists CUDAExecutionProvider and its CUDA/cuDNN libraries load (onnxruntime.preload_dlls);
   the run itself uses the CPU fallback when the host has no GPU.

Prints one JSON summary; exit 1 on the first failed check (the container's log tail goes to stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.worker_support import (  # noqa: E402  (the integration tests' real-broker helpers)
    committed, free_port, high_watermarks, note_doc, produce_notes, tag_ids, tiny_model_dir, wait_until)

GRACE_S = 90        # deploy/: terminationGracePeriodSeconds (drain 60 s + closing the clients)
DRAIN_S = 60


class Failed(Exception):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Failed(what)
    print(f"image test: ok: {what}", file=sys.stderr)


def sh(*cmd: str, check_rc: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check_rc and p.returncode != 0:
        raise Failed(f"{' '.join(cmd[:4])} ... exited {p.returncode}: {p.stderr[-2000:]}")
    return p


def http(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def start_services() -> tuple[str, str]:
    kafka = sh(str(REPO / "scripts/kafka"), "start").stdout.strip().splitlines()[-1]
    milvus = sh(str(REPO / "scripts/milvus"), "start", timeout=600).stdout.strip().splitlines()[-1]
    return kafka, milvus


def model_volume(docker: str, given: str | None, base: str) -> tuple[Path, str]:
    """The model package as the pods get it (deploy/base/deployment.yaml): a model image built from the
    package with deploy/model-image/Dockerfile, copied by the init container's own command into an empty
    directory (the pod's emptyDir), which the worker then mounts read-only. Returns (dir, model image)."""
    import yaml

    src = Path(given) if given else tiny_model_dir()
    if not (src / "notellm.json").exists():
        raise Failed(f"{src} is not a model package (no notellm.json): run `notellm export` first")
    version = json.loads((src / "notellm.json").read_text())["model_version"]
    model_image = f"notellm-model:{version}"
    sh(docker, "build", "-q", "-f", str(REPO / "deploy/model-image/Dockerfile"), "--build-arg", f"BUSYBOX={base}",
       "-t", model_image, str(src), timeout=600)
    pod = yaml.safe_load((REPO / "deploy/base/deployment.yaml").read_text())["spec"]["template"]["spec"]
    init = next(c for c in pod["initContainers"] if c["name"] == "model")
    mount = next(m["mountPath"] for m in init["volumeMounts"] if m["name"] == "model")
    empty_dir = Path(tempfile.mkdtemp(prefix="notellm-image-model-"))
    empty_dir.chmod(0o1777)  # an emptyDir is writable by the pod's fsGroup
    p = sh(docker, "run", "--rm", "--read-only", "--user", "10001:10001", "--cap-drop", "ALL",
           "--security-opt", "no-new-privileges", "-v", f"{empty_dir}:{mount}", "--entrypoint", init["command"][0],
           model_image, *init["command"][1:], *init["args"])
    check((empty_dir / "notellm.json").exists(), f"the init container copied the model package out of {model_image} "
          f"({p.stdout.strip()[:120]})")
    return empty_dir, model_image


class Container:
    def __init__(self, docker: str, image: str, name: str, env: dict[str, str], model: Path) -> None:
        self.docker, self.name = docker, name
        cmd = [docker, "run", "-d", "--name", name, "--network", "host",
               "--read-only", "--tmpfs", "/tmp:rw,size=256m,mode=1777",
               "--user", "10001:10001", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
               "--stop-timeout", str(GRACE_S),
               "-v", f"{model}:/models/notellm:ro"]
        for k, v in env.items():
            cmd += ["-e", f"{k}={v}"]
        sh(*cmd, image, "worker", "run")

    def state(self) -> dict:
        return json.loads(sh(self.docker, "inspect", "-f", "{{json .State}}", self.name).stdout)

    def running(self) -> bool:
        return bool(self.state().get("Running"))

    def logs(self) -> str:
        p = sh(self.docker, "logs", self.name, check_rc=False)
        return p.stdout + p.stderr

    def stop(self) -> tuple[int, float]:
        t0 = time.monotonic()
        sh(self.docker, "stop", "-t", str(GRACE_S), self.name, timeout=GRACE_S + 30)
        return int(self.state()["ExitCode"]), time.monotonic() - t0

    def remove(self) -> None:
        sh(self.docker, "rm", "-f", self.name, check_rc=False)


def milvus_ids(uri: str, collection: str, ids: list[str]) -> list[str]:
    from pymilvus import MilvusClient

    c = MilvusClient(uri=uri)
    try:
        if not c.has_collection(collection):
            return []
        out: list[str] = []
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            rows = c.query(collection, ids=chunk, output_fields=["note_id"], consistency_level="Strong")
            out += [r["note_id"] for r in rows]
        return out
    finally:
        c.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docker", default="/usr/bin/docker")
    ap.add_argument("--image", required=True)
    ap.add_argument("--gpu", action="store_true", help="the image is the onnxruntime-gpu variant")
    ap.add_argument("--model", help="model package dir (default: the tiny test model, exported once)")
    ap.add_argument("--base", default="notellm-base:bookworm", help="base of the model image (deploy/model-image)")
    ap.add_argument("--notes", type=int, default=120, help="notes in the first burst (the second has 10x)")
    args = ap.parse_args()

    summary: dict = {"image": args.image}
    run_id = uuid.uuid4().hex[:8]
    docker = args.docker
    containers: list[Container] = []
    kafka, milvus_uri = start_services()
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": kafka})
    topics = {k: f"img-{k}-{run_id}" for k in ("notes", "tags", "dlq")}
    collection = f"imgtest_{run_id}"
    group = f"img-{run_id}"
    model: Path | None = None
    model_image = None
    try:
        fs = admin.create_topics([NewTopic(t, num_partitions=3 if k == "notes" else 1, replication_factor=1)
                                  for k, t in topics.items()])
        for f in fs.values():
            f.result(30)

        # 1. the image itself
        inspect = json.loads(sh(docker, "image", "inspect", args.image).stdout)[0]
        summary["image_mb"] = round(inspect["Size"] / 1e6, 1)
        check(inspect["Config"]["User"] == "10001:10001", "the image runs as uid 10001 (non-root)")
        probe = sh(docker, "run", "--rm", "--read-only", "--entrypoint", "sh", args.image, "-c",
                   "id -u; touch /opt/venv/x 2>/dev/null && echo writable || echo read-only; "
                   "python -c 'import importlib.util as u; print(u.find_spec(\"torch\") is not None)'",
                   check_rc=False)
        lines = probe.stdout.split()
        check(lines[:1] == ["10001"], f"the container's process is uid 10001 (got {lines[:1]})")
        check(lines[1:2] == ["read-only"], "the root filesystem is not writable under --read-only")
        check(lines[2:3] == ["False"], "no torch in the image")
        providers = json.loads(sh(docker, "run", "--rm", "--entrypoint", "python", args.image, "-c",
                                  "import json, onnxruntime as o; print(json.dumps(o.get_available_providers()))"
                                  ).stdout)
        summary["providers"] = providers
        if args.gpu:
            check("CUDAExecutionProvider" in providers, f"the GPU image lists CUDAExecutionProvider ({providers})")
            p = sh(docker, "run", "--rm", "--entrypoint", "python", args.image, "-c",
                   "import onnxruntime as o; o.preload_dlls(cuda=True, cudnn=True, msvc=False); "
                   "import re; maps = open('/proc/self/maps').read(); "
                   "print(sorted({m for m in re.findall(r'(lib(?:cudart|cublas|cudnn)[^/\\s]*)', maps)}))")
            summary["cuda_libraries_loaded"] = p.stdout.strip()
            check("libcudart" in p.stdout and "libcudnn" in p.stdout, f"CUDA and cuDNN libraries load ({p.stdout.strip()})")
        else:
            check("CUDAExecutionProvider" not in providers, "the CPU image has the CPU runtime only")

        # 2. the model package through the init container's recipe; notes in -> searchable and tagged
        model, model_image = model_volume(docker, args.model, args.base)
        port = free_port()
        env = {
            "NOTELLM_KAFKA__BOOTSTRAP_SERVERS": kafka,
            "NOTELLM_KAFKA__TOPIC_NOTES": topics["notes"], "NOTELLM_KAFKA__TOPIC_TAGS": topics["tags"],
            "NOTELLM_KAFKA__TOPIC_DLQ": topics["dlq"], "NOTELLM_KAFKA__GROUP_ID": group,
            "NOTELLM_MILVUS__URI": milvus_uri, "NOTELLM_MILVUS__COLLECTION": collection,
            "NOTELLM_HTTP__HOST": "127.0.0.1", "NOTELLM_HTTP__PORT": str(port),
            "NOTELLM_MODEL__GENERATE": "category", "NOTELLM_MODEL__INTRA_OP_THREADS": "1",
            "NOTELLM_BATCH__CALIBRATION_BUDGET_S": "5",
            "NOTELLM_LIFECYCLE__DRAIN_S": str(DRAIN_S),
        }
        t0 = time.monotonic()
        c1 = Container(docker, args.image, f"notellm-image-test-{run_id}-1", env, model)
        containers.append(c1)
        wait_until(lambda: http(port, "/readyz")[0] == 200 or not c1.running(), "/readyz", timeout=180, interval=0.5)
        check(c1.running(), "the worker starts and is ready")
        summary["ready_s"] = round(time.monotonic() - t0, 1)
        first = produce_notes(kafka, topics["notes"], [note_doc(i, prefix=f"img{run_id}-") for i in range(args.notes)])
        t0 = time.monotonic()
        wait_until(lambda: len(milvus_ids(milvus_uri, collection, first)) == len(first) or not c1.running(),
                   "every note in Milvus", timeout=180, interval=0.5)
        check(len(milvus_ids(milvus_uri, collection, first)) == len(first), f"{len(first)} notes searchable in Milvus")
        summary["first_burst_indexed_s"] = round(time.monotonic() - t0, 1)
        wait_until(lambda: set(tag_ids(kafka, topics["tags"])) >= set(first), "tags for every note", timeout=60, interval=0.5)
        check(True, f"{len(first)} notes tagged on {topics['tags']}")
        status, body = http(port, f"/similar/{first[0]}?k=5")
        check(status == 200 and len(json.loads(body)["neighbours"]) == 5, f"/similar answers 5 neighbours (HTTP {status})")
        status, body = http(port, f"/notes/{first[1]}")
        check(status == 200 and first[1] in body, f"/notes/{{id}} finds an indexed note (HTTP {status})")

        # 3. SIGTERM with a burst in flight: drain, exit 0 within the grace period, commits covered
        # A backlog several seconds deep, so the stop lands with batches in flight.
        second = produce_notes(kafka, topics["notes"],
                               [note_doc(i, prefix=f"img{run_id}-") for i in range(args.notes, 11 * args.notes)])
        wait_until(lambda: len(milvus_ids(milvus_uri, collection, second[:50])) > 0, "the second burst started",
                   timeout=60, interval=0.05)
        code, took = c1.stop()
        summary["sigterm_exit"], summary["sigterm_s"] = code, round(took, 1)
        logs1 = c1.logs()
        check(code == 0, f"SIGTERM: exit code 0 (got {code})")
        check(took < GRACE_S, f"SIGTERM: stopped in {took:.1f} s < grace period {GRACE_S} s")
        check("Traceback" not in logs1, "no traceback in the container's log")
        bad = [ln for ln in logs1.splitlines() if ln.strip() and not ln.lstrip().startswith("{")]
        check(not bad, f"every log line is JSON ({bad[:3]})")
        hw = high_watermarks(kafka, topics["notes"])
        done = committed(kafka, group, topics["notes"], hw)
        summary["committed_after_sigterm"] = sum(max(o, 0) for o in done.values())
        indexed = set(milvus_ids(milvus_uri, collection, first + second))
        check(summary["committed_after_sigterm"] <= len(indexed),
              f"every committed offset is in Milvus ({summary['committed_after_sigterm']} committed, {len(indexed)} rows)")

        # 4. a new container resumes: every note exactly once, offsets at the end
        c2 = Container(docker, args.image, f"notellm-image-test-{run_id}-2", env, model)
        containers.append(c2)
        everything = first + second
        wait_until(lambda: len(milvus_ids(milvus_uri, collection, everything)) == len(everything) or not c2.running(),
                   "both bursts in Milvus", timeout=240, interval=0.5)
        rows = milvus_ids(milvus_uri, collection, everything)
        check(sorted(rows) == sorted(everything), f"all {len(everything)} notes in Milvus exactly once after the restart")
        wait_until(lambda: all(committed(kafka, group, topics["notes"], hw).get(p, -1) >= o for p, o in hw.items() if o),
                   "offsets at the end of the topic", timeout=60, interval=0.5)
        code2, took2 = c2.stop()
        check(code2 == 0, f"second container: SIGTERM exit 0 in {took2:.1f} s")
        summary["result"] = "passed"
        print(json.dumps(summary, indent=2))
        return 0
    except (Failed, AssertionError) as e:
        print(f"image test: FAILED: {e}", file=sys.stderr)
        for c in containers:
            print(f"--- {c.name} log (tail) ---\n{c.logs()[-6000:]}", file=sys.stderr)
        summary["result"] = f"failed: {e}"
        print(json.dumps(summary, indent=2))
        return 1
    finally:
        for c in containers:
            c.remove()
        admin.delete_topics(list(topics.values()))
        try:
            from pymilvus import MilvusClient

            mc = MilvusClient(uri=milvus_uri)
            for name in mc.list_collections():
                aliases = mc.describe_collection(name).get("aliases") or []
                if name.startswith(collection) or collection in aliases:
                    for a in aliases:
                        mc.drop_alias(a)
                    mc.drop_collection(name)
            mc.close()
        except Exception as e:  # cleanup only: the verdict above stands
            print(f"image test: could not drop {collection}: {e}", file=sys.stderr)
        if model is not None:
            shutil.rmtree(model, ignore_errors=True)
        if model_image:
            sh(docker, "rmi", model_image, check_rc=False)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
