"""Settings of the scheduler, from ``CRM_SCHEDULER_*`` environment variables.

One settings class serves the three processes of the service: the API server
(``serve``), the pump (``pump``) and the workers (``worker``). The pump and the workers
each serve gRPC health (and ``/metrics``) on ports of their own
(``pump_health_port``/``pump_metrics_port``, ``worker_health_port``/
``worker_metrics_port``), so a Kubernetes ``grpc`` probe works for every process.
"""

from __future__ import annotations

from typing import Literal

from crm_common.settings import ServiceSettings
from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

__all__ = ["SchedulerSettings", "WorkerPool"]

WorkerPool = Literal["threads", "solo", "prefork"]


class SchedulerSettings(ServiceSettings):
    """Environment: ``CRM_SCHEDULER_<FIELD>`` (e.g. ``CRM_SCHEDULER_DATABASE_URL``)."""

    model_config = SettingsConfigDict(
        env_prefix="CRM_SCHEDULER_", extra="ignore", validate_default=True
    )

    port: int = Field(default=50053, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(
        default=9153,
        ge=-1,
        le=65535,
        description="Prometheus /metrics HTTP port; 0 picks a free one, -1 disables it.",
    )
    database_url: str = Field(
        default="mysql+pymysql://crm:crm@127.0.0.1:3306/crm_scheduler",
        description="SQLAlchemy URL of the scheduler database (the record of every job).",
    )
    db_pool_size: int = Field(
        default=10,
        ge=1,
        le=200,
        description="Connections in the pool; the blocking executor gets as many threads.",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Celery broker (Redis) URL. Redis only carries due jobs to workers: "
        "it may lose its contents (no persistence needed).",
    )
    queue_name: str = Field(
        default="crm-scheduler",
        min_length=1,
        max_length=100,
        description="Celery queue the pump sends due jobs to and the workers consume.",
    )

    # -- validation limits of Schedule -----------------------------------------------
    max_payload_bytes: int = Field(
        default=64 * 1024,
        ge=1,
        le=1024 * 1024,
        description="Largest serialized target request accepted (bytes).",
    )
    max_past_s: float = Field(
        default=60.0,
        ge=0,
        description="How far in the past an ETA may be (such a job runs at once).",
    )
    allowed_target_services: str = Field(
        default="crm.",
        description="Comma-separated gRPC services a job may call: a full service name "
        "(`crm.assignment.v1.AssignmentService`), a prefix ending in `.` (`crm.`), or `*`.",
    )

    # -- pump ---------------------------------------------------------------------------
    pump_poll_s: float = Field(
        default=0.05,
        gt=0,
        le=10,
        description="How often the pump looks for due jobs and expired leases when idle.",
    )
    pump_lead_s: float = Field(
        default=1.0,
        ge=0,
        le=5,
        description="The pump hands a job to the workers up to this long before it is due "
        "(the worker holds it, claims it `worker_claim_ahead_s` before it is due and starts "
        "the call at the due time, never before): the hand-over (commits, Redis, Celery) is "
        "hidden from the lateness even when the machine is busy; 0: hand over when due.",
    )
    pump_coalesce_s: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="When the next job comes within the lead sooner than `pump_poll_s`, the "
        "pump wakes up then, but not sooner than this after its last tick: while jobs stream "
        "in, the pump ticks every `pump_coalesce_s` and jobs due close together travel in "
        "one message (fewer ticks, fuller messages; a job scheduled to run at once may then "
        "wait this long to be picked up).",
    )
    pump_batch: int = Field(
        default=500, ge=1, le=5000, description="Jobs moved per pump transaction."
    )
    pump_message_jobs: int = Field(
        default=50,
        ge=1,
        le=1000,
        description="Most jobs in one Celery message. The jobs of a pump transaction are "
        "split evenly into as few messages as this allows; a worker claims, calls (all at "
        "once) and records a message's jobs together, so Celery's and MySQL's cost per "
        "message is shared by its jobs. 1: one message per job.",
    )
    pump_max_in_flight: int = Field(
        default=2000,
        ge=1,
        description="At most this many jobs ENQUEUED or RUNNING at once: bounds how long a "
        "message waits in Redis, so a healthy queue never outlives its lease.",
    )
    enqueue_lease_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="An ENQUEUED job no worker claimed within this time is sent again "
        "(its message was lost: Redis flushed or restarted, pump died before sending).",
    )
    run_lease_grace_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="A RUNNING job whose worker did not record a result by its attempt "
        "deadline plus this grace counts as a failed attempt (worker died) and is retried.",
    )
    pump_health_port: int = Field(
        default=50054, ge=0, le=65535, description="gRPC health port of the pump."
    )
    pump_metrics_port: int = Field(
        default=9154, ge=-1, le=65535, description="Prometheus port of the pump; -1: off."
    )

    # -- worker -------------------------------------------------------------------------
    worker_pool: WorkerPool = Field(
        default="threads",
        description="Celery pool of a worker process: `threads` (default; metrics cover "
        "every job), `solo`, or `prefork` (metrics then miss the child processes).",
    )
    worker_concurrency: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Messages one worker process runs at once (each of up to "
        "`pump_message_jobs` jobs whose calls run concurrently).",
    )
    worker_claim_ahead_s: float = Field(
        default=0.25,
        ge=0,
        le=5,
        description="A worker claims a held job (RUNNING: from then on Cancel answers "
        "FAILED_PRECONDITION) up to this long before it is due, so that only the call is "
        "left for the due time; until then the job can still be cancelled.",
    )
    worker_claim_coalesce_s: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="A worker's claims are at least this far apart (one transaction for the "
        "jobs of that span); a job is still claimed at least `worker_claim_ahead_s` minus "
        "this before it is due.",
    )
    worker_result_flush_s: float = Field(
        default=0.05,
        ge=0,
        le=5,
        description="A worker records the results of its finished calls together, one "
        "transaction at most this often (group commit).",
    )
    worker_max_held: int = Field(
        default=20_000,
        ge=1,
        description="Most jobs a worker process holds (received, not yet called); beyond, it "
        "stops taking messages until calls start. The pump's `pump_max_in_flight` bounds "
        "them too.",
    )
    worker_health_port: int = Field(
        default=50055, ge=0, le=65535, description="gRPC health port of a worker."
    )
    worker_metrics_port: int = Field(
        default=9155, ge=-1, le=65535, description="Prometheus port of a worker; -1: off."
    )

    @field_validator("allowed_target_services")
    @classmethod
    def _check_allowed(cls, value: str) -> str:
        if not [s for s in value.split(",") if s.strip()]:
            raise ValueError("at least one service (or `*`) is needed")
        return value

    @property
    def allowed_services(self) -> tuple[str, ...]:
        """``allowed_target_services`` as a tuple of entries."""
        return tuple(s.strip() for s in self.allowed_target_services.split(",") if s.strip())

    def for_pump(self) -> SchedulerSettings:
        """These settings with the pump's health and metrics ports as server ports."""
        return self.model_copy(
            update={"port": self.pump_health_port, "metrics_port": self.pump_metrics_port}
        )

    def for_worker(self) -> SchedulerSettings:
        """These settings with the worker's health and metrics ports as server ports."""
        return self.model_copy(
            update={"port": self.worker_health_port, "metrics_port": self.worker_metrics_port}
        )
