"""Alembic environment of the recommendation database (see ``crm_common.migrations.run_env``)."""

from crm_common.migrations import run_env
from crm_recommendation.store.schema import Base

run_env(Base.metadata, "CRM_RECOMMENDATION_DATABASE_URL")
