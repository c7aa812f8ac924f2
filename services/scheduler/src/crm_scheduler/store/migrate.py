"""Schema migrations (Alembic), run by ``python -m crm_scheduler migrate`` and the tests.

The migration scripts live in the package (``crm_scheduler/migrations``), so they ship
with the wheel and the container image; no ini file is needed at run time.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

__all__ = ["MIGRATIONS_DIR", "alembic_config", "downgrade", "upgrade"]

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str) -> Config:
    """An Alembic config for ``database_url`` over the packaged migrations."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = database_url  # not an ini option: no %-interpolation of the URL
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate the database up to ``revision`` (default: the newest)."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    """Migrate the database down to ``revision`` (``base`` removes every table)."""
    command.downgrade(alembic_config(database_url), revision)
