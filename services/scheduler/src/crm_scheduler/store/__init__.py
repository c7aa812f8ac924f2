"""Persistence of the scheduler (MySQL/MariaDB): the record of every job."""

from crm_common.db import make_engine as _make_engine
from sqlalchemy import Engine

from crm_scheduler.store.repository import Failure, ReapResult, SchedulerStore

__all__ = ["Failure", "ReapResult", "SchedulerStore", "make_engine"]


def make_engine(url: str, pool_size: int, *, lean: bool = False) -> Engine:
    """The shared engine with the server's default lock wait: the scheduler's statements
    are SKIP LOCKED scans and short claim/result transactions on a message's rows.
    ``lean`` (the pump and the workers, whose every use of the store is a transaction
    ended by ``TransactionRunner`` or a ping) saves the pre-ping and the reset round
    trips of each transaction (see :func:`crm_common.db.make_engine`)."""
    return _make_engine(url, pool_size, lock_wait_timeout_s=None, lean=lean)
