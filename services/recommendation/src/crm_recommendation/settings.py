"""Settings of the recommendation service, from ``CRM_RECOMMENDATION_*`` environment
variables (the live ranking weights are not settings: they come from etcd, see
``config``)."""

from __future__ import annotations

from crm_common.settings import ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict

__all__ = ["RecommendationSettings"]


class RecommendationSettings(ServiceSettings):
    """Environment: ``CRM_RECOMMENDATION_<FIELD>`` (e.g. ``CRM_RECOMMENDATION_DATABASE_URL``)."""

    model_config = SettingsConfigDict(
        env_prefix="CRM_RECOMMENDATION_", extra="ignore", validate_default=True
    )

    port: int = Field(default=50052, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(
        default=9152,
        ge=-1,
        le=65535,
        description="Prometheus /metrics HTTP port; 0 picks a free one, -1 disables it.",
    )
    database_url: str = Field(
        default="mysql+pymysql://crm:crm@127.0.0.1:3306/crm_recommendation",
        description="SQLAlchemy URL of the recommendation database (MySQL/MariaDB via PyMySQL).",
    )
    db_pool_size: int = Field(
        default=8,
        ge=1,
        le=200,
        description="Connections in the pool; the blocking executor gets as many threads.",
    )
    refresh_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=300,
        description="How often the index reads changes written through other replicas "
        "(replicas converge within about this long).",
    )
    popularity_half_life_days: float = Field(
        default=14.0,
        gt=0,
        le=3650,
        description="Half-life of an interaction's weight in popularity. Baked into the "
        "index: changing it takes a restart.",
    )
    max_customer_cars: int = Field(
        default=200,
        ge=2,
        le=100_000,
        description="Customers with more distinct cars than this (dealers, bots) are left "
        "out of co-occurrence.",
    )

    @property
    def recommendation_config_prefix(self) -> str:
        """The etcd prefix of the live config: ``<config_prefix>/recommendation/``."""
        return self.config_prefix.rstrip("/") + "/recommendation/"
