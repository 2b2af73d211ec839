"""Stringee request signing: base64(HMAC-SHA1(secret, raw body)) in X-STRINGEE-SIGNATURE."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping

SIGNATURE_HEADER = "X-STRINGEE-SIGNATURE"


def sign(secret: str, raw: bytes) -> str:
    digest = hmac.new(secret.encode(), raw, hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def matching_signers(
    signers: Mapping[int | None, tuple[str, ...]], raw: bytes, received: str | None
) -> set[int | None]:
    """Whose secrets signed the raw bytes exactly as they arrived: project ids, or None for the
    deployment-wide secrets (two during a rotation). Every secret is compared, each in constant
    time, so timing tells nothing about which came close."""
    if not received:
        return set()
    sent = received.strip().encode()
    return {
        scope
        for scope, secrets in signers.items()
        for secret in secrets
        if hmac.compare_digest(sign(secret, raw).encode(), sent)
    }
