"""Settings of the config-admin server (``CRM_CONFIG_ADMIN_*``) and of crmctl (``CRM_CTL_*``)."""

from __future__ import annotations

import getpass

from crm_common.settings import ServiceSettings, parse_endpoints
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ConfigAdminSettings", "CtlSettings"]


class ConfigAdminSettings(ServiceSettings):
    """Environment: ``CRM_CONFIG_ADMIN_<FIELD>`` (e.g. ``CRM_CONFIG_ADMIN_ETCD_ENDPOINTS``)."""

    model_config = SettingsConfigDict(
        env_prefix="CRM_CONFIG_ADMIN_", extra="ignore", validate_default=True
    )

    port: int = Field(default=50056, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(
        default=9156,
        ge=-1,
        le=65535,
        description="Prometheus /metrics HTTP port; 0 picks a free one, -1 disables it.",
    )
    history_limit: int = Field(
        default=10,
        ge=1,
        le=100,
        description="Past versions kept per key (as the operator's CRM_OPERATOR_HISTORY_LIMIT).",
    )


def _default_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


class CtlSettings(BaseSettings):
    """Environment of ``crmctl``: ``CRM_CTL_<FIELD>``; every one also has a flag."""

    model_config = SettingsConfigDict(env_prefix="CRM_CTL_", extra="ignore", validate_default=True)

    assignment_target: str = Field(
        default="127.0.0.1:50051", description="host:port of the assignment service."
    )
    scheduler_target: str = Field(
        default="127.0.0.1:50053", description="host:port of the scheduler service."
    )
    etcd_endpoints: str = Field(
        default="127.0.0.1:2379",
        description="etcd endpoints of the live configuration (crmctl config), host:port,...",
    )
    config_prefix: str = Field(
        default="/crm/config", description="etcd key prefix of the live configuration."
    )
    history_limit: int = Field(
        default=10, ge=1, le=100, description="Past versions kept per key when crmctl writes."
    )
    user: str = Field(
        default_factory=_default_user,
        min_length=1,
        description="Author recorded in the config history (default: the login name).",
    )
    timeout_s: float = Field(default=10.0, gt=0, description="Deadline of one call.")

    @field_validator("etcd_endpoints")
    @classmethod
    def _check_endpoints(cls, value: str) -> str:
        parse_endpoints(value)
        return value
