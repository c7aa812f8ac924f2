"""ListAgents: its filters and the keyset page token (pure).

Agents are listed by id ascending; the page token is ``crm_common.paging``'s id token
(last agent id + filter hash), refused with its
:class:`~crm_common.paging.BadPageToken` (as ListTasks' tokens are).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from crm_common.paging import decode_id_token, encode_id_token

from crm_assignment.domain.model import BusinessLine, Presence

__all__ = ["AgentCursor", "AgentFilter"]


@dataclass(frozen=True, slots=True)
class AgentFilter:
    """ListAgents filters (all optional, combined with AND)."""

    business_line: BusinessLine | None = None
    presences: tuple[Presence, ...] = ()

    def hash(self) -> str:
        """A short stable hash of the normalized filters."""
        body = {
            "line": int(self.business_line) if self.business_line else 0,
            "presences": sorted({int(p) for p in self.presences}),
        }
        raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
        return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class AgentCursor:
    """Position after the last agent of a page."""

    id: int

    def encode(self, filters_hash: str) -> str:
        return encode_id_token(self.id, filters_hash)

    @classmethod
    def decode(cls, token: str, filters_hash: str) -> AgentCursor:
        return cls(id=decode_id_token(token, filters_hash))
