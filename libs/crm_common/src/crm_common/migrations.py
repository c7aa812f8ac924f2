"""Alembic migrations shipped inside a service's package, the same way in every service.

A service keeps its scripts in ``<package>/migrations`` (they ship with the wheel and
the image; no ini file at run time). Its ``migrations/env.py`` is two lines::

    from crm_common.migrations import run_env
    run_env(Base.metadata, "CRM_<SVC>_DATABASE_URL")

and its ``store/migrate.py`` exposes ``upgrade``/``downgrade``/``alembic_config`` of a
:class:`Migrations` over that folder (``python -m crm_<svc> migrate`` and the tests use
them).
"""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command, context
from alembic.config import Config
from sqlalchemy import MetaData, create_engine, pool

__all__ = ["Migrations", "run_env"]


class Migrations:
    """Upgrade/downgrade a database with the Alembic scripts under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def alembic_config(self, database_url: str) -> Config:
        """An Alembic ``Config`` for ``database_url`` over the packaged scripts."""
        cfg = Config()
        cfg.set_main_option("script_location", str(self.directory))
        # not an ini option: no %-interpolation of the URL
        cfg.attributes["url"] = database_url
        return cfg

    def upgrade(self, database_url: str, revision: str = "head") -> None:
        """Migrate the database up to ``revision`` (default: the newest)."""
        command.upgrade(self.alembic_config(database_url), revision)

    def downgrade(self, database_url: str, revision: str) -> None:
        """Migrate the database down to ``revision`` (``base`` removes every table)."""
        command.downgrade(self.alembic_config(database_url), revision)


def run_env(metadata: MetaData, url_env: str) -> None:
    """The body of a service's Alembic ``env.py``.

    The URL is taken, in order, from ``config.attributes["url"]`` (set by
    :class:`Migrations`), from the environment variable ``url_env``, then from
    ``sqlalchemy.url`` of an ini file. ``metadata`` is the ORM metadata, so ``alembic
    revision --autogenerate`` diffs against the models (review its output by hand).
    """
    config = context.config
    url = str(
        config.attributes.get("url")
        or os.environ.get(url_env)
        or config.get_main_option("sqlalchemy.url")
    )
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=metadata, literal_binds=True, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=metadata, compare_type=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()
