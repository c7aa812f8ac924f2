"""Keyset paging of ListTasks: the opaque page token (pure).

A token is the urlsafe base64 of ``{"c": last created_at, "i": last id, "f": filter hash}``
(compact JSON). The next page holds the tasks strictly after ``(c, i)`` in the order
``created_at desc, id desc``. ``f`` binds the token to the filters it was issued for; a
token that does not decode to exactly this shape, or that carries another filter hash, is
refused with :class:`BadPageToken`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from crm_common.paging import BadPageToken

from crm_assignment.domain.model import TaskFilter

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "BadPageToken", "Cursor", "filter_hash"]

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
_MAX_TOKEN_CHARS = 512


@dataclass(frozen=True, slots=True)
class Cursor:
    """Position after the last task of a page."""

    created_at: datetime
    id: int

    def encode(self, filters_hash: str) -> str:
        body = {"c": self.created_at.isoformat(), "i": self.id, "f": filters_hash}
        raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
        return base64.urlsafe_b64encode(raw).decode("ascii")

    @classmethod
    def decode(cls, token: str, filters_hash: str) -> Cursor:
        if len(token) > _MAX_TOKEN_CHARS:
            raise BadPageToken("page token is too long")
        try:
            raw = base64.urlsafe_b64decode(token.encode("ascii"))
            body = json.loads(raw)
        except (ValueError, binascii.Error, UnicodeError) as exc:
            raise BadPageToken("page token is not a token this service issued") from exc
        if not isinstance(body, dict) or set(body) != {"c", "i", "f"}:
            raise BadPageToken("page token is not a token this service issued")
        c, i, f = body["c"], body["i"], body["f"]
        if not isinstance(c, str) or not isinstance(f, str):
            raise BadPageToken("page token is not a token this service issued")
        if type(i) is not int or not 0 < i < 2**63:
            raise BadPageToken("page token is not a token this service issued")
        try:
            created_at = datetime.fromisoformat(c)
        except ValueError as exc:
            raise BadPageToken("page token is not a token this service issued") from exc
        if created_at.tzinfo is None or created_at.utcoffset() != UTC.utcoffset(None):
            raise BadPageToken("page token is not a token this service issued")
        if created_at.year < 1970:
            raise BadPageToken("page token is not a token this service issued")
        if f != filters_hash:
            raise BadPageToken("page token was issued for other filters")
        return cls(created_at=created_at, id=i)


def filter_hash(f: TaskFilter) -> str:
    """A short stable hash of the normalized filters."""
    body = {
        "line": int(f.business_line) if f.business_line else 0,
        "category": int(f.category) if f.category else 0,
        "statuses": sorted({int(s) for s in f.statuses}),
        "agent": f.agent_id or 0,
        "city": f.city or "",
        "from": f.created_from.isoformat() if f.created_from else "",
        "to": f.created_to.isoformat() if f.created_to else "",
    }
    raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:16]
