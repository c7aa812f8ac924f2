"""Phone numbers: normalization, masking, keyed hash and encryption (pure computation).

The clear number only lives in memory while a request is handled: the database keeps the
HMAC-SHA256 (unique lookup), the AES-GCM ciphertext (for a future authorized reveal, e.g.
dialing through the telephony provider) and the masked form. Nothing here logs.
"""

from __future__ import annotations

import hmac
import os
import re

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crm_assignment.domain.model import ProtectedPhone

__all__ = ["PhoneProtector", "mask_phone", "normalize_phone"]

_PHONE = re.compile(r"\+?[0-9]{7,15}")
_SEPARATORS = str.maketrans("", "", " -")
_AAD = b"crm.assignment.customer.phone.v1"
_NONCE_BYTES = 12


def normalize_phone(raw: str) -> str | None:
    """The canonical digits of a phone number, or None when it is not one.

    Spaces and dashes are dropped; what remains must be 7..15 digits with an optional
    leading ``+``. The ``+`` is dropped too (``+8613812341234`` and ``8613812341234`` are
    the same customer); no country code is guessed.
    """
    compact = raw.translate(_SEPARATORS)
    if not _PHONE.fullmatch(compact):
        return None
    return compact.removeprefix("+")


def mask_phone(digits: str) -> str:
    """``13812341234`` -> ``138****1234``: at most 3 leading and 4 trailing digits stay,
    and at least 4 digits are always hidden (shorter numbers show fewer digits)."""
    n = len(digits)
    head = max(0, min(3, (n - 4) // 2))
    tail = max(0, min(4, n - 4 - head))
    return digits[:head] + "****" + (digits[n - tail :] if tail else "")


class PhoneProtector:
    """Turns a normalized number into the forms that may be stored."""

    def __init__(self, hash_key: bytes, encryption_key: bytes) -> None:
        if len(hash_key) < 16:
            raise ValueError("the phone hash key must be at least 16 bytes")
        if len(encryption_key) not in (16, 24, 32):
            raise ValueError("the phone encryption key must be 16, 24 or 32 bytes (AES)")
        self._hash_key = hash_key
        self._aead = AESGCM(encryption_key)

    def hash_hex(self, digits: str) -> str:
        # hmac.digest: one C call (OpenSSL's one-shot HMAC), the same value as hmac.new(...)
        return hmac.digest(self._hash_key, digits.encode("ascii"), "sha256").hex()

    def encrypt(self, digits: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, digits.encode("ascii"), _AAD)

    def decrypt(self, blob: bytes) -> str:
        """The clear number (for an authorized reveal; never returned by the API today)."""
        nonce, sealed = blob[:_NONCE_BYTES], blob[_NONCE_BYTES:]
        return self._aead.decrypt(nonce, sealed, _AAD).decode("ascii")

    def protect(self, digits: str) -> ProtectedPhone:
        return ProtectedPhone(
            hash_hex=self.hash_hex(digits),
            encrypted=self.encrypt(digits),
            masked=mask_phone(digits),
        )
