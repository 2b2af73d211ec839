"""The API's own description: the OpenAPI 3.1 document shipped in `callstate/openapi/`, and the
final record's JSON Schema shipped in `callstate/schemas/`, which that document embeds."""

from __future__ import annotations

import json
from functools import cache
from importlib import metadata, resources
from typing import Any

import yaml
from flask import Blueprint, Response, jsonify

apidoc = Blueprint("apidoc", __name__)

RECORD_SCHEMA_FILE = ("schemas", "record.schema.json")
RECORD_COMPONENT = "Record"
DEFS_REF = "#/$defs/"
COMPONENTS_REF = "#/components/schemas/"


@cache
def record_schema() -> dict[str, Any]:
    """The final record's JSON Schema (draft 2020-12), as shipped in the package."""
    source = resources.files("callstate").joinpath(*RECORD_SCHEMA_FILE).read_text("utf-8")
    schema: dict[str, Any] = json.loads(source)
    return schema


@cache
def openapi_document() -> dict[str, Any]:
    """The document as served, read once: the package's version filled in from its metadata and
    the record's schema put in as the `Record` component."""
    source = resources.files("callstate").joinpath("openapi", "openapi.yaml").read_text("utf-8")
    document: dict[str, Any] = yaml.safe_load(source)
    document["info"]["version"] = metadata.version("callstate")
    document["components"]["schemas"].update(record_components(record_schema()))
    return document


def record_components(schema: dict[str, Any]) -> dict[str, Any]:
    """The record's schema as OpenAPI components: `Record`, and each of its `$defs` as
    `Record<name>`, references rewritten to match (an embedded schema's `#/$defs/...` would
    otherwise resolve against the OpenAPI document's root)."""
    defs = schema.get("$defs", {})
    record = {key: value for key, value in schema.items() if key not in ("$schema", "$defs")}
    components = {RECORD_COMPONENT: record} | {
        RECORD_COMPONENT + name: definition for name, definition in defs.items()
    }
    rewritten: dict[str, Any] = _rewrite_refs(components)
    return rewritten


def _rewrite_refs(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: (
                COMPONENTS_REF + RECORD_COMPONENT + item.removeprefix(DEFS_REF)
                if key == "$ref" and isinstance(item, str) and item.startswith(DEFS_REF)
                else _rewrite_refs(item)
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_rewrite_refs(item) for item in value]
    return value


@apidoc.get("/openapi.json")
def get_openapi() -> tuple[Response, int]:
    return jsonify(openapi_document()), 200


@apidoc.get("/schemas/record.json")
def get_record_schema() -> tuple[Response, int]:
    answer = jsonify(record_schema())
    answer.mimetype = "application/schema+json"
    return answer, 200
