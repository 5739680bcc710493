"""Settings: one frozen model, env `NOTELLM_*` (nested with `__`), CLI overrides win, secrets hidden."""
from __future__ import annotations

import pydantic
import pytest

from worker.config import load_settings


def test_env_then_overrides(monkeypatch):
    monkeypatch.setenv("NOTELLM_KAFKA__BOOTSTRAP_SERVERS", "b1:9092,b2:9092")
    monkeypatch.setenv("NOTELLM_KAFKA__GROUP_ID", "from-env")
    monkeypatch.setenv("NOTELLM_BATCH__LINGER_MS", "7")
    monkeypatch.setenv("NOTELLM_MILVUS__URI", "http://milvus:19530")
    s = load_settings({"kafka": {"group_id": "from-cli", "topic_dlq": None}})
    assert s.kafka.bootstrap_servers == "b1:9092,b2:9092"
    assert s.kafka.group_id == "from-cli"        # CLI beats env
    assert s.kafka.topic_dlq == "notes.dlq"      # None = flag not given
    assert s.batch.linger_ms == 7
    assert not s.milvus.is_lite
    assert load_settings().milvus.is_lite is False  # env still applies


def test_frozen_and_validated(monkeypatch):
    s = load_settings()
    with pytest.raises(pydantic.ValidationError):
        s.kafka.group_id = "x"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        load_settings({"batch": {"max_batch_notes": 0}})
    with pytest.raises(pydantic.ValidationError):
        load_settings({"model": {"generate": "everything"}})
    monkeypatch.setenv("NOTELLM_BATCH__NO_SUCH_KNOB", "1")
    with pytest.raises(pydantic.ValidationError):
        load_settings()


def test_secrets_do_not_leak(monkeypatch):
    monkeypatch.setenv("NOTELLM_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("NOTELLM_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("NOTELLM_KAFKA__SASL_USERNAME", "svc")
    monkeypatch.setenv("NOTELLM_KAFKA__SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("NOTELLM_MILVUS__TOKEN", "root:Milvus")
    s = load_settings()
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())
    assert "root:Milvus" not in repr(s)
    conf = s.kafka.consumer_config()
    assert conf["sasl.password"] == "hunter2" and conf["security.protocol"] == "SASL_SSL"
    assert conf["enable.auto.commit"] is False
    assert s.kafka.producer_config()["enable.idempotence"] is True


def test_http_binds_loopback_unless_told(monkeypatch):
    from worker.config import load_settings

    monkeypatch.delenv("NOTELLM_HTTP__HOST", raising=False)
    assert load_settings().http.host == "127.0.0.1"
    monkeypatch.setenv("NOTELLM_HTTP__HOST", "0.0.0.0")
    assert load_settings().http.host == "0.0.0.0"


def test_deployment_grace_period_covers_the_drain_budget():
    """SIGTERM drains for at most lifecycle.drain_s; Kubernetes kills at terminationGracePeriodSeconds."""
    from pathlib import Path

    import yaml

    from worker.config import LifecycleSettings

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    env = yaml.safe_load((deploy / "base" / "configmap.yaml").read_text())["data"]
    spec = yaml.safe_load((deploy / "base" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    drain = float(env.get("NOTELLM_LIFECYCLE__DRAIN_S", LifecycleSettings().drain_s))
    assert spec["terminationGracePeriodSeconds"] >= drain + 15
    assert env["NOTELLM_HTTP__HOST"] == "0.0.0.0"  # probes and the scraper reach it inside the pod


def test_an_invalid_setting_is_one_clear_line_and_exit_2_without_its_value(monkeypatch, capsys):
    import signal

    from notellm.cli import main

    monkeypatch.setenv("NOTELLM_HTTP__MAX_K", "500")
    monkeypatch.setenv("NOTELLM_KAFKA__SASL_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("NOTELLM_KAFKA__SSL_KEY_PASSWORD", "12345")  # fine; the bad one is below
    monkeypatch.setenv("NOTELLM_BATCH__LINGER_MS", "-1")
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert main(["worker", "run"]) == 2
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    err = capsys.readouterr().err
    assert "NOTELLM_HTTP__MAX_K: Input should be less than or equal to 100" in err
    assert "NOTELLM_BATCH__LINGER_MS" in err and "Traceback" not in err
    assert "hunter2" not in err and "500" not in err.replace("NOTELLM", "")  # no input values echoed
