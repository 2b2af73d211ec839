"""Read-only lookups: one call, its events, its record, the active calls."""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Response, jsonify, request

from callstate import streamids
from callstate.calls import Doc, is_active
from callstate.http import error, require_read_token, services
from callstate.schema import CALL_ID_PATTERN
from callstate.store import Store

MAX_PAGE = 500
# Far past any real list of active calls, and keeps Redis's range arguments within 64 bits.
MAX_OFFSET = 1_000_000_000
# ASCII digits only: str.isdigit() also takes "²", which int() then refuses.
_DIGITS = re.compile(r"[0-9]{1,10}")

calls = Blueprint("calls", __name__)
calls.before_request(require_read_token)


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


def events_view(store: Store, doc: Doc) -> list[dict[str, Any]]:
    """What `GET /calls/<id>/events` shows: the journal, with each entry's logged payload."""
    journal = doc["journal"]
    payloads = store.log.payloads(doc["call_id"], [item["log_id"] for item in journal])
    return [
        {
            **item,
            "received_ms": streamids.millis(item["log_id"]),
            "payload": payloads.get(item["log_id"]),
        }
        for item in journal
    ]


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
    return jsonify({"call_id": call_id, "events": events_view(services().store, doc)}), 200


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
        offset = _int_arg("offset", 0, 0, MAX_OFFSET)
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


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw) or not low <= int(raw) <= high:
        raise ValueError(f"{name} must be an integer between {low} and {high}", name)
    return int(raw)
