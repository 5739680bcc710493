"""The Kubernetes manifests (deploy/): rendered and validated offline by scripts/validate-manifests
(kustomize -> Kubernetes schemas, strict; CRD schemas; PromQL; checkov), then structural facts of the
rendered YAML of every overlay, the ConfigMap against worker.config.Settings, and every metric that
the alerts and the dashboard name against what the worker exports.

The first run installs the validators into .local/venv-validate and .local/venv-checkov (~2 min);
afterwards the module takes ~20 s."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "validate-manifests"
VENV_PY = REPO / ".local" / "venv-validate" / "bin" / "python"
DASHBOARD = REPO / "deploy" / "components" / "monitoring" / "grafana-dashboard.json"
WORKER_OVERLAYS = ("cpu", "gpu", "cpu-model-pvc", "gpu-secured", "gpu-secured-mtls")
JOB_OVERLAYS = ("cpu-backfill", "gpu-backfill", "gpu-secured-backfill", "gpu-secured-mtls-backfill")
GPU_OVERLAYS = ("gpu", "gpu-backfill", "gpu-secured", "gpu-secured-backfill", "gpu-secured-mtls",
                "gpu-secured-mtls-backfill")
MTLS_OVERLAYS = ("gpu-secured-mtls", "gpu-secured-mtls-backfill")  # ... and mutual TLS to Milvus
SECURED_OVERLAYS = ("gpu-secured", "gpu-secured-backfill", *MTLS_OVERLAYS)  # Kafka over SASL_SSL, Milvus over TLS
# librdkafka's sasl.mechanism -> the name KEDA's kafka scaler gives it (its `sasl` parameter)
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512",
             "GSSAPI": "gssapi", "OAUTHBEARER": "oauthbearer"}
CLOSE_MARGIN_S = 15          # grace period >= drain + this (closing the Kafka/Milvus clients)
PROMETHEUS_SERIES = {"up"}   # made by Prometheus for every target, not by the worker

pytestmark = pytest.mark.timeout(1200)


def _run(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=1100, **kw)


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    out = tmp_path_factory.mktemp("manifests")
    summary = out / "summary.json"
    p = _run([SCRIPT, "--out", out, "--json", summary], cwd=REPO)
    return {"rc": p.returncode, "log": p.stdout + p.stderr, "out": out,
            "summary": json.loads(summary.read_text()) if summary.exists() else None}


@pytest.fixture(scope="module")
def rendered(validated) -> dict[str, list[dict]]:
    files = {f.stem: f for f in validated["out"].glob("*.yaml")}
    assert set(WORKER_OVERLAYS + JOB_OVERLAYS) <= set(files), f"overlays rendered: {sorted(files)}"
    return {name: [d for d in yaml.safe_load_all(f.read_text()) if d] for name, f in files.items()}


def one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def workloads(docs):
    return [d for d in docs if d["kind"] in ("Deployment", "Job")]


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are used here"
    ml = selector.get("matchLabels") or {}
    return bool(ml) and all(labels.get(k) == v for k, v in ml.items())


def base_configmap() -> dict:
    return yaml.safe_load((REPO / "deploy" / "base" / "configmap.yaml").read_text())["data"]


# ---------------------------------------------------------------------------------------- the validator
def test_validate_manifests_passes(validated):
    assert validated["rc"] == 0, validated["log"][-6000:]
    s = validated["summary"]
    assert s["errors"] == []
    assert s["kubernetes_version"] == "1.30"
    kinds = s["kinds"]
    for kind in ("Deployment", "Job", "Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy",
                 "ServiceAccount", "ScaledObject", "ServiceMonitor", "PrometheusRule", "TriggerAuthentication"):
        assert kinds.get(kind), f"no {kind} rendered"
    # every document went through a schema: the built-in ones against Kubernetes, the CRDs against deploy/schemas
    assert s["kubernetes_schema_ok"] + s["crd_schema_ok"] == s["documents"]
    assert s["crd_schema_ok"] == (kinds["ScaledObject"] + kinds["ServiceMonitor"] + kinds["PrometheusRule"]
                                  + kinds["TriggerAuthentication"])
    assert s["promql_parsed"] > 20
    ck = s["checkov"]
    assert ck["failed"] == 0 and ck["parsing_errors"] == 0 and ck["passed"] > 100, ck["failed_checks"]
    for cid, v in ck["skipped_checks"].items():
        assert all(len(r) > 30 for r in v["reasons"]), f"{cid}: a skip needs a real reason: {v['reasons']}"


@pytest.fixture()
def repo_copy(tmp_path):
    """deploy/ and the script in a scratch tree sharing the installed validators (.local/venv-*)."""
    (tmp_path / "scripts").mkdir()
    shutil.copy2(SCRIPT, tmp_path / "scripts" / SCRIPT.name)
    shutil.copytree(REPO / "deploy", tmp_path / "deploy")
    (tmp_path / ".local").mkdir()
    for v in ("venv-validate", "venv-checkov"):
        (tmp_path / ".local" / v).symlink_to(REPO / ".local" / v)
    return tmp_path


def test_validator_rejects_an_unknown_field_a_bad_crd_field_and_bad_promql(validated, repo_copy):
    assert validated["rc"] == 0  # the venvs exist
    dep = repo_copy / "deploy" / "base" / "deployment.yaml"
    dep.write_text(dep.read_text().replace("      enableServiceLinks: false\n",
                                           "      enableServiceLinks: false\n      terminationGracePeriod: 90\n"))
    so = repo_copy / "deploy" / "components" / "keda" / "scaledobject.yaml"
    so.write_text(so.read_text().replace("lagThreshold:", "lagTreshold:"))
    pr = repo_copy / "deploy" / "components" / "monitoring" / "prometheusrule.yaml"
    pr.write_text(pr.read_text().replace("absent(up{", "absent(up{{"))
    ta = repo_copy / "deploy" / "components" / "keda-kafka-sasl-ssl" / "triggerauthentication.yaml"
    ta.write_text(ta.read_text().replace("parameter: password", "parameter: pasword"))
    p = _run([repo_copy / "scripts" / SCRIPT.name, "--no-checkov", "--out", repo_copy / "out"], cwd=repo_copy)
    log = p.stdout + p.stderr
    assert p.returncode != 0
    assert "'terminationGracePeriod' was unexpected" in log
    assert "lagTreshold" in log
    assert "NotellmWorkerDown: PromQL does not parse" in log
    assert "'pasword' is not one of" in log


def test_validator_fails_on_a_checkov_finding_without_a_skip(validated, repo_copy):
    assert validated["rc"] == 0
    dep = repo_copy / "deploy" / "base" / "deployment.yaml"
    text = dep.read_text()
    assert text.count("allowPrivilegeEscalation: false") == 2
    dep.write_text(text.replace("allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true"))
    p = _run([repo_copy / "scripts" / SCRIPT.name, "--out", repo_copy / "out"], cwd=repo_copy)
    assert p.returncode != 0
    assert "FAIL checkov CKV_K8S_20" in p.stdout, p.stdout[-3000:]


# ---------------------------------------------------------------------------------- structural facts
def test_grace_period_covers_the_drain(rendered):
    for name, docs in rendered.items():
        data = one(docs, "ConfigMap", "notellm-worker")["data"] if name in WORKER_OVERLAYS else base_configmap()
        drain = float(data["NOTELLM_LIFECYCLE__DRAIN_S"])
        for w in workloads(docs):
            grace = w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            assert grace >= drain + CLOSE_MARGIN_S, f"{name} {w['kind']}: grace {grace} < drain {drain} + {CLOSE_MARGIN_S}"


def _containers(w):
    spec = w["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def test_gpu_overlays_request_one_gpu_and_tolerate_the_taint_cpu_overlays_do_not(rendered):
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    for name, docs in rendered.items():
        gpu = name in GPU_OVERLAYS
        for w in workloads(docs):
            spec = w["spec"]["template"]["spec"]
            main = spec["containers"][0]
            assert main["image"].endswith(f"notellm-worker:{version}-gpu" if gpu else f"notellm-worker:{version}"), name
            limits = main["resources"]["limits"]
            if gpu:
                assert limits.get("nvidia.com/gpu") == 1, name
                assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            else:
                assert not any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in _containers(w))
                assert "tolerations" not in spec, name
        device = "cuda" if gpu else "cpu"
        if name in WORKER_OVERLAYS:
            assert one(docs, "ConfigMap", "notellm-worker")["data"]["NOTELLM_MODEL__DEVICE"] == device
        else:
            env = {e["name"]: e.get("value") for e in one(docs, "Job")["spec"]["template"]["spec"]["containers"][0]["env"]}
            assert env["NOTELLM_MODEL__DEVICE"] == device


def test_security_context(rendered):
    for name, docs in rendered.items():
        for w in workloads(docs):
            spec = w["spec"]["template"]["spec"]
            psc = spec["securityContext"]
            assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001, name
            assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert spec["automountServiceAccountToken"] is False, name
            for c in _containers(w):
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
                assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
                assert sc["capabilities"] == {"drop": ["ALL"]}, (name, c["name"])
                assert sc.get("privileged", False) is False
                assert sc.get("runAsUser", 10001) == 10001
            volumes = {v["name"]: v for v in spec["volumes"]}
            mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]["name"]], name
            assert mounts["/models/notellm"]["readOnly"] is True, name
        for sa in (d for d in docs if d["kind"] == "ServiceAccount"):
            assert sa["automountServiceAccountToken"] is False


def test_model_package_recipes(rendered):
    for name, docs in rendered.items():
        for w in workloads(docs):
            spec = w["spec"]["template"]["spec"]
            model = next(v for v in spec["volumes"] if v["name"] == "model")
            if name == "cpu-model-pvc":
                assert model["persistentVolumeClaim"] == {"claimName": "notellm-model", "readOnly": True}
                assert "initContainers" not in spec
            else:
                assert "emptyDir" in model, name
                (init,) = spec["initContainers"]
                assert re.search(r"/notellm-model:sha256-[0-9a-f]{16}$", init["image"]), init["image"]
                assert {"name": "model", "mountPath": "/models/notellm"} == init["volumeMounts"][0]
                assert "notellm.json" in " ".join(init["args"]) and "tokenizer.json" in " ".join(init["args"])
        for name in WORKER_OVERLAYS:
            cm = one(rendered[name], "ConfigMap", "notellm-worker")["data"]
            assert cm["NOTELLM_MODEL__DIR"] == "/models/notellm"


def test_keda_scaledobject_owns_replicas_and_follows_the_configmap(rendered):
    for name in WORKER_OVERLAYS:
        docs = rendered[name]
        dep = one(docs, "Deployment", "notellm-worker")
        so = one(docs, "ScaledObject")
        cm = one(docs, "ConfigMap", "notellm-worker")["data"]
        assert "replicas" not in dep["spec"], "KEDA owns the replica count"
        assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "notellm-worker"}
        s = so["spec"]
        assert isinstance(s["maxReplicaCount"], int) and s["maxReplicaCount"] == 12   # the partition count
        assert 1 <= s["minReplicaCount"] <= s["maxReplicaCount"]
        (t,) = s["triggers"]
        assert t["type"] == "kafka"
        m = t["metadata"]
        assert m["allowIdleConsumers"] == "false"
        assert m["consumerGroup"] == cm["NOTELLM_KAFKA__GROUP_ID"]
        assert m["topic"] == cm["NOTELLM_KAFKA__TOPIC_NOTES"]
        assert m["bootstrapServers"] == cm["NOTELLM_KAFKA__BOOTSTRAP_SERVERS"]
        assert int(m["lagThreshold"]) >= 1
    assert one(rendered["gpu"], "ScaledObject")["spec"]["minReplicaCount"] == 1
    assert one(rendered["cpu"], "ScaledObject")["spec"]["minReplicaCount"] == 2


def test_pdb_service_and_servicemonitor_select_the_worker_pods_only(rendered):
    for name in WORKER_OVERLAYS:
        docs = rendered[name]
        pods = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
        job_pods = one(rendered["cpu-backfill"], "Job")["spec"]["template"]["metadata"]["labels"]
        pdb = one(docs, "PodDisruptionBudget")
        assert pdb["spec"]["maxUnavailable"] == 1
        assert selects(pdb["spec"]["selector"], pods) and not selects(pdb["spec"]["selector"], job_pods)
        svc = one(docs, "Service")
        assert selects({"matchLabels": svc["spec"]["selector"]}, pods)
        assert not selects({"matchLabels": svc["spec"]["selector"]}, job_pods)
        sm = one(docs, "ServiceMonitor")
        assert selects(sm["spec"]["selector"], svc["metadata"]["labels"])
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
        assert one(docs, "Deployment")["spec"]["selector"] == {"matchLabels": {"app.kubernetes.io/name": "notellm-worker"}}


def test_network_policies(rendered):
    for name, docs in rendered.items():
        kafka_port = 9093 if name in SECURED_OVERLAYS else 9092
        egress_ports = {(53, "UDP"), (53, "TCP"), (kafka_port, "TCP"), (19530, "TCP")}
        policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
        for w in workloads(docs):
            labels = w["spec"]["template"]["metadata"]["labels"]
            (np,) = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
            assert set(np["spec"]["policyTypes"]) == {"Ingress", "Egress"}, name
            assert {(p["port"], p["protocol"]) for r in np["spec"]["egress"] for p in r["ports"]} == egress_ports
            assert all(r.get("to") for r in np["spec"]["egress"]), "every egress rule names its peers"
            ingress = np["spec"].get("ingress", [])
            if w["kind"] == "Job":
                assert ingress == [], "the backfill serves nothing"
                continue
            cm = one(docs, "ConfigMap", "notellm-worker")["data"]
            (rule,) = ingress
            assert rule["ports"] == [{"protocol": "TCP", "port": int(cm["NOTELLM_HTTP__PORT"])}]
            assert [p["containerPort"] for p in w["spec"]["template"]["spec"]["containers"][0]["ports"]] == [8088]
            (peer,) = rule["from"]
            assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}


def test_secured_overlay_gives_the_worker_the_backfill_and_keda_one_set_of_credentials(rendered, monkeypatch):
    docs = rendered["gpu-secured"]
    cm = one(docs, "ConfigMap", "notellm-worker")["data"]
    assert cm["NOTELLM_KAFKA__SECURITY_PROTOCOL"] == "SASL_SSL"
    ca_path = cm["NOTELLM_KAFKA__SSL_CA_LOCATION"]
    kafka_port = int(cm["NOTELLM_KAFKA__BOOTSTRAP_SERVERS"].rsplit(":", 1)[1])
    ca_ref = _mounted_secret_file(rendered, ca_path)
    for name in SECURED_OVERLAYS:
        for w in workloads(rendered[name]):
            (np,) = [d for d in rendered[name] if d["kind"] == "NetworkPolicy"
                     and selects(d["spec"]["podSelector"], w["spec"]["template"]["metadata"]["labels"])]
            assert kafka_port in {p["port"] for r in np["spec"]["egress"] for p in r["ports"]}, name
    # KEDA's lag scaler: the same mechanism (in its own names), TLS, brokers, and the worker's own credentials
    so = one(docs, "ScaledObject", "notellm-worker")
    (t,) = so["spec"]["triggers"]
    m = t["metadata"]
    assert m["sasl"] == KEDA_SASL[cm["NOTELLM_KAFKA__SASL_MECHANISM"]] and m["tls"] == "enable"
    assert m["bootstrapServers"] == cm["NOTELLM_KAFKA__BOOTSTRAP_SERVERS"]
    ta = one(docs, "TriggerAuthentication", t["authenticationRef"]["name"])
    assert t["authenticationRef"].get("kind", "TriggerAuthentication") == "TriggerAuthentication"
    pod = one(docs, "Deployment", so["spec"]["scaleTargetRef"]["name"])["spec"]["template"]["spec"]
    worker = pod["containers"][0]
    visible = {**cm, **_container_env(worker)}  # what KEDA resolves: envFrom the ConfigMap, then env
    assert {e["parameter"]: (e["containerName"], e["name"]) for e in ta["spec"]["env"]} == {
        "username": (worker["name"], "NOTELLM_KAFKA__SASL_USERNAME"),
        "password": (worker["name"], "NOTELLM_KAFKA__SASL_PASSWORD")}
    assert all(e["name"] in visible for e in ta["spec"]["env"])
    assert [(r["parameter"], r["name"], r["key"]) for r in ta["spec"]["secretTargetRef"]] == [("ca", *ca_ref)]
    # the worker takes the settings as librdkafka properties
    s = _settings_from(monkeypatch, visible)
    conf = s.kafka.common_config()
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.mechanism"] == cm["NOTELLM_KAFKA__SASL_MECHANISM"]
    assert conf["sasl.username"] == cm["NOTELLM_KAFKA__SASL_USERNAME"] and conf["ssl.ca.location"] == ca_path
    assert conf["sasl.password"] == "secret-from-kafka-sasl-password"
    # Milvus over TLS: an https:// URI, the CA a read-only file in the worker and the Job, a MilvusTLS
    from worker.sinks.milvus import MilvusTLS

    assert s.milvus.uri.startswith("https://") and s.milvus.uri != base_configmap()["NOTELLM_MILVUS__URI"]
    assert MilvusTLS.from_settings(s.milvus) == MilvusTLS(ca_path=cm["NOTELLM_MILVUS__TLS_CA_PATH"])
    assert _mounted_secret_file(rendered, cm["NOTELLM_MILVUS__TLS_CA_PATH"]) == ("notellm-milvus-ca", "ca.crt")
    # the overlays without it stay plaintext, with no authentication on the scaler
    for name in set(WORKER_OVERLAYS) - set(SECURED_OVERLAYS):
        (t,) = one(rendered[name], "ScaledObject")["spec"]["triggers"]
        assert "authenticationRef" not in t and "sasl" not in t["metadata"], name
        data = one(rendered[name], "ConfigMap", "notellm-worker")["data"]
        assert "NOTELLM_KAFKA__SECURITY_PROTOCOL" not in data and "NOTELLM_MILVUS__TLS_CA_PATH" not in data, name
        assert data["NOTELLM_MILVUS__URI"].startswith("http://"), name


def test_mtls_overlay_gives_the_worker_and_the_backfill_one_client_pair_readable_by_the_pod_only(rendered,
                                                                                              monkeypatch):
    from worker.sinks.milvus import MilvusTLS

    cm = one(rendered["gpu-secured-mtls"], "ConfigMap", "notellm-worker")["data"]
    s = _settings_from(monkeypatch, {**cm, **_container_env(one(rendered["gpu-secured-mtls"], "Deployment")
                                                            ["spec"]["template"]["spec"]["containers"][0])})
    tls = MilvusTLS.from_settings(s.milvus)
    assert tls == MilvusTLS(ca_path=cm["NOTELLM_MILVUS__TLS_CA_PATH"],
                            client_cert_path=cm["NOTELLM_MILVUS__TLS_CLIENT_CERT_PATH"],
                            client_key_path=cm["NOTELLM_MILVUS__TLS_CLIENT_KEY_PATH"])
    assert s.milvus.uri.startswith("https://")
    # the pair: one Secret, group-readable (0440) by the pod's fsGroup, which is the worker's own group
    assert _mounted_secret_file(rendered, tls.client_cert_path, MTLS_OVERLAYS, 0o440) == (
        "notellm-milvus-client", "tls.crt")
    assert _mounted_secret_file(rendered, tls.client_key_path, MTLS_OVERLAYS, 0o440) == (
        "notellm-milvus-client", "tls.key")
    assert _mounted_secret_file(rendered, tls.ca_path, MTLS_OVERLAYS) == ("notellm-milvus-ca", "ca.crt")
    for name in MTLS_OVERLAYS:
        for w in workloads(rendered[name]):
            pod = w["spec"]["template"]["spec"]["securityContext"]
            assert pod["fsGroup"] == pod["runAsGroup"] and pod["runAsUser"] != 0, name
    # the other overlays present no client certificate
    for name in set(WORKER_OVERLAYS) - set(MTLS_OVERLAYS):
        data = one(rendered[name], "ConfigMap", "notellm-worker")["data"]
        assert not any(k.startswith("NOTELLM_MILVUS__TLS_CLIENT") for k in data), name
    for name in set(rendered) - set(MTLS_OVERLAYS):
        for w in workloads(rendered[name]):
            assert "milvus-client" not in {v["name"] for v in w["spec"]["template"]["spec"].get("volumes", [])}


def _mounted_secret_file(rendered, path: str, overlays=SECURED_OVERLAYS, mode: int = 0o444) -> tuple[str, str]:
    """The (Secret, key) that every workload of `overlays` mounts read-only with `mode` (default 0444, readable
    by everyone) at `path`."""
    refs = set()
    for name in overlays:
        for w in workloads(rendered[name]):
            spec = w["spec"]["template"]["spec"]
            (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
            assert mount["readOnly"] is True, name
            (vol,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
            (item,) = [i for i in vol["secret"]["items"] if i["path"] == path[len(mount["mountPath"]) + 1:]]
            assert vol["secret"]["defaultMode"] == mode, name  # octal, not YAML's decimal 444
            refs.add((vol["secret"]["secretName"], item["key"]))
    (ref,) = refs
    return ref


# ----------------------------------------------------------------------------- configuration keys
def _settings_from(monkeypatch, env: dict[str, str]):
    from worker.config import Settings

    for k in list(os.environ):
        if k.upper().startswith("NOTELLM_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return Settings()


def _container_env(c: dict) -> dict[str, str]:
    out = {}
    for e in c.get("env", []):
        if "value" in e:
            out[e["name"]] = e["value"]
        elif "secretKeyRef" in e["valueFrom"]:
            out[e["name"]] = "secret-from-" + e["valueFrom"]["secretKeyRef"]["key"]
        else:
            out[e["name"]] = "pod-name-0"
    return out


def test_configmap_and_env_keys_parse_with_the_worker_settings(rendered, monkeypatch):
    for name, docs in rendered.items():
        cm = one(docs, "ConfigMap", "notellm-worker")["data"] if name in WORKER_OVERLAYS else base_configmap()
        for w in workloads(docs):
            c = w["spec"]["template"]["spec"]["containers"][0]
            assert c["envFrom"] == [{"configMapRef": {"name": "notellm-worker"}}]
            env = {**cm, **_container_env(c)}
            assert all(k.startswith("NOTELLM_") for k in env), name
            s = _settings_from(monkeypatch, env)
            assert s.lifecycle.drain_s == float(env["NOTELLM_LIFECYCLE__DRAIN_S"])
            assert str(s.model.dir) == env["NOTELLM_MODEL__DIR"]
            assert s.model.device == env["NOTELLM_MODEL__DEVICE"]
            assert s.http.port == 8088 and s.http.host == "0.0.0.0"
            assert s.kafka.sasl_password.get_secret_value() == "secret-from-kafka-sasl-password"
            assert s.milvus.token.get_secret_value() == "secret-from-milvus-token"
            assert not s.milvus.is_lite, "a Milvus server: milvus-lite is one process per db"


def test_a_misspelt_configmap_key_is_caught(monkeypatch):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        _settings_from(monkeypatch, {**base_configmap(), "NOTELLM_LIFECYCLE__DRAIN_SECONDS": "60"})


# ------------------------------------------------------------------------------------------ metrics
def exported_series() -> set[str]:
    """Every series name the worker's /metrics can show, asked of prometheus_client itself: each
    metric of worker.metrics.Metrics used once, then the exposition parsed."""
    from prometheus_client import generate_latest
    from prometheus_client.metrics import MetricWrapperBase
    from prometheus_client.parser import text_string_to_metric_families

    from worker.metrics import Metrics

    m = Metrics()
    metrics = [v for v in vars(m).values() if isinstance(v, MetricWrapperBase)]
    assert len(metrics) >= 18
    for metric in metrics:
        child = metric.labels(*["x"] * len(metric._labelnames)) if metric._labelnames else metric
        {"counter": lambda: child.inc(), "gauge": lambda: child.set(1),
         "histogram": lambda: child.observe(1.0)}[metric._type]()
    families = list(text_string_to_metric_families(generate_latest(m.registry).decode()))
    assert {f.name for f in families} >= {mm._name for mm in metrics}
    return {s.name for f in families for s in f.samples}


_NAMES = r'''
import json, re, sys
import promql_parser as p
out = {}
for where, expr in json.load(sys.stdin):
    e = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    e = re.sub(r"\$\{?\w+\}?", "x", e)
    names = []
    def visit(node):
        if isinstance(node, p.VectorSelector):
            names.append(node.name or next((m.value for m in node.matchers.matchers if m.name == "__name__"), None))
    p.walk(p.parse(e), visit)
    out[where] = names
print(json.dumps(out))
'''


def promql_names(exprs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """The metric names each PromQL expression selects, from the real parser (promql-parser, installed
    in .local/venv-validate by scripts/validate-manifests)."""
    assert VENV_PY.exists(), "run scripts/validate-manifests first (it installs promql-parser)"
    p = subprocess.run([str(VENV_PY), "-c", _NAMES], input=json.dumps(exprs), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def rule_exprs(docs) -> list[tuple[str, str]]:
    pr = one(docs, "PrometheusRule")
    return [(r.get("alert") or r["record"], str(r["expr"])) for g in pr["spec"]["groups"] for r in g["rules"]]


def dashboard_exprs(d: dict) -> list[tuple[str, str]]:
    out = []
    for p in d["panels"]:
        for t in p.get("targets", []):
            out.append((f"{p['title']} {t['refId']}", t["expr"]))
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            q = re.fullmatch(r"label_values\((.*),\s*\w+\)", v["query"]["query"])
            out.append((f"variable {v['name']}", q.group(1)))
    return out


def test_the_name_extraction_sees_every_selector(validated):
    assert validated["rc"] == 0
    got = promql_names([("a", 'sum by (le) (rate(notellm_consumed_totl{job="x"}[5m])) / on() group_left up'),
                        ("b", '{__name__="notellm_x", job=~"$namespace"}[$__rate_interval]')])
    assert got == {"a": ["notellm_consumed_totl", "up"], "b": ["notellm_x"]}


def test_every_metric_in_the_alerts_and_the_dashboard_is_exported(validated, rendered):
    exported = exported_series() | PROMETHEUS_SERIES
    assert {"notellm_consumed_total", "notellm_freshness_seconds_bucket", "notellm_consumer_lag",
            "notellm_commits_total", "notellm_encode_seconds_count"} <= exported
    alerts = rule_exprs(rendered["cpu"])
    assert rule_exprs(rendered["gpu"]) == alerts
    dashboard = json.loads(DASHBOARD.read_text())
    assert json.loads(one(rendered["cpu"], "ConfigMap", "notellm-worker-dashboard")["data"]["grafana-dashboard.json"]) \
        == dashboard
    used: dict[str, set[str]] = {}
    for source, exprs in (("PrometheusRule", alerts), ("dashboard", dashboard_exprs(dashboard))):
        for where, names in promql_names(exprs).items():
            assert names, f"{source} {where}: selects no metric"
            for n in names:
                assert n in exported, f"{source} {where}: {n!r} is not exported by the worker"
                used.setdefault(source, set()).add(n)
    # the alerts that matter are there, on the metrics that measure them
    alert_names = {a for a, _ in alerts}
    for a, metric in {"NotellmWorkerDown": "up", "NotellmConsumerLagHigh": "notellm_consumer_lag",
                      "NotellmFreshnessP99High": "notellm_freshness_seconds_bucket",
                      "NotellmDeadLetterRateHigh": "notellm_dead_lettered_total",
                      "NotellmEncodeSlow": "notellm_encode_seconds_bucket",
                      "NotellmPipelineStalled": "notellm_embedded_total",
                      "NotellmCommitFailures": "notellm_commits_total"}.items():
        assert a in alert_names
        assert metric in dict(promql_names([(a, dict(alerts)[a])]))[a]
    # the dashboard shows every worker metric family
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in exported if n.startswith("notellm_")}
    shown = {re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in used["dashboard"]}
    assert families <= shown, f"not on the dashboard: {sorted(families - shown)}"
