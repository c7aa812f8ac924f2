"""Persistence of the scheduler (MySQL/MariaDB): the record of every job."""

from crm_scheduler.store.db import make_engine
from crm_scheduler.store.repository import ReapResult, SchedulerStore

__all__ = ["ReapResult", "SchedulerStore", "make_engine"]
