"""The HTTP side: the Stringee webhook that logs events, and the read-only lookups."""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from callstate import streamids
from callstate.calls import Doc, is_active
from callstate.config import Settings
from callstate.connection import connect
from callstate.doctor import warn_if_unsafe
from callstate.jobs import drain_timeout, enqueue_drain
from callstate.redact import mask_personal
from callstate.schema import CALL_ID_PATTERN, PayloadError, parse_event, project_id
from callstate.signature import SIGNATURE_HEADER, matching_signers
from callstate.store import Store

log = logging.getLogger(__name__)
QUARANTINE_PREVIEW_BYTES = 2048
MAX_PAGE = 500

webhooks = Blueprint("webhooks", __name__)
calls = Blueprint("calls", __name__)


@dataclass(frozen=True)
class Services:
    settings: Settings
    store: Store
    queue: Queue


def create_app(settings: Settings | None = None, redis: Redis | None = None) -> Flask:
    """Application factory: settings from the environment unless given, one Redis client."""
    settings = settings or Settings.from_env()
    redis = redis or connect(settings.redis_url)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["callstate"] = Services(
        settings, Store(redis, settings), Queue(settings.queue_name, connection=redis)
    )
    app.register_blueprint(webhooks)
    app.register_blueprint(calls)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(RedisError, _redis_down)
    warn_if_exposed(settings)
    warn_if_unsafe(redis)
    return app


def warn_if_exposed(settings: Settings) -> None:
    """Say loudly at start when anyone who can reach the port can forge events or read calls."""
    if not settings.exposed:
        return
    if not settings.signers:
        log.warning(
            "SECURITY: bound to %s without STRINGEE_SIGNING_SECRET: anyone who can reach this "
            "port can post call events",
            settings.host,
        )
    if settings.api_token is None:
        log.warning(
            "SECURITY: bound to %s without CALLSTATE_API_TOKEN: anyone who can reach this port "
            "can read calls and phone numbers",
            settings.host,
        )


def services() -> Services:
    found: Services = current_app.extensions["callstate"]
    return found


def error(status: int, code: str, message: str, **extra: Any) -> tuple[Response, int]:
    return jsonify({"error": code, "message": message, **extra}), status


def _http_error(exc: HTTPException) -> tuple[Response, int]:
    status = exc.code or 500
    code = (exc.name or "error").lower().replace(" ", "_")
    return error(status, code, exc.description or code)


def _redis_down(exc: RedisError) -> tuple[Response, int]:
    log.warning("redis unavailable: %s", exc)
    return error(503, "unavailable", "the call store is unavailable; retry later")


# Webhook ---------------------------------------------------------------------------------------


@webhooks.post("/webhooks/stringee")
def receive_event() -> tuple[Response, int]:
    svc = services()
    try:
        raw = request.get_data(cache=False)
    except RequestEntityTooLarge:
        return _refuse_too_large(svc.store, svc.settings.max_body_bytes)
    try:
        payload, signer = _checked_payload(svc.settings, raw)
    except PayloadError as exc:
        _quarantine(svc.store, raw, exc)
        return jsonify(exc.to_json()), exc.status
    call_id = payload["call_id"]
    try:
        log_id, shard, wake_id = svc.store.log.append_event(call_id, raw, signer)
    except RedisError as exc:
        log.warning("event for call %s not stored: %s", call_id, exc)
        # A timed-out append may still have run: the retry is then applied as a duplicate.
        return error(
            503, "unavailable", "the event store did not confirm the event; deliver it again"
        )
    if wake_id is not None:
        try:
            enqueue_drain(svc.queue, shard, drain_timeout(svc.settings), wake_id)
        except RedisError as exc:
            # The event is logged; maintenance wakes any shard left with a backlog.
            log.warning("event %s stored but drain of shard %s not queued: %s", log_id, shard, exc)
    log.debug("stored %s for call %s as %s", payload.get("call_status"), call_id, log_id)
    return jsonify({"status": "stored", "call_id": call_id, "log_id": log_id}), 200


def _checked_payload(settings: Settings, raw: bytes) -> tuple[dict[str, Any], int | None]:
    """The validated body, and the project whose own secret signed it (None when a
    deployment-wide secret did, or nothing is signed)."""
    if request.mimetype != "application/json":
        raise PayloadError(
            415,
            "unsupported_media_type",
            "Content-Type must be application/json (Stringee posts JSON; form-encoded and "
            "other bodies are not accepted)",
        )
    signers = settings.signers
    signed_by = matching_signers(signers, raw, request.headers.get(SIGNATURE_HEADER))
    if signers and not signed_by:
        raise PayloadError(401, "bad_signature", f"missing or wrong {SIGNATURE_HEADER} header")
    latest_ms = int(time.time() * 1000) + settings.max_clock_skew_seconds * 1000
    payload = parse_event(raw, latest_timestamp_ms=latest_ms)
    project = project_id(payload)
    signer = _signing_project(signed_by, project) if signers else None
    _check_allowed(settings, payload, project)
    return payload, signer


def _signing_project(signed_by: set[int | None], project: int | None) -> int | None:
    """The project whose own secret vouches for a body that names `project` (or none): None when
    a deployment-wide secret signed it; refused when only another project's secret did."""
    if None in signed_by:
        return None
    if project is None:
        return min(p for p in signed_by if p is not None)
    if project not in signed_by:
        raise PayloadError(
            401, "bad_signature", "signed with another project's secret", "project_id"
        )
    return project


def _check_allowed(settings: Settings, payload: dict[str, Any], project: int | None) -> None:
    """One receiver, many projects: events of accounts or projects outside the allow-lists are
    refused. A body that names neither (a recording notice, a DTMF callback) is not."""
    account = payload.get("account_sid")
    if settings.account_sids and account is not None and account not in settings.account_sids:
        raise PayloadError(403, "forbidden", "account_sid is not accepted here", "account_sid")
    if settings.project_ids and project is not None and project not in settings.project_ids:
        raise PayloadError(403, "forbidden", "project_id is not accepted here", "project_id")


def _refuse_too_large(store: Store, limit: int) -> tuple[Response, int]:
    """413, quarantined with the start of the body: only the preview is read, never the rest."""
    exc = PayloadError(413, "request_entity_too_large", f"the body is larger than {limit} bytes")
    preview = request.environ["wsgi.input"].read(QUARANTINE_PREVIEW_BYTES)
    _quarantine(store, preview, exc, size=request.content_length or len(preview))
    return jsonify(exc.to_json()), exc.status


def _quarantine(store: Store, raw: bytes, exc: PayloadError, size: int | None = None) -> None:
    store.quarantine.add(
        {
            "received_ms": int(time.time() * 1000),
            "status": exc.status,
            "error": exc.error,
            "field": exc.field,
            "message": exc.message,
            "bytes": len(raw) if size is None else size,
            "body": mask_personal(raw[:QUARANTINE_PREVIEW_BYTES].decode("utf-8", "replace")),
        }
    )


# Lookups ---------------------------------------------------------------------------------------


def public_view(doc: Doc) -> dict[str, Any]:
    """What `GET /calls/<id>` shows: the live state, without the journal and bookkeeping."""
    fields = doc["fields"]
    return {
        "call_id": doc["call_id"],
        "status": doc["status"],
        "active": is_active(doc),
        "from": fields.get("from"),
        "to": fields.get("to"),
        "request_from_user_id": fields.get("request_from_user_id"),
        "timeline": doc["timeline"],
        "last_timestamp_ms": doc["last_timestamp_ms"],
        "last_received_ms": doc["last_received_ms"],
        "version": doc["version"],
        "counts": doc["counts"],
        "closed_by": doc["closed_by"],
        "overflow": doc.get("overflow"),
    }


@calls.before_request
def require_api_token() -> tuple[Response, int] | None:
    token = services().settings.api_token
    if token is None:
        return None
    sent = request.headers.get("Authorization", "")
    expected = f"Bearer {token}"
    if not hmac.compare_digest(sent.encode(), expected.encode()):
        return error(401, "unauthorized", "send Authorization: Bearer <CALLSTATE_API_TOKEN>")
    return None


@calls.get("/calls/<call_id>")
def get_call(call_id: str) -> tuple[Response, int]:
    doc = _doc_or_none(call_id)
    if doc is None:
        return error(404, "not_found", "no such call", call_id=call_id)
    return jsonify(public_view(doc)), 200


@calls.get("/calls/<call_id>/events")
def get_call_events(call_id: str) -> tuple[Response, int]:
    doc = _doc_or_none(call_id)
    if doc is None:
        return error(404, "not_found", "no such call", call_id=call_id)
    journal = doc["journal"]
    payloads = services().store.log.payloads(call_id, [item["log_id"] for item in journal])
    events = [
        {
            **item,
            "received_ms": streamids.millis(item["log_id"]),
            "payload": payloads.get(item["log_id"]),
        }
        for item in journal
    ]
    return jsonify({"call_id": call_id, "events": events}), 200


@calls.get("/calls/<call_id>/record")
def get_call_record(call_id: str) -> tuple[Response, int]:
    doc = _doc_or_none(call_id)
    if doc is None:
        return error(404, "not_found", "no such call", call_id=call_id)
    if doc["record"] is None:
        return error(404, "not_ended", "the call has not ended yet", call_id=call_id)
    return jsonify(doc["record"]), 200


@calls.get("/calls")
def list_calls() -> tuple[Response, int]:
    args = request.args
    if args.get("active") != "true":
        return error(400, "invalid_query", "only active=true is supported", field="active")
    try:
        limit = _int_arg("limit", 50, 1, MAX_PAGE)
        offset = _int_arg("offset", 0, 0, None)
    except ValueError as exc:
        return error(400, "invalid_query", str(exc), field=exc.args[1])
    total, docs = services().store.docs.active_calls(
        args.get("number"), args.get("user"), offset, limit
    )
    return jsonify(
        {"total": total, "offset": offset, "limit": limit, "calls": [public_view(d) for d in docs]}
    ), 200


def _doc_or_none(call_id: str) -> Doc | None:
    if not CALL_ID_PATTERN.fullmatch(call_id):
        return None
    return services().store.docs.get_doc(call_id)


def _int_arg(name: str, default: int, low: int, high: int | None) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) < low or (high is not None and int(raw) > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be an integer {bound}", name)
    return int(raw)
