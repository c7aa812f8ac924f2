"""The dev schema registry's storage (MySQL/MariaDB through SQLAlchemy 2 + PyMySQL)."""

from crm_bilog.store.db import make_engine
from crm_bilog.store.registry import RegistryStore

__all__ = ["RegistryStore", "make_engine"]
