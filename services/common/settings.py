"""Settings every service shares. Each service subclasses this into its one settings object.

Flat names, so the documented variables read naturally: DOSEWATCH_KAFKA_BOOTSTRAP,
DOSEWATCH_DATABASE_URL. Secrets may come from files (`*_FILE`), never from the repository.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.dosage.core.params import DosageParams


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DOSEWATCH_", env_nested_delimiter="__", extra="ignore"
    )

    # -- Kafka --------------------------------------------------------------------------------
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_password_file: Path | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    topic_prefix: str = ""
    partitions: int = Field(4, ge=1)
    replication_factor: int = Field(1, ge=1)
    create_topics: bool = True
    # Latency is set by the fetch wait: the client default of 500 ms is far too slow.
    fetch_max_wait_ms: int = Field(5, ge=0)
    linger_ms: int = Field(5, ge=0)
    max_poll_records: int = Field(5000, ge=1)
    max_batch_bytes: int = Field(1_048_576, ge=1024)
    # State, offsets and history are written at most this often (outputs go out per batch).
    commit_interval_ms: int = Field(100, ge=0)
    # "group": instances share partitions through a consumer group. "all": an instance takes
    # every partition of its input itself, with no group to join (on the embedded broker a
    # group's first join waits a second or more): for one instance per stage, as
    # `dosewatch up` runs; two such instances would each take everything.
    consumer_assignment: Literal["group", "all"] = "group"
    # Group membership: short timeouts make a dead instance's partitions move on quickly.
    session_timeout_ms: int = Field(3000, ge=1000)
    heartbeat_interval_ms: int = Field(300, ge=100)
    # A partition behind with nothing handed out this long is logged as stalled.
    consumer_stall_s: float = Field(30.0, gt=0)

    # -- PostgreSQL ---------------------------------------------------------------------------
    # sslmode and friends ride in the URL (…?sslmode=verify-full).
    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/dosewatch")
    database_url_file: Path | None = None
    db_retry_max_s: float = Field(10.0, gt=0)

    # -- rules and service --------------------------------------------------------------------
    dosage: DosageParams = Field(default_factory=DosageParams)
    tz: str = "UTC"
    shifts: str = "07:00,15:00,23:00"
    log_level: str = "INFO"
    http_host: str = "127.0.0.1"
    http_port: int = Field(0, ge=0, le=65535)  # 0: pick a free port
    instance: str = "local"
    # Enables POST /control/* on a stage's HTTP port (moving it to another broker; see
    # services/common/moving.py), for callers sending it as a bearer token. Unset: no such
    # routes. Whoever holds it can point the stage at any broker, so keep it like a password.
    control_token: SecretStr | None = None
    control_token_file: Path | None = None

    @model_validator(mode="after")
    def _secrets_from_files(self) -> CommonSettings:
        if self.kafka_sasl_password_file is not None:
            self.kafka_sasl_password = SecretStr(self.kafka_sasl_password_file.read_text().strip())
        if self.control_token_file is not None:
            self.control_token = SecretStr(self.control_token_file.read_text().strip())
        if self.control_token is not None and len(self.control_token) < 16:
            raise ValueError("DOSEWATCH_CONTROL_TOKEN must be at least 16 characters")
        if self.database_url_file is not None:
            self.database_url = SecretStr(self.database_url_file.read_text().strip())
        return self

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    @property
    def topic_raw(self) -> str:
        return self.topic("avl.pings.raw")

    @property
    def topic_pings(self) -> str:
        return self.topic("avl.pings")

    @property
    def topic_dlq(self) -> str:
        return self.topic("avl.pings.dlq")

    @property
    def topic_visits(self) -> str:
        return self.topic("dosage.visits")

    @property
    def topic_status(self) -> str:
        return self.topic("dosage.zone-status")

    @property
    def topic_audit(self) -> str:
        return self.topic("dosage.audit")
