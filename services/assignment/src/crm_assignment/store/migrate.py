"""Schema migrations (Alembic), run by ``python -m crm_assignment migrate`` and the tests.

The scripts live in the package (``crm_assignment/migrations``), so they ship with the wheel
and the container image; see ``crm_common.migrations``.
"""

from __future__ import annotations

from pathlib import Path

from crm_common.migrations import Migrations

__all__ = ["MIGRATIONS_DIR", "alembic_config", "downgrade", "upgrade"]

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_MIGRATIONS = Migrations(MIGRATIONS_DIR)
alembic_config = _MIGRATIONS.alembic_config
upgrade = _MIGRATIONS.upgrade
downgrade = _MIGRATIONS.downgrade
