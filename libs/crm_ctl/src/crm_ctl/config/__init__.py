"""The config-admin library: read, validate and write the live configuration in etcd."""

from crm_ctl.config.admin import (
    CONFLICT_REASON,
    MANAGED_REASON,
    AppliedVersion,
    ConfigAdmin,
    Current,
    InstanceState,
    KeySummary,
    RolloutState,
    SetResult,
    Source,
    Version,
)
from crm_ctl.config.diff import Change, ChangeKind, diff

__all__ = [
    "CONFLICT_REASON",
    "MANAGED_REASON",
    "AppliedVersion",
    "Change",
    "ChangeKind",
    "ConfigAdmin",
    "Current",
    "InstanceState",
    "KeySummary",
    "RolloutState",
    "SetResult",
    "Source",
    "Version",
    "diff",
]
