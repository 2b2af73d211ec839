"""The API's own description: the OpenAPI 3.1 document shipped in `callstate/openapi/`."""

from __future__ import annotations

from functools import cache
from importlib import metadata, resources
from typing import Any

import yaml
from flask import Blueprint, Response, jsonify

apidoc = Blueprint("apidoc", __name__)


@cache
def openapi_document() -> dict[str, Any]:
    """The document as served, read once: the package's version filled in from its metadata."""
    source = resources.files("callstate").joinpath("openapi", "openapi.yaml").read_text("utf-8")
    document: dict[str, Any] = yaml.safe_load(source)
    document["info"]["version"] = metadata.version("callstate")
    return document


@apidoc.get("/openapi.json")
def get_openapi() -> tuple[Response, int]:
    return jsonify(openapi_document()), 200
