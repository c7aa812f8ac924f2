"""Alembic environment of the scheduler database.

The URL is taken, in order, from ``config.attributes["url"]`` (set by
``crm_scheduler.store.migrate``), from ``CRM_SCHEDULER_DATABASE_URL``, then from
``sqlalchemy.url`` of the ini file. ``target_metadata`` is the ORM metadata, so
``alembic revision --autogenerate`` diffs against the models (review its output by hand).
"""

from __future__ import annotations

import os

from alembic import context
from crm_scheduler.store.schema import Base
from sqlalchemy import create_engine, pool

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or os.environ.get("CRM_SCHEDULER_DATABASE_URL")
    return str(url or config.get_main_option("sqlalchemy.url"))


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection, target_metadata=target_metadata, compare_type=True
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
