"""Alembic environment of the schema registry database (``crm_common.migrations``)."""

from crm_bilog.store.schema import Base
from crm_common.migrations import run_env

run_env(Base.metadata, "CRM_BILOG_DATABASE_URL")
