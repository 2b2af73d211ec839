"""Stringee request signing: base64(HMAC-SHA1(secret, raw body)) in X-STRINGEE-SIGNATURE."""

from __future__ import annotations

import base64
import hashlib
import hmac

SIGNATURE_HEADER = "X-STRINGEE-SIGNATURE"


def sign(secret: str, raw: bytes) -> str:
    digest = hmac.new(secret.encode(), raw, hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def signature_matches(secret: str, raw: bytes, received: str | None) -> bool:
    """Compare in constant time, on the raw bytes exactly as they arrived."""
    if not received:
        return False
    return hmac.compare_digest(sign(secret, raw).encode(), received.strip().encode())
