"""PII protection of event fields marked in the Avro schemas (``"pii": "mask"|"hash"``).

``mask`` keeps at most 3 leading and 4 trailing characters and always hides at least 4
(``13812341234`` -> ``138****1234``); masking a masked value gives it back unchanged, so
bad rows (already masked) can be replayed. ``hash`` is a keyed HMAC-SHA256 (hex) of the
value with spaces, dashes and a leading ``+`` removed, so events join on it without
carrying the number. Nothing here logs.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Literal

__all__ = ["REDACTED", "PiiKind", "PiiPolicy", "mask_text"]

PiiKind = Literal["mask", "hash"]
PII_KINDS: tuple[str, ...] = ("mask", "hash")

REDACTED = "**redacted**"
"""What a bad row keeps of a value that might be personal data but cannot be protected
by its schema (fields unknown to the schema, PII fields of the wrong type)."""

_SEPARATORS = str.maketrans("", "", " -\t")


def mask_text(value: str) -> str:
    """``13812341234`` -> ``138****1234`` (see module doc); idempotent."""
    n = len(value)
    head = max(0, min(3, (n - 4) // 2))
    tail = max(0, min(4, n - 4 - head))
    return value[:head] + "****" + (value[n - tail :] if tail else "")


@dataclass(frozen=True, slots=True)
class PiiPolicy:
    """How marked fields are protected; ``enabled=False`` leaves them as they are (replay
    of bad rows, whose payload was protected when they were written)."""

    hash_key: bytes
    enabled: bool = True

    def apply(self, kind: str, value: str) -> str:
        if not self.enabled:
            return value
        if kind == "hash":
            digits = value.translate(_SEPARATORS).removeprefix("+")
            return hmac.new(self.hash_key, digits.encode("utf-8"), hashlib.sha256).hexdigest()
        return mask_text(value)

    def disabled(self) -> PiiPolicy:
        return PiiPolicy(self.hash_key, enabled=False)
