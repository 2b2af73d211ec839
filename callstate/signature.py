"""Stringee request signing: base64(HMAC-SHA1(secret, raw body)) in X-STRINGEE-SIGNATURE."""

from __future__ import annotations

import base64
import hashlib
import hmac

SIGNATURE_HEADER = "X-STRINGEE-SIGNATURE"


def sign(secret: str, raw: bytes) -> str:
    digest = hmac.new(secret.encode(), raw, hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def signature_matches(secrets: tuple[str, ...], raw: bytes, received: str | None) -> bool:
    """Whether any of `secrets` (two during a rotation) signed the raw bytes exactly as they
    arrived; every secret is compared, each in constant time, so timing tells nothing."""
    if not received:
        return False
    sent = received.strip().encode()
    matches = [hmac.compare_digest(sign(secret, raw).encode(), sent) for secret in secrets]
    return any(matches)
