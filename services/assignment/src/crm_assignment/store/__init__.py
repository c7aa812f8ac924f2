"""Persistence of the assignment service (SQLAlchemy 2, MySQL/MariaDB, synchronous)."""

from crm_common.db import make_engine

from crm_assignment.store.repository import AssignmentStore, NoOffer

__all__ = ["AssignmentStore", "NoOffer", "make_engine"]
