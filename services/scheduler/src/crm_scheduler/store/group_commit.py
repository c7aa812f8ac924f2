"""``GroupCommitter``: many single-row conditional UPDATEs, one commit.

A worker's execution slots each need a durable claim before calling a target and a
durable result after; at one commit (one fsync) each, the database's commit rate caps
the whole scheduler. The committer runs the UPDATEs queued by every slot of a process
in one transaction on its own thread (in job id order, so two batches never deadlock on
each other), commits once, then wakes each caller with its own outcome (row updated or
not). Semantics are unchanged: a caller returns only after its UPDATE is committed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from crm_common.db import ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT, mysql_errno
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

__all__ = ["GroupCommitter"]

log = logging.getLogger("crm.scheduler.store")

_RETRY_ERRNOS = frozenset({ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT})


@dataclass
class _Op:
    job_id: int
    stmt: Any
    params: dict[str, object] | None
    done: threading.Event = field(default_factory=threading.Event)
    updated: bool = False
    error: BaseException | None = None


class GroupCommitter:
    """Batches conditional single-row UPDATEs into shared transactions (thread-safe)."""

    def __init__(self, engine: Engine, max_batch: int = 64, attempts: int = 3) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._attempts = attempts
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.batches = 0
        self.ops = 0

    def execute(self, job_id: int, stmt: Any, params: dict[str, object] | None = None) -> bool:
        """Runs ``stmt`` (an UPDATE of the row ``job_id``) in the next batch; returns
        whether it updated one row, once that is committed. Raises what the batch raised."""
        self._ensure_thread()
        op = _Op(job_id, stmt, params)
        self._queue.put(op)
        op.done.wait()
        if op.error is not None:
            raise op.error
        return op.updated

    def close(self) -> None:
        with self._lock:
            self._closed = True
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(10)

    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._closed:
                raise RuntimeError("the group committer is closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="crm-group-commit", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            ops = [first]
            stop = False
            while len(ops) < self._max_batch:
                try:
                    op = self._queue.get_nowait()
                except queue.Empty:
                    break
                if op is None:
                    stop = True
                    break
                ops.append(op)
            self._commit(ops)
            if stop:
                return

    def _commit(self, ops: list[_Op]) -> None:
        ops.sort(key=lambda o: o.job_id)
        for attempt in range(1, self._attempts + 1):
            try:
                with self._engine.begin() as conn:
                    results = [conn.execute(op.stmt, op.params).rowcount == 1 for op in ops]
            except OperationalError as exc:
                if mysql_errno(exc) in _RETRY_ERRNOS and attempt < self._attempts:
                    time.sleep(0.01 * attempt)
                    continue
                self._fail(ops, exc)
                return
            except Exception as exc:
                self._fail(ops, exc)
                return
            for op, updated in zip(ops, results, strict=True):
                op.updated = updated
                op.done.set()
            self.batches += 1
            self.ops += len(ops)
            return

    @staticmethod
    def _fail(ops: list[_Op], exc: BaseException) -> None:
        log.warning("a batch of %d updates failed: %s: %s", len(ops), type(exc).__name__, exc)
        for op in ops:
            op.error = exc
            op.done.set()
