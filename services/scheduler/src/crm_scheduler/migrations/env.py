"""Alembic environment of the scheduler database (see ``crm_common.migrations.run_env``)."""

from crm_common.migrations import run_env
from crm_scheduler.store.schema import Base

run_env(Base.metadata, "CRM_SCHEDULER_DATABASE_URL")
