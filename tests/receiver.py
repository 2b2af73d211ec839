"""A real HTTP receiver of forwarded records, on a free loopback port: verifies each Standard
Webhooks signature, de-duplicates by `webhook-id`, and misbehaves on a schedule (answers 500,
times out, answers slowly, drops the connection) when told to.

`python -m tests.receiver --port N` runs one that only answers 200, for the benchmark."""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from workers.records import lower_cpu_priority

OK, FAIL, TIMEOUT, SLOW, DROP = "ok", "fail", "timeout", "slow", "drop"


@dataclass
class Accepted:
    """What the receiver took: each webhook-id once, in arrival order, and how many arrived."""

    ids: list[str] = field(default_factory=list)
    bodies: dict[str, Any] = field(default_factory=dict)
    arrivals: int = 0
    duplicates: int = 0
    bad_signatures: int = 0


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (its timeout) resets the connection: expected here."""


class Receiver:
    """`behaviour(n)` says what to do with the n-th request (from 0); OK by default."""

    def __init__(
        self,
        secret: str | None,
        behaviour: Callable[[int], str] | None = None,
        hold_seconds: float = 0.0,
        port: int = 0,
    ) -> None:
        self.webhook = Webhook(secret) if secret else None
        self.behaviour = behaviour or (lambda n: OK)
        self.hold_seconds = hold_seconds
        self.accepted = Accepted()
        self.lock = threading.Lock()
        self.server = QuietServer(("127.0.0.1", port), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/records?token=t0ps3cret"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def take(self, headers: dict[str, str], body: bytes) -> str:
        """Count the request and say what to do with it."""
        with self.lock:
            n = self.accepted.arrivals
            self.accepted.arrivals += 1
        what = self.behaviour(n)
        if what != OK and what != SLOW:
            return what
        if self.webhook is not None:
            try:
                self.webhook.verify(body, headers)
            except WebhookVerificationError:
                with self.lock:
                    self.accepted.bad_signatures += 1
                return FAIL
        message_id = headers["webhook-id"]
        with self.lock:
            if message_id in self.accepted.bodies:
                self.accepted.duplicates += 1
            else:
                self.accepted.ids.append(message_id)
                self.accepted.bodies[message_id] = json.loads(body)
        return what

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver
            # The answer goes out in two writes (headers, body): with Nagle's algorithm the
            # second waits for the client's delayed ACK, 40 ms a request.
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                what = receiver.take({k.lower(): v for k, v in self.headers.items()}, body)
                if what == DROP:
                    self.close_connection = True
                    self.connection.close()
                    return
                if what in (TIMEOUT, SLOW):
                    time.sleep(receiver.hold_seconds if what == TIMEOUT else 0.3)
                status = 500 if what == FAIL else 200
                answer = b'{"ok": true}' if status == 200 else b'{"error": "scheduled"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: a test prints what it needs."""

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="a receiver that answers 200 to every record")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--nice", type=int, default=0, help="lower this process's CPU priority")
    args = parser.parse_args()
    lower_cpu_priority(args.nice)
    with Receiver(None, port=args.port) as receiver:
        receiver.thread.join()


if __name__ == "__main__":
    main()
