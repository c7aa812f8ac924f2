"""The dev schema registry's storage (MySQL/MariaDB through SQLAlchemy 2 + PyMySQL)."""

from crm_common.db import make_engine as _make_engine
from sqlalchemy import Engine

from crm_bilog.store.registry import RegistryStore

__all__ = ["RegistryStore", "make_engine"]


def make_engine(url: str, pool_size: int) -> Engine:
    """The shared engine with the server's default lock wait (the registry's writes are
    rare single-row inserts)."""
    return _make_engine(url, pool_size, lock_wait_timeout_s=None)
