"""Alembic environment of the assignment database (see ``crm_common.migrations.run_env``)."""

from crm_assignment.store.schema import Base
from crm_common.migrations import run_env

run_env(Base.metadata, "CRM_ASSIGNMENT_DATABASE_URL")
