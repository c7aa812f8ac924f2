"""Settings of the assignment service, from ``CRM_ASSIGNMENT_*`` environment variables."""

from __future__ import annotations

import base64
import binascii

from crm_common.settings import ServiceSettings
from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

__all__ = ["DEV_PHONE_ENCRYPTION_KEY", "DEV_PHONE_HASH_KEY", "AssignmentSettings"]

DEV_PHONE_HASH_KEY = "crm-dev-only-phone-hash-key-do-not-use-in-production"
"""Development-only default of ``phone_hash_key`` (a warning is logged when it is used)."""
DEV_PHONE_ENCRYPTION_KEY = base64.b64encode(b"crm-dev-only-aes-256-key-32bytes").decode()
"""Development-only default of ``phone_encryption_key`` (a warning is logged when used)."""


class AssignmentSettings(ServiceSettings):
    """Environment: ``CRM_ASSIGNMENT_<FIELD>`` (e.g. ``CRM_ASSIGNMENT_DATABASE_URL``)."""

    model_config = SettingsConfigDict(
        env_prefix="CRM_ASSIGNMENT_", extra="ignore", validate_default=True
    )

    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(
        default=9151,
        ge=-1,
        le=65535,
        description="Prometheus /metrics HTTP port; 0 picks a free one, -1 disables it.",
    )
    database_url: str = Field(
        default="mysql+pymysql://crm:crm@127.0.0.1:3306/crm_assignment",
        description="SQLAlchemy URL of the assignment database (MySQL/MariaDB via PyMySQL).",
    )
    db_pool_size: int = Field(
        default=10,
        ge=1,
        le=200,
        description="Connections in the pool; the blocking executor gets as many threads.",
    )
    clue_batch_max: int = Field(
        default=64,
        ge=1,
        le=1000,
        description="Most CreateClue calls written in one transaction (group commit of "
        "concurrent calls; 1 writes each call alone).",
    )
    phone_hash_key: str = Field(
        default=DEV_PHONE_HASH_KEY,
        min_length=16,
        description="HMAC key of the phone lookup hash (>= 16 characters). The default is "
        "for development only; changing it makes stored customers unfindable by phone.",
        repr=False,
    )
    phone_encryption_key: str = Field(
        default=DEV_PHONE_ENCRYPTION_KEY,
        description="AES key of the stored phone, base64 of 16, 24 or 32 bytes. The default "
        "is for development only.",
        repr=False,
    )
    recycle_poll_s: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="How often offers past their accept deadline are recycled.",
    )
    scheduler_target: str = Field(
        default="",
        description="host:port of the scheduler service: each offer's timeout and each "
        "revisit's wake-up become scheduler jobs calling back ExpireOffer/WakeRevisit at "
        "self_target, and the local recycle loop only runs every recycle_safety_sweep_s "
        "as a safety net; empty: not used (the local loop recycles every recycle_poll_s).",
    )
    self_target: str = Field(
        default="",
        description="host:port at which the scheduler's workers reach this service (its "
        "Kubernetes Service, e.g. crm-assignment:50051); empty: the address this replica "
        "is bound to (development).",
    )
    recycle_safety_sweep_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="With scheduler_target set: how often the local loop still recycles "
        "expired offers, a safety net for jobs the scheduler could not take or run "
        "(nothing is lost while it is down; expiry is only later, up to this interval).",
    )
    scheduler_timeout_s: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="Deadline of one Schedule call to the scheduler (made in the "
        "background after an offer or revisit commits; a failure is logged).",
    )
    dispatch_poll_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="How often an idle offer stream looks for work without being woken "
        "(covers changes made through other replicas).",
    )
    recommendation_target: str = Field(
        default="",
        description="host:port of the recommendation service (car recommendations in the "
        "task detail); empty: not configured (GetTask answers them as unavailable, "
        "NOT_CONFIGURED).",
    )
    recommendation_timeout_s: float = Field(
        default=0.3,
        gt=0,
        le=10,
        description="Deadline of the Recommend call made by GetTask; past it the task "
        "detail is answered without recommendations (DEADLINE_EXCEEDED).",
    )
    recommendation_count: int = Field(
        default=6, ge=1, le=100, description="Cars recommended in a task detail."
    )
    bilog_target: str = Field(
        default="",
        description="host:port of the bilog service: every task transition (task_event "
        "row) is sent to it as a crm.bi.TaskTransition event, every call record and "
        "presence change (bi_outbox row) as a crm.bi.FactCallRecord / "
        "crm.bi.AgentPresenceChanged event; empty: not sent (the rows stay unpublished "
        "and go out once it is set).",
    )
    bilog_timeout_s: float = Field(
        default=5.0, gt=0, le=120, description="Deadline of one LogBatch call of the outbox."
    )
    outbox_batch_size: int = Field(
        default=200, ge=1, le=1000, description="Task events sent in one LogBatch at most."
    )
    outbox_poll_s: float = Field(
        default=1.0,
        gt=0,
        le=300,
        description="How often the outbox looks for unpublished events without being woken "
        "(covers transitions made through other replicas).",
    )
    outbox_backoff_max_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="Longest wait between retries while bilog (or the database) fails "
        "(exponential back-off from 0.2 s).",
    )

    require_line_config: bool = Field(
        default=False,
        description="When true, a business line is open only while its routing config key "
        "<config_prefix>/assignment/<LINE> exists in etcd (and does not say "
        '"enabled": false): CreateClue for a closed line answers FAILED_PRECONDITION '
        "and its agents get no offers; putting the key opens the line live. When false, "
        "a well-known line (SALE, AFTER_SALE, FINANCE) without a key uses the defaults "
        '(only "enabled": false closes it). Any other line exists only while its key '
        "(with its code) does, in either mode.",
    )
    auth_token_secret: str = Field(
        default="",
        description="HMAC secret signing the agents' console tokens (SignIn), at least 16 "
        "characters; empty: a random secret per process (logged as a warning: tokens do "
        "not survive a restart and are not accepted by other replicas).",
        repr=False,
    )
    auth_token_secret_required: bool = Field(
        default=False,
        description="Refuse to start without auth_token_secret: set where more than one "
        "replica runs (the Helm chart sets it when replicaCount > 1 or autoscaling is on), "
        "since a token signed by one replica's random secret fails on the others.",
    )
    auth_token_ttl_s: int = Field(
        default=43200,
        ge=60,
        le=7 * 86400,
        description="Lifetime of a console token (SignIn), and the longest one may ask for.",
    )
    host_name: str = Field(
        default="",
        description="Host name written in the BI call records' operator_header.http_host; "
        "empty: this machine's host name (the pod name on Kubernetes).",
    )

    @field_validator("auth_token_secret")
    @classmethod
    def _check_secret(cls, value: str) -> str:
        if value and len(value) < 16:
            raise ValueError("must be empty or at least 16 characters")
        return value

    @field_validator("phone_encryption_key")
    @classmethod
    def _check_aes_key(cls, value: str) -> str:
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("must be base64") from exc
        if len(raw) not in (16, 24, 32):
            raise ValueError("must decode to 16, 24 or 32 bytes")
        return value

    @property
    def phone_hash_key_bytes(self) -> bytes:
        return self.phone_hash_key.encode()

    @property
    def phone_encryption_key_bytes(self) -> bytes:
        return base64.b64decode(self.phone_encryption_key)

    @property
    def uses_dev_keys(self) -> bool:
        """True when a phone key still has its development default."""
        return (
            self.phone_hash_key == DEV_PHONE_HASH_KEY
            or self.phone_encryption_key == DEV_PHONE_ENCRYPTION_KEY
        )

    @property
    def assignment_config_prefix(self) -> str:
        """The etcd prefix of the routing config: ``<config_prefix>/assignment/``."""
        return self.config_prefix.rstrip("/") + "/assignment/"
