"""Agent console tokens (pure: no I/O, the time is passed in).

A token is ``crm1.<agent_id>.<expires_unix_s>.<signature>``: the signature is the
base64url (unpadded) HMAC-SHA256, under the service's secret, of
``crm1.<agent_id>.<expires_unix_s>``. It names the agent and when it stops being valid;
nothing else (no session state on the server: any replica with the same secret accepts
it). Verification compares signatures in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from datetime import UTC, datetime

__all__ = ["InvalidToken", "TokenSigner"]

_VERSION = "crm1"
_SHAPE = re.compile(r"crm1\.([1-9][0-9]{0,18})\.([0-9]{1,12})\.([A-Za-z0-9_-]{43})")


class InvalidToken(Exception):
    """The token is malformed, wrongly signed or expired (``str()`` says which)."""


class TokenSigner:
    """Issues and verifies agent tokens with one HMAC secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the token secret must be at least 16 bytes")
        self._secret = secret

    def _sign(self, body: str) -> str:
        digest = hmac.new(self._secret, body.encode("ascii"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def issue(self, agent_id: int, expires_at: datetime) -> str:
        """A token for ``agent_id`` valid until ``expires_at`` (whole seconds, floored)."""
        if agent_id <= 0:
            raise ValueError("agent_id must be > 0")
        body = f"{_VERSION}.{agent_id}.{int(expires_at.timestamp())}"
        return f"{body}.{self._sign(body)}"

    def verify(self, token: str, now: datetime) -> int:
        """The agent id of a valid token; raises :class:`InvalidToken` otherwise."""
        m = _SHAPE.fullmatch(token)
        if m is None:
            raise InvalidToken("malformed token")
        agent_id, expires, signature = int(m[1]), int(m[2]), m[3]
        body = f"{_VERSION}.{m[1]}.{m[2]}"
        if not hmac.compare_digest(signature, self._sign(body)):
            raise InvalidToken("bad token signature")
        if now >= datetime.fromtimestamp(expires, UTC):
            raise InvalidToken("token expired")
        return agent_id
