"""Where the sink publishes files: a small interface with a local-directory
implementation (WebHDFS or S3 would implement the same three methods).

``publish`` is atomic: a reader (and the sink after a crash) sees a file completely or
not at all. Locally: write ``.<name>.<pid>.tmp`` in the target directory, fsync it,
rename it over the final name, fsync the directory (and any directory just created).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

__all__ = ["LocalStorage", "Storage"]


class Storage(Protocol):
    """Published files, by path relative to the storage root (``/``-separated)."""

    def publish(self, path: str, data: bytes) -> None:
        """Atomically create (or replace) ``path`` with ``data``, durably."""

    def list(self, prefix: str) -> Iterator[str]:
        """Published files under ``prefix`` (a directory), recursively."""

    def remove_temporary(self, prefix: str, stem_prefix: str) -> int:
        """Delete leftovers of interrupted publishes under ``prefix`` whose file name
        starts with ``stem_prefix``; returns how many."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage:
    """A directory on a local (or mounted) file system."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _mkdirs(self, directory: Path) -> None:
        missing = []
        d = directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        if not missing:
            return
        directory.mkdir(parents=True, exist_ok=True)
        for created in reversed(missing):  # make each new entry durable in its parent
            _fsync_dir(created.parent)

    def publish(self, path: str, data: bytes) -> None:
        final = self.root / path
        self._mkdirs(final.parent)
        tmp = final.parent / f".{final.name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)

    def list(self, prefix: str) -> Iterator[str]:
        base = self.root / prefix
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root)
            for name in filenames:
                if not name.startswith("."):
                    yield (rel / name).as_posix()

    def remove_temporary(self, prefix: str, stem_prefix: str) -> int:
        base = self.root / prefix
        removed = 0
        if not base.is_dir():
            return 0
        for dirpath, _, filenames in os.walk(base):
            for name in filenames:
                if name.startswith("." + stem_prefix) and name.endswith(".tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(dirpath, name))
                        removed += 1
        return removed
