"""Persistence of the assignment service (SQLAlchemy 2, MySQL/MariaDB, synchronous)."""

from crm_common.db import make_engine

from crm_assignment.store.repository import AssignmentStore

__all__ = ["AssignmentStore", "make_engine"]
