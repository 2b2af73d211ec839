"""What every blueprint shares: the services the factory built, JSON errors, the read token."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from flask import Response, current_app, jsonify, request
from rq import Queue

from callstate.config import Settings
from callstate.store import Store


@dataclass(frozen=True)
class Services:
    settings: Settings
    store: Store
    queue: Queue


def services() -> Services:
    found: Services = current_app.extensions["callstate"]
    return found


def error(status: int, code: str, message: str, **extra: Any) -> tuple[Response, int]:
    return jsonify({"error": code, "message": message, **extra}), status


def require_read_token() -> tuple[Response, int] | None:
    """A blueprint's `before_request`: with CALLSTATE_API_TOKEN set, reads need it as a bearer
    token (compared in constant time)."""
    token = services().settings.api_token
    if token is None:
        return None
    sent = request.headers.get("Authorization", "")
    expected = f"Bearer {token}"
    if not hmac.compare_digest(sent.encode(), expected.encode()):
        return error(401, "unauthorized", "send Authorization: Bearer <CALLSTATE_API_TOKEN>")
    return None
