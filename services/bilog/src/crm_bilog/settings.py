"""Settings of the bilog service, its dev schema registry and its sink, from
``CRM_BILOG_*`` environment variables (one class: the three commands share Kafka and
registry settings)."""

from __future__ import annotations

from pathlib import Path

from crm_common.settings import ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict

__all__ = ["DEV_PII_HASH_KEY", "BilogSettings"]

DEV_PII_HASH_KEY = "crm-dev-only-bilog-pii-hash-key-do-not-use-in-production"
"""Development-only default of ``pii_hash_key`` (a warning is logged when it is used)."""


class BilogSettings(ServiceSettings):
    """Environment: ``CRM_BILOG_<FIELD>`` (e.g. ``CRM_BILOG_KAFKA_BOOTSTRAP``)."""

    model_config = SettingsConfigDict(
        env_prefix="CRM_BILOG_", extra="ignore", validate_default=True
    )

    port: int = Field(default=50054, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(
        default=9154,
        ge=-1,
        le=65535,
        description="Prometheus /metrics HTTP port; 0 picks a free one, -1 disables it.",
    )

    # -- Kafka ---------------------------------------------------------------------------
    kafka_bootstrap: str = Field(
        default="127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated."
    )
    topic_prefix: str = Field(
        default="bi.",
        description="Topic of a schema = prefix + snake_case record name "
        "(crm.bi.FactCallRecord -> bi.fact_call_record).",
    )
    topic_partitions: int = Field(
        default=3, ge=1, le=1000, description="Partitions of topics the service creates."
    )
    topic_replication: int = Field(
        default=1, ge=1, le=10, description="Replication factor of topics the service creates."
    )
    compression: str = Field(
        default="zstd", pattern="^(zstd|lz4|snappy|gzip|none)$", description="compression.type"
    )
    linger_ms: int = Field(default=5, ge=0, le=1000, description="Producer linger.ms.")
    queue_max_messages: int = Field(
        default=200_000,
        ge=1,
        description="Local producer queue bound (queue.buffering.max.messages); a call that "
        "does not fit answers RESOURCE_EXHAUSTED.",
    )
    message_timeout_ms: int = Field(
        default=30_000,
        ge=1000,
        description="librdkafka message.timeout.ms: an undelivered message fails after this.",
    )
    produce_timeout_s: float = Field(
        default=15.0,
        gt=0,
        description="Longest a call waits for the broker's acks (a shorter client deadline "
        "wins); then it answers UNAVAILABLE.",
    )
    max_batch_events: int = Field(
        default=1000, ge=1, le=100_000, description="Events per LogBatch / LogStream message."
    )
    max_payload_bytes: int = Field(
        default=64 * 1024, ge=64, description="Largest payload_json of one event."
    )

    # -- schema registry -------------------------------------------------------------------
    schema_registry_url: str = Field(
        default="http://127.0.0.1:8081",
        description="Confluent-compatible schema registry (the dev one or a real one).",
    )
    auto_register_schemas: bool = Field(
        default=True,
        description="Register the packaged schemas at start; false: only look them up "
        "(registries where CI registers schemas).",
    )

    # -- PII -------------------------------------------------------------------------------
    pii_hash_key: str = Field(
        default=DEV_PII_HASH_KEY,
        min_length=16,
        repr=False,
        description='HMAC key of fields marked "pii": "hash" (>= 16 characters). The '
        "default is for development only; changing it changes every hash.",
    )

    # -- dev schema registry (python -m crm_bilog registry) -------------------------------
    registry_host: str = Field(default="0.0.0.0", description="Address the registry binds.")
    registry_port: int = Field(
        default=8081, ge=0, le=65535, description="Registry HTTP port; 0 picks a free one."
    )
    database_url: str = Field(
        default="mysql+pymysql://crm:crm@127.0.0.1:3306/crm_bilog_registry",
        description="SQLAlchemy URL of the dev registry's database (MySQL/MariaDB).",
    )
    db_pool_size: int = Field(default=5, ge=1, le=100, description="Registry DB connections.")

    # -- sink (python -m crm_bilog sink) -----------------------------------------------------
    sink_dir: Path = Field(default=Path("bilog-sink"), description="Root directory of files.")
    sink_group_id: str = Field(default="crm-bilog-sink", description="Consumer group id.")
    sink_topics: str = Field(
        default="",
        description="Topics to sink, comma-separated, or a regex starting with ^; "
        "empty: every topic of the schemas (with topic_prefix), bad rows included.",
    )
    sink_flush_records: int = Field(
        default=10_000, ge=1, description="Publish a file when it holds this many records."
    )
    sink_rotate_interval_s: float = Field(
        default=600.0, gt=0, description="Publish a file this long after its first record."
    )
    sink_idle_flush_s: float = Field(
        default=30.0, gt=0, description="Publish a file when no record came for this long."
    )
    sink_session_timeout_ms: int = Field(
        default=10_000,
        ge=1000,
        description="Consumer session.timeout.ms (a restarted sink rejoins the group in "
        "about half of it on Tansu).",
    )

    sink_port: int = Field(
        default=50057, ge=0, le=65535, description="gRPC health port of the sink."
    )
    sink_metrics_port: int = Field(
        default=9157,
        ge=-1,
        le=65535,
        description="Prometheus /metrics port of the sink; -1 disables it.",
    )
    sink_stall_s: float = Field(
        default=180.0,
        gt=0,
        description="The sink's consume loop must come round at least this often: past "
        "it, health (readiness) and ``liveness`` turn NOT_SERVING, so a hung sink is "
        "restarted. Keep it above a blocking offset commit (socket.timeout.ms, 60 s).",
    )

    # -- realtime KPIs (python -m crm_bilog kpi) --------------------------------------------
    kpi_port: int = Field(
        default=50056, ge=0, le=65535, description="gRPC health port of the KPI consumer."
    )
    kpi_metrics_port: int = Field(
        default=9156,
        ge=-1,
        le=65535,
        description="Prometheus /metrics port of the KPI consumer (the KPIs); -1 disables it.",
    )
    kpi_group_id: str = Field(default="crm-bilog-kpi", description="KPI consumer group id.")
    kpi_retention_s: float = Field(
        default=86_400.0,
        gt=0,
        description="Event time a finished task (and a call, a bad row) is remembered to "
        "dedupe replays; older events of forgotten tasks are dropped as late.",
    )
    kpi_window_s: float = Field(
        default=900.0,
        gt=0,
        description="Event-time window of the offer / recycle gauges (the recycle rate).",
    )
    kpi_max_call_tags: int = Field(
        default=50,
        ge=0,
        description="Distinct call tags labelled per business line; further tags count "
        'as "other" (bounded cardinality).',
    )
    kpi_session_timeout_ms: int = Field(
        default=10_000, ge=1000, description="KPI consumer session.timeout.ms."
    )

    @property
    def pii_hash_key_bytes(self) -> bytes:
        return self.pii_hash_key.encode()

    @property
    def uses_dev_key(self) -> bool:
        return self.pii_hash_key == DEV_PII_HASH_KEY

    @property
    def failed_topic(self) -> str:
        """Topic of bad rows (``<prefix>failed_event``)."""
        from crm_bilog.schemas import FAILED_EVENT, topic_name

        return topic_name(FAILED_EVENT, self.topic_prefix)
