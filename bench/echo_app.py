"""The bare Flask JSON echo of the web floor, served by the same gunicorn set-up as app.py."""

from __future__ import annotations

from flask import Flask, Response, jsonify, request

app = Flask(__name__)


@app.post("/webhooks/stringee")
def echo() -> tuple[Response, int]:
    return jsonify(request.get_json()), 200
