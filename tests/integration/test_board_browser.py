"""The live call board in a real browser: Debian's Chromium, driven by Playwright, against the
real stack (Redis, an RQ worker, gunicorn) with a read token set.

`make test` installs Chromium when it is missing and it runs as root (`make chromium`); without
it this test skips, saying so, except on CI (`CI` set), where it fails instead.
`CALLSTATE_SCREENSHOT=docs/board.png` saves a screenshot of the board with a few calls on it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from tests.factories import ended, event, to_agent
from tests.integration.stack import REPO, Stack

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
# No sandbox: CI runs as root. The rest keeps Chromium off the network it does not have.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "board-test-token"
APPEARS_WITHIN_MS = 1000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        reason = (
            f"BROWSER TEST NOT RUN: {CHROMIUM} is missing. `make test` installs Debian's "
            "chromium package when run as root; otherwise run `apt-get install chromium`"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def now_ms() -> int:
    return int(time.time() * 1000)


def posted(stack: Stack, payload: dict[str, Any]) -> None:
    response = stack.post(payload)
    assert response.status_code == 200, response.text


def appears(stack: Stack, payload: dict[str, Any], locator: Locator) -> list[float]:
    """Post an event; the board must show it within a second of the post."""
    before = time.monotonic()
    posted(stack, payload)
    expect(locator).to_be_visible(timeout=APPEARS_WITHIN_MS)
    took = time.monotonic() - before
    assert took < APPEARS_WITHIN_MS / 1000, f"shown {took:.3f} s after the post"
    return [took]


def card(page: Page, where: str, call_id: str) -> Locator:
    return page.locator(f'{where} [data-call-id="{call_id}"]')


def test_a_call_appears_moves_and_ends_on_the_board_within_a_second(
    make_stack: Callable[..., Stack], browser: Browser
) -> None:
    stack = make_stack(CALLSTATE_API_TOKEN=TOKEN)
    stack.start_workers(1)
    stack.start_web()
    page = browser.new_page(viewport={"width": 1920, "height": 1080})
    assert stack.get("/board/state").status_code == 401
    page.goto(f"{stack.web_url}/?token={TOKEN}")
    assert page.url == f"{stack.web_url}/"  # the token left the address bar for a cookie
    expect(page.locator("#connection")).to_have_attribute("data-state", "live", timeout=10_000)

    # A first call warms the worker up: RQ's first job costs more than the rest.
    posted(stack, event("board-warm-up", "ringing", now_ms()))
    expect(card(page, "#status-ringing", "board-warm-up")).to_be_visible(timeout=10_000)

    call_id = "board-call-1"
    start = now_ms()
    shown = appears(stack, event(call_id, "ringing", start), card(page, "#status-ringing", call_id))
    ringing = card(page, "#active", call_id)
    expect(ringing.locator(".number")).to_have_text(["84899199866", "→ 84909985668"])
    expect(ringing.locator(".agent")).to_have_text("huydn")

    answered = card(page, "#status-answered", call_id)
    shown += appears(stack, event(call_id, "answered", start + 1), answered)
    expect(card(page, "#status-ringing", call_id)).to_have_count(0)

    record = card(page, "#records", call_id)
    shown += appears(stack, ended(call_id, start + 2, "USER_END_CALL", 42), record)
    expect(card(page, "#active", call_id)).to_have_count(0)
    expect(record.locator(".disposition")).to_have_text("answered")
    print("from webhook to board, ms:", [round(seconds * 1000) for seconds in shown])

    screenshot = os.environ.get("CALLSTATE_SCREENSHOT")
    if screenshot:
        show_a_busy_board(stack, page)
        page.screenshot(path=str(REPO / screenshot))


def show_a_busy_board(stack: Stack, page: Page) -> None:
    """A few calls in every state, a busy one ended and an event refused, for the screenshot."""
    start = now_ms()
    calls = [
        ("call-vn-1-A1", ["created"], {}, 14_000),
        ("call-vn-1-A2", ["created", "started", "ringing"], {}, 6_000),
        ("call-vn-1-A3", ["created", "ringing"], {"request_from_user_id": "linh.tran"}, 3_000),
        ("call-vn-1-A4", ["created", "ringing", "answered"], {}, 185_000),
        (
            "call-vn-1-A5",
            ["created", "ringing", "answered"],
            {"request_from_user_id": "minh"},
            42_000,
        ),
    ]
    for n, (call_id, statuses, extra, age_ms) in enumerate(calls):
        numbers = {
            "from": {"number": f"8490{n}1234{n}67", "type": "external"},
            "to": {"number": f"8428{n}7654{n}21", "type": "internal"},
        }
        for step, status in enumerate(statuses):
            at = start - age_ms - (len(statuses) - step) * 1000
            posted(stack, event(call_id, status, at, **numbers, **extra))
    inbound = {"callCreatedReason": "EXTERNAL_CALL_IN", "request_from_user_id": None}
    posted(stack, event("call-vn-1-CC", "created", start - 9_000, **inbound))
    posted(
        stack, event("call-vn-1-CC", "ringing", start - 8_000, to=to_agent("agent-7"), **inbound)
    )
    posted(
        stack, event("call-vn-1-CC", "agentEnded", start - 4_000, to=to_agent("agent-7"), **inbound)
    )
    posted(stack, event("call-vn-1-B1", "ringing", start - 20_000))
    posted(stack, ended("call-vn-1-B1", start - 12_000, "486 Busy Here", 0))
    posted(stack, event("call-vn-1-A4", "ringing", start - 300_000))  # out of order
    for call_id, _, _, _ in calls:
        expect(card(page, "#active", call_id)).to_be_visible(timeout=5_000)
    expect(card(page, "#records", "call-vn-1-B1")).to_be_visible(timeout=5_000)
    expect(card(page, "#rejections", "call-vn-1-A4")).to_be_visible(timeout=5_000)
