"""The Stringee webhook: check a delivery, log it durably, wake its shard's drain."""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Blueprint, Response, jsonify, request
from redis.exceptions import RedisError
from rq import Queue
from werkzeug.exceptions import RequestEntityTooLarge

from callstate.config import Settings
from callstate.connection import STORE_ERRORS
from callstate.eventlog import NotReplicatedError
from callstate.http import error, require_checked_store, services
from callstate.jobs import drain_timeout, enqueue_drain
from callstate.redact import mask_personal
from callstate.schema import PayloadError, parse_event, project_id
from callstate.signature import SIGNATURE_HEADER, matching_signers
from callstate.store import Store

log = logging.getLogger(__name__)
QUARANTINE_PREVIEW_BYTES = 2048

webhooks = Blueprint("webhooks", __name__)


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
        require_checked_store()
        log_id, shard, wake_id = svc.store.log.append_event(call_id, raw, signer)
    except NotReplicatedError as exc:
        _wake(svc.queue, svc.settings, exc.shard, exc.wake_id, exc.log_id, call_id)
        return _refuse_unreplicated(svc.settings, exc, call_id)
    except STORE_ERRORS as exc:
        log.warning(
            "event for call %s not stored: %s: %s",
            call_id,
            type(exc).__name__,
            exc,
            extra={"call_id": call_id},
        )
        # A timed-out append may still have run: the retry is then applied as a duplicate.
        return error(
            503, "unavailable", "the event store did not confirm the event; deliver it again"
        )
    _wake(svc.queue, svc.settings, shard, wake_id, log_id, call_id)
    log.debug(
        "stored %s for call %s as %s",
        payload.get("call_status"),
        call_id,
        log_id,
        extra={"call_id": call_id, "shard": shard, "log_id": log_id},
    )
    return stored(call_id, log_id), 200


def stored(call_id: str, log_id: str) -> Response:
    """The answer to a logged event, as `jsonify` writes it: formatted, not encoded, as neither
    id can hold a character JSON must escape (a call id matches CALL_ID_PATTERN; a log id is
    two integers)."""
    body = f'{{"call_id":"{call_id}","log_id":"{log_id}","status":"stored"}}\n'
    return Response(body, mimetype="application/json")


def _wake(
    queue: Queue, settings: Settings, shard: int, wake_id: str | None, log_id: str, call_id: str
) -> None:
    """Queue the drain job whose wake id the append claimed, if it claimed one."""
    if wake_id is None:
        return
    try:
        enqueue_drain(queue, shard, drain_timeout(settings), wake_id)
    except RedisError as exc:
        # The event is logged; maintenance wakes any shard left with a backlog.
        log.warning(
            "event %s stored but drain of shard %s not queued: %s",
            log_id,
            shard,
            exc,
            extra={"call_id": call_id, "shard": shard, "log_id": log_id},
        )


def _refuse_unreplicated(
    settings: Settings, exc: NotReplicatedError, call_id: str
) -> tuple[Response, int]:
    """503 for an event logged on the primary that too few replicas confirmed: it is applied
    all the same, and the sender's retry is then applied as a duplicate."""
    log.warning(
        "event %s for call %s confirmed by %d of %d replicas in %d ms; not acknowledged",
        exc.log_id,
        call_id,
        exc.replicas,
        settings.replica_acks,
        settings.replica_ack_timeout_ms,
        extra={"call_id": call_id, "shard": exc.shard, "log_id": exc.log_id},
    )
    return error(
        503,
        "not_replicated",
        f"the event was stored but {exc.replicas} of the {settings.replica_acks} replicas "
        f"required confirmed it within {settings.replica_ack_timeout_ms} ms; deliver it again",
        log_id=exc.log_id,
    )


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
