"""Keyset page tokens over an ascending id (pure): the one token shape every service's
id-ordered list uses.

A token is the urlsafe base64 of ``{"f": filter hash, "i": last id}`` (compact JSON,
sorted keys); the next page holds the rows with a greater id. ``f`` binds the token to
the filters it was issued for. A token that does not decode to exactly this shape, is
too long, or carries another filter hash is refused with :class:`BadPageToken`.
"""

from __future__ import annotations

import base64
import binascii
import json

__all__ = ["BadPageToken", "decode_id_token", "encode_id_token"]

MAX_ID_TOKEN_CHARS = 256
_FOREIGN = "page token is not a token this service issued"


class BadPageToken(ValueError):
    """The page token is malformed or belongs to other filters."""


def encode_id_token(last_id: int, filters_hash: str) -> str:
    """The token of the page after the row ``last_id``, for filters hashed ``filters_hash``."""
    raw = json.dumps({"i": last_id, "f": filters_hash}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(raw.encode()).decode("ascii")


def decode_id_token(token: str, filters_hash: str) -> int:
    """The last id of the previous page; :class:`BadPageToken` when ``token`` is not one
    :func:`encode_id_token` made for these filters."""
    if len(token) > MAX_ID_TOKEN_CHARS:
        raise BadPageToken("page token is too long")
    try:
        body = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError) as exc:
        raise BadPageToken(_FOREIGN) from exc
    if not isinstance(body, dict) or set(body) != {"i", "f"}:
        raise BadPageToken(_FOREIGN)
    last_id, fh = body["i"], body["f"]
    if type(last_id) is not int or not 0 < last_id < 2**63 or not isinstance(fh, str):
        raise BadPageToken(_FOREIGN)
    if fh != filters_hash:
        raise BadPageToken("page token was issued for other filters")
    return last_id
