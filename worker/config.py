"""One frozen settings model for the whole runtime.

Read from the environment with the `NOTELLM_` prefix (nested sections use `__`, e.g.
`NOTELLM_KAFKA__BOOTSTRAP_SERVERS=broker:9092`, `NOTELLM_BATCH__LINGER_MS=20`) and overridden by CLI
flags, which arrive as keyword overrides: `load_settings({"kafka": {"group_id": "g2"}})`.
Secrets are `SecretStr`, so they never print in logs or reprs: the SASL / key passwords, the Milvus
token, and every `kafka.extra` value whose key names a secret (`is_secret_key`: passwords, secrets,
tokens, JAAS lines, private key material such as `ssl.key.pem`). They are revealed only in the librdkafka
config (`KafkaSettings.common_config()`) and the Milvus client.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker import __version__

_frozen = ConfigDict(frozen=True, extra="forbid")

# librdkafka properties whose value is a secret, by name: *password*, *passphrase*, *secret* (e.g.
# sasl.oauthbearer.client.secret), *token*, *credential*, JAAS lines (sasl.jaas.config), private key
# material (ssl.key.pem, ssl_key, sasl.oauthbearer.assertion.private.key.pem), sasl.oauthbearer.config.
_SECRET_KEY = re.compile(r"pass(word|phrase)|secret|token|credential|jaas|private|(^|[._])key(\.pem)?$|"
                         r"sasl\.oauthbearer\.config", re.IGNORECASE)


def is_secret_key(name: str) -> bool:
    """Whether a `kafka.extra` property carries a secret (its value is kept as a SecretStr)."""
    return bool(_SECRET_KEY.search(name))


class KafkaSettings(BaseModel):
    model_config = _frozen

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka brokers, comma-separated host:port")
    topic_notes: str = Field("notes.published", description="the topic of new notes and tombstones (consumed)")
    topic_tags: str = Field("notes.tags", description="generated category and hashtags, one record per note")
    topic_dlq: str = Field("notes.dlq", description="dead letters: the original record and why it was refused")
    group_id: str = Field("notellm-worker", description="consumer group; replicas share it (N <= partitions)")
    client_id: str = Field("notellm-worker", description="Kafka client id (the manifests use the pod name)")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="where a group without committed offsets starts")
    max_poll_interval_ms: int = Field(300_000, ge=10_000, description="librdkafka max.poll.interval.ms")
    session_timeout_ms: int = Field(45_000, ge=6_000, description="librdkafka session.timeout.ms")
    # Security (librdkafka names). Secrets never leave as plain strings except into the client config.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="librdkafka security.protocol (SASL_SSL for managed Kafka)")
    sasl_mechanism: str | None = Field(None, description="e.g. SCRAM-SHA-512, PLAIN")
    sasl_username: str | None = None
    sasl_password: SecretStr | None = Field(None, description="from a Secret; never logged")
    ssl_ca_location: str | None = Field(None, description="CA bundle that verifies the brokers' certificates")
    ssl_certificate_location: str | None = Field(None, description="client certificate (mutual TLS)")
    ssl_key_location: str | None = Field(None, description="client key (mutual TLS)")
    ssl_key_password: SecretStr | None = None
    dlq_max_value_bytes: int = Field(
        256 * 1024, ge=1024, le=640 * 1024,
        description="a dead letter carries the original value whole up to this size; above it, truncated with "
                    "its size and sha256, so a dead letter always fits the DLQ topic")
    # The values of secret-named ones (`is_secret_key`) are held as SecretStr, revealed only by common_config().
    extra: dict[str, str | SecretStr] = Field(
        default_factory=dict, description='more librdkafka properties, verbatim, as JSON (e.g. '
        '{"fetch.min.bytes": "1"}); values whose key names a secret are redacted like the password')

    @field_validator("extra")
    @classmethod
    def _hide_secret_extras(cls, v: dict[str, str | SecretStr]) -> dict[str, str | SecretStr]:
        return {k: SecretStr(x) if is_secret_key(k) and not isinstance(x, SecretStr) else x for k, x in v.items()}

    def common_config(self) -> dict[str, Any]:
        """librdkafka properties shared by consumers and producers (secrets revealed here only)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol,
        }
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password.get_secret_value() if self.sasl_password else None,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
            "ssl.key.password": self.ssl_key_password.get_secret_value() if self.ssl_key_password else None,
        }
        conf.update({k: v for k, v in optional.items() if v is not None})
        conf.update({k: v.get_secret_value() if isinstance(v, SecretStr) else v for k, v in self.extra.items()})
        return conf

    def consumer_config(self, group_id: str | None = None) -> dict[str, Any]:
        return {
            **self.common_config(),
            "group.id": group_id or self.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": self.auto_offset_reset,
            "max.poll.interval.ms": self.max_poll_interval_ms,
            "session.timeout.ms": self.session_timeout_ms,
            "partition.assignment.strategy": "cooperative-sticky",
        }

    def producer_config(self) -> dict[str, Any]:
        return {
            **self.common_config(),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
        }


class MilvusSettings(BaseModel):
    model_config = _frozen

    uri: str = Field(".local/milvus/notes.db", description="a path: an embedded milvus-lite database (one "
                     "process per db); http(s)://host:19530: a Milvus server. Same code path for both")
    token: SecretStr | None = Field(None, description="Milvus token (user:password or an API key); never logged")
    db_name: str | None = Field(None, description="Milvus database (server only; default: the server's default)")
    collection: str = Field("notes", description="the alias readers search; the worker writes the collection it "
                            "points at (`backfill` switches it to a new model's collection)")
    timeout_s: float = Field(30.0, gt=0, description="per Milvus call")
    # The worker's own /similar reads at Strong (read-your-writes: a note just acknowledged is found).
    read_consistency: Literal["Strong", "Bounded", "Session", "Eventually"] = Field(
        "Bounded", description="the level the readers search with; the freshness probe reads new notes at it "
                               "(notellm_visible_seconds)")
    search_ef: int = Field(128, ge=0, le=32768, description="the HNSW candidate list `/similar` and `notellm "
                           "similar` search with (a server's HNSW index; milvus-lite's AUTOINDEX, faiss HNSW), "
                           "raised to k+1 when smaller; more is better recall and slower. 0: Milvus's default. "
                           "Recall and latency per ef: docs/design-notes.md (bench/search_recall.py)")
    visibility_probe: bool = Field(True, description="sample publish -> visible to a reader (one read a second)")
    lite_process: bool = Field(False, description="milvus-lite only: serve the db from a child process "
                               "(worker/lite_server.py) instead of inside the worker, whose GIL its pure-Python "
                               "writes would share: for an encoder as fast as a GPU's")
    write_process: bool = Field(False, description="upsert and delete from a child process with its own client "
                                "(worker/milvus_writer.py), so that pymilvus's request building (~55 µs a row) does "
                                "not share the worker's GIL: for an embed-only encoder as fast as a GPU's. Needs a "
                                "server URI or lite_process")
    # TLS to a Milvus server (its common.security.tlsMode 1 or 2): an https:// uri. Unset, an https:// uri
    # verifies the server against the system's roots.
    tls_ca_path: str | None = Field(None, description="https:// uri only: PEM of the CA that signed the server's "
                                    "certificate (a private CA), instead of the system's roots")
    tls_server_name: str | None = Field(None, description="https:// uri only: the name the server's certificate is "
                                        "checked against, when it is not the uri's host (an IP, another alias)")
    tls_client_cert_path: str | None = Field(None, description="mutual TLS (the server's tlsMode 2): this client's "
                                             "certificate (PEM); needs tls_client_key_path and tls_ca_path")
    tls_client_key_path: str | None = Field(None, description="mutual TLS: this client's private key (PEM, "
                                            "unencrypted)")

    @property
    def is_lite(self) -> bool:
        return not self.uri.startswith(("http://", "https://", "tcp://", "unix:"))

    @model_validator(mode="after")
    def _writer_needs_an_address(self) -> "MilvusSettings":
        if self.write_process and self.is_lite and not self.lite_process:
            raise ValueError("milvus.write_process needs a Milvus server uri (http://host:19530) or "
                             "milvus.lite_process=true: an embedded milvus-lite db cannot be written from another "
                             "process")
        return self

    @model_validator(mode="after")
    def _tls_needs_https(self) -> "MilvusSettings":
        given = [n for n in ("tls_ca_path", "tls_server_name", "tls_client_cert_path", "tls_client_key_path")
                 if getattr(self, n)]
        if given and not self.uri.startswith("https://"):
            raise ValueError(f"milvus.{given[0]} is set but milvus.uri is not https://: TLS to Milvus needs an "
                             "https://host:port uri")
        if bool(self.tls_client_cert_path) != bool(self.tls_client_key_path):
            raise ValueError("milvus.tls_client_cert_path and milvus.tls_client_key_path come together (mutual TLS)")
        if self.tls_client_cert_path and not self.tls_ca_path:
            raise ValueError("mutual TLS to Milvus (milvus.tls_client_cert_path) needs milvus.tls_ca_path: the "
                             "client (pymilvus) verifies the server only against a given CA in that mode")
        return self


class ModelSettings(BaseModel):
    model_config = _frozen

    dir: Path = Field(Path(".local/models/notellm-default-onnx"), description="the model package written by "
                      "`notellm export` (notellm.json, tokenizer.json, graph files)")
    generate: Literal["none", "category", "hashtags", "both"] = Field(
        "both", description="what the model writes besides the vector (both costs about two category calls)")
    max_new_tokens: int = Field(16, ge=1, le=128, description="longest generated category / hashtag list")
    categories: Literal["package", "open"] = Field(
        "package", description="package: when the package lists the category set its model was trained on "
                               "(categories.json), the category is decoded within that set; open: free text")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when onnxruntime-gpu and an NVIDIA driver are present, else CPU; cuda "
                            "without them is a start-up error")
    intra_op_threads: int = Field(0, ge=0, description="0 = ONNX Runtime default")
    gpu_mem_limit_mib: int | None = Field(
        None, ge=256, description="on CUDA: the most GPU memory each of the encoder's ONNX Runtime sessions may "
                                  "hold (MiB; the step graph's and, when the package has one, the embed graph's), "
                                  "its arena grown by what is asked, not by powers of two. Set it when several "
                                  "workers share one GPU: unset, ONNX Runtime's arena grows by powers of two and "
                                  "keeps what it took, and a second worker on the GPU ran out of memory")
    isolation: Literal["process", "thread"] = Field(
        "process", description="process: the encoder runs in a child process (never waits for the worker's GIL; "
                               "a crash or hang is restartable); thread: in the worker process")
    # Engine faults (crash, hang, non-finite output): nothing is dead-lettered for an engine fault.
    batch_timeout_s: float = Field(120.0, gt=0, description="deadline per encoder call; past it the encoder is "
                                   "restarted and the batch retried")
    engine_restarts: int = Field(2, ge=0, le=10, description="restarts per batch before the worker exits 1 "
                                 "without committing")


class BatchSettings(BaseModel):
    """Batch limits. `max_batch_notes="auto"` (default): chosen at start-up by measuring the encoder on this
    device (worker/calibrate.py, at most `calibration_budget_s`, candidates up to `calibration_max_notes`, both
    by device unless set: 20 s and 512 notes on CPU, 60 s and 2048 notes on CUDA);
    an integer sets it and disables the measurement. `max_batch_tokens="auto"`: the calibrated notes x the
    longest calibration prompt, or, with an integer notes setting, notes x 128 (32 -> 4096, the old default).
    Where nothing is measured (an encoder passed in, a failed calibration) "auto" means 32 notes / 4096 tokens."""

    model_config = _frozen

    max_batch_notes: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description='"auto" = calibrated at start-up')
    max_batch_tokens: Annotated[int, Field(ge=16)] | Literal["auto"] = Field(
        "auto", description='padded tokens per batch (n * longest prompt); "auto" follows the notes limit')
    calibration_budget_s: Annotated[float, Field(gt=0, le=600)] | Literal["auto"] = Field(
        "auto", description='time the start-up calibration may take; "auto": 20 s on CPU, 60 s on CUDA')
    calibration_max_notes: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description='largest batch the calibration tries; "auto": 512 on CPU, 2048 on CUDA')
    linger_ms: int = Field(50, ge=0, description="how long a batch waits to fill after its first note")
    max_note_bytes: int = Field(64 * 1024, ge=256, description="a larger record is dead-lettered (too_large)")

    @property
    def calibrate(self) -> bool:
        """Whether the notes limit is to be measured at start-up (False: the operator set it)."""
        return self.max_batch_notes == "auto"


class RetrySettings(BaseModel):
    """Transient sink failures: exponential backoff with jitter, bounded by `budget_s`; after that the
    worker exits non-zero without committing (the batch is re-read on restart)."""

    model_config = _frozen

    initial_s: float = Field(0.2, gt=0, description="first backoff wait")
    max_wait_s: float = Field(5.0, gt=0, description="longest backoff wait")
    budget_s: float = Field(120.0, gt=0, description="total retry time before the worker exits 1 (uncommitted)")
    flush_timeout_s: float = Field(30.0, gt=0, description="producer delivery wait per flush")


class HttpSettings(BaseModel):
    """No authentication: it binds loopback unless told otherwise (the Kubernetes manifests set 0.0.0.0
    for the kubelet's probes and the metrics scraper, inside the pod network)."""

    model_config = _frozen

    host: str = Field("127.0.0.1", description="bind address (0.0.0.0 in a pod)")
    port: int = Field(8088, ge=0, le=65535, description="0 = no HTTP server")
    max_k: int = Field(100, ge=1, le=100, description="largest k /similar accepts (the store answers at most 100)")


class LifecycleSettings(BaseModel):
    """Bounds on waiting: a revoke or a shutdown waits at most `drain_s` for in-flight batches (the
    Kubernetes terminationGracePeriodSeconds must exceed it, see deploy/)."""

    model_config = _frozen

    drain_s: float = Field(60.0, gt=0, description="a revoke or SIGTERM waits at most this for in-flight batches")


class LogSettings(BaseModel):
    model_config = _frozen

    format: Literal["auto", "json", "console"] = Field("auto", description="auto: JSON unless stderr is a terminal")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Settings(BaseSettings):
    """The whole runtime configuration. Frozen: build a new one instead of mutating."""

    model_config = SettingsConfigDict(
        env_prefix="NOTELLM_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
        case_sensitive=False,
    )

    kafka: KafkaSettings = KafkaSettings()
    milvus: MilvusSettings = MilvusSettings()
    model: ModelSettings = ModelSettings()
    batch: BatchSettings = BatchSettings()
    retry: RetrySettings = RetrySettings()
    http: HttpSettings = HttpSettings()
    lifecycle: LifecycleSettings = LifecycleSettings()
    log: LogSettings = LogSettings()
    worker_version: str = __version__

    @field_validator("worker_version")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v:
            raise ValueError("worker_version must not be empty")
        return v


def _given(overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides without their None values (a CLI flag not given), nested sections included."""
    return {k: _given(v) if isinstance(v, dict) else v for k, v in overrides.items() if v is not None}


def load_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Settings from env (`NOTELLM_*`) and CLI overrides (nested dict; None values are ignored), the
    overrides winning. Validated once, together: a check across settings sees the flags' values (e.g.
    NOTELLM_MILVUS__TLS_CA_PATH from the environment with `--milvus-uri https://...`)."""
    return Settings(**_given(overrides or {}))


def settings_error_text(e: Any) -> str:
    """A pydantic ValidationError of `Settings` as one line per bad setting, named by its environment
    variable, without the offending value (it may be a secret)."""
    lines = []
    for err in e.errors(include_input=False, include_url=False):
        loc = [str(x) for x in err.get("loc", ()) if not str(x).startswith(("function-", "literal[", "constrained-"))
               and str(x) not in ("int", "str", "float", "bool", "json-or-python[json=str,python=is-instance[SecretStr]]")]
        var = "NOTELLM_" + "__".join(loc[:2]).upper() if loc else "NOTELLM_*"
        lines.append(f"{var}: {err.get('msg', 'invalid')}")
    return "invalid settings: " + "; ".join(dict.fromkeys(lines))
