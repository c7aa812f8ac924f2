"""Who is calling: the one place the agent console's bearer tokens are checked.

A call carrying ``authorization: Bearer <token>`` metadata comes from an agent's console:
the token (``domain/token.py``, issued by SignIn) names the agent. A call without that
header is a service-to-service call and is trusted (as before tokens existed; keep the
service's port inside the cluster). The servicer asks :class:`AgentAuth`:

- :meth:`AgentAuth.caller`: the calling agent's id, or None for a service call;
  UNAUTHENTICATED for a malformed, wrongly signed or expired token, or another scheme;
- :meth:`AgentAuth.require_self`: an agent may only act as itself (its offer stream,
  offers, tasks, presence, call records): PERMISSION_DENIED otherwise;
- :meth:`AgentAuth.require_service`: RPCs agents never call (CreateClue, UpsertAgent,
  CancelTask, ...): PERMISSION_DENIED for an agent token.

Reads are narrowed by the servicer itself: ListTasks lists only the caller's tasks, and
GetTask answers NOT_FOUND (not PERMISSION_DENIED: the id's existence is not revealed) for
a task never offered to the caller (``rules.visible_to_agent``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from crm_common.errors import PermissionDenied, Unauthenticated

from crm_assignment.domain.model import Clock
from crm_assignment.domain.token import InvalidToken, TokenSigner

if TYPE_CHECKING:
    from grpc import aio

    Context = aio.ServicerContext[Any, Any]
else:
    Context = Any

__all__ = ["AUTHORIZATION_KEY", "AgentAuth", "bearer_metadata"]

AUTHORIZATION_KEY = "authorization"


def bearer_metadata(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying ``token`` (for clients and tests)."""
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),)


class AgentAuth:
    """Checks the caller of a call against what it asks (see module doc)."""

    def __init__(self, signer: TokenSigner, clock: Clock) -> None:
        self.signer = signer
        self._clock = clock

    def caller(self, context: Context) -> int | None:
        """The agent id of the call's token; None when the call carries no token."""
        header: str | None = None
        for key, value in context.invocation_metadata() or ():
            if key == AUTHORIZATION_KEY:
                header = value.decode("ascii", "replace") if isinstance(value, bytes) else value
                break
        if header is None:
            return None
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                "authorization must be 'Bearer <token>' (a token from SignIn)",
                reason="BAD_AUTHORIZATION",
            )
        try:
            return self.signer.verify(token.strip(), self._clock())
        except InvalidToken as exc:
            raise Unauthenticated(f"{exc}: sign in again", reason="INVALID_TOKEN") from exc

    def require_self(self, context: Context, agent_id: int) -> int | None:
        """Let an agent act only as itself; returns the caller (None: a service)."""
        caller = self.caller(context)
        if caller is not None and caller != agent_id:
            raise PermissionDenied(
                f"signed in as agent {caller}: cannot act for agent {agent_id}",
                reason="NOT_THIS_AGENT",
            )
        return caller

    def require_service(self, context: Context, rpc: str) -> None:
        """Refuse an agent token on a service-only RPC."""
        caller = self.caller(context)
        if caller is not None:
            raise PermissionDenied(
                f"{rpc} is not available to agents (signed in as agent {caller})",
                reason="SERVICE_ONLY",
            )
