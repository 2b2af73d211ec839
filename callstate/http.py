"""What every blueprint shares: the services the factory built, JSON errors, the read token."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from flask import Response, current_app, g, jsonify, request
from redis.exceptions import ConnectionError as RedisConnectionError
from rq import Queue

from callstate.config import Settings
from callstate.store import Store

# The cookie that carries the read token for a browser (set by the board's `GET /?token=`).
TOKEN_COOKIE = "callstate_token"  # noqa: S105 - a name, not a secret


@dataclass(frozen=True)
class Services:
    settings: Settings
    store: Store
    queue: Queue


def services() -> Services:
    found: Services = current_app.extensions["callstate"]
    return found


def mark_store_unchecked() -> None:
    """This request's check of the store's layout met a Redis that did not answer."""
    g.store_unchecked = True


def require_checked_store() -> None:
    """Before a write: raise as an unanswering Redis does when this request could not check the
    store's layout, so nothing is written beside a store that may need `migrate-keys`."""
    if g.get("store_unchecked", False):
        raise RedisConnectionError("the store's layout could not be checked")


def error(status: int, code: str, message: str, **extra: Any) -> tuple[Response, int]:
    return jsonify({"error": code, "message": message, **extra}), status


def require_read_token() -> tuple[Response, int] | None:
    """A blueprint's `before_request`: with CALLSTATE_API_TOKEN set, reads need it as a bearer
    token, or as the cookie a browser got from `GET /?token=` (compared in constant time)."""
    token = services().settings.api_token
    if token is None:
        return None
    bearer = request.headers.get("Authorization", "")
    cookie = request.cookies.get(TOKEN_COOKIE, "")
    if hmac.compare_digest(bearer.encode(), f"Bearer {token}".encode()):
        return None
    if hmac.compare_digest(cookie.encode("utf-8", "replace"), token.encode()):
        return None
    return error(
        401,
        "unauthorized",
        f"send Authorization: Bearer <CALLSTATE_API_TOKEN>, or the {TOKEN_COOKIE} cookie "
        "that GET /?token=<CALLSTATE_API_TOKEN> sets",
    )
