"""Keyset paging of List: the opaque page token (pure).

A token is the urlsafe base64 of ``{"i": last internal id, "f": filter hash}`` (compact
JSON). The next page holds the jobs with a larger id (creation order). A token that does
not decode to exactly this shape, or carries another filter hash, is refused with
:class:`BadPageToken`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json

from crm_scheduler.domain.model import JobFilter

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "BadPageToken", "decode_token", "encode_token"]

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
_MAX_TOKEN_CHARS = 256


class BadPageToken(ValueError):
    """The page token is malformed or belongs to other filters."""


def filter_hash(f: JobFilter) -> str:
    """A short stable hash of the filters."""
    body = {
        "s": sorted(int(s) for s in f.states),
        "n": f.name,
        "m": f.target_method,
        "a": f.target_address,
    }
    raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def encode_token(last_id: int, f: JobFilter) -> str:
    raw = json.dumps({"i": last_id, "f": filter_hash(f)}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(raw.encode()).decode("ascii")


def decode_token(token: str, f: JobFilter) -> int:
    """The last id of the previous page."""
    bad = "page token is not a token this service issued"
    if len(token) > _MAX_TOKEN_CHARS:
        raise BadPageToken("page token is too long")
    try:
        body = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError) as exc:
        raise BadPageToken(bad) from exc
    if not isinstance(body, dict) or set(body) != {"i", "f"}:
        raise BadPageToken(bad)
    last_id, fh = body["i"], body["f"]
    if type(last_id) is not int or not 0 < last_id < 2**63 or not isinstance(fh, str):
        raise BadPageToken(bad)
    if fh != filter_hash(f):
        raise BadPageToken("page token was issued for other filters")
    return last_id
