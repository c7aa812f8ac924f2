"""Keyset paging of List: the opaque page token (pure).

A token is the urlsafe base64 of ``{"i": last internal id, "f": filter hash}`` (compact
JSON). The next page holds the jobs with a larger id (creation order). A token that does
not decode to exactly this shape, or carries another filter hash, is refused with
:class:`BadPageToken` (``crm_common.paging``: the token shape every id-ordered list uses).
"""

from __future__ import annotations

import hashlib
import json

from crm_common.paging import BadPageToken, decode_id_token, encode_id_token

from crm_scheduler.domain.model import JobFilter

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "BadPageToken", "decode_token", "encode_token"]

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


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
    return encode_id_token(last_id, filter_hash(f))


def decode_token(token: str, f: JobFilter) -> int:
    """The last id of the previous page."""
    return decode_id_token(token, filter_hash(f))
