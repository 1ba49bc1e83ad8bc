"""The dashboard at /ui, driven in Debian's headless chromium against a `gpurouter serve` process.

Playwright drives the browser installed by the distribution (``make test`` installs it with
apt-get when it is missing); Playwright's own browser download is not used. Without the browser
these tests are skipped, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright
from routers import Router

from gpu_request_router.http.keys import hash_key
from gpu_request_router.testing import HEADLESS_CHROMIUM_ARGS, free_port

CHROMIUM = Path("/usr/bin/chromium")
KEYS = {
    "root": "dash-root-key-0123456789",
    "alice": "dash-alice-key-0123",
    "bob": "dash-bob-key-0123",
}
ROLES = {"root": "admin", "alice": "user", "bob": "user"}
H100_MIB = 81559
# Time for the page to show a change: it polls every 1.5 s.
SHOWN_MS = 8000


def router_config(workdir: Path, port: int) -> dict[str, Any]:
    """Two simulated H100s, an admin and two users, SQLite in ``workdir``."""
    return {
        "server": {"port": port},
        "auth": {
            "users": [
                {"name": name, "role": ROLES[name], "api_key_sha256": hash_key(key)}
                for name, key in KEYS.items()
            ]
        },
        "state": {"sqlite_path": str(workdir / "router.db")},
        "backends": [
            {"name": "sim", "kind": "simulated", "gpus": [{"type": "H100-80GB", "count": 2}]}
        ],
        "monitor": {"poll_interval_s": 0.1},
    }


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `gpurouter serve` process on 127.0.0.1; its URL."""
    workdir = tmp_path_factory.mktemp("dashboard")
    port = free_port()
    process = Router(workdir, port, router_config(workdir, port))
    try:
        process.wait_ready()
        yield process.url
    finally:
        process.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's chromium, headless."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=list(HEADLESS_CHROMIUM_ARGS)
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context (its own sessionStorage) and page.

    The test fails if a script of the page throws, or if the page breaks its own
    Content-Security-Policy (a script, style or connection the policy refuses).
    """
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    opened = context.new_page()
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            errors.append(message.text)

    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.on("console", on_console)
    yield opened
    context.close()
    assert errors == [], errors


def api(router: str, user: str) -> httpx.Client:
    """A client of the router's API with ``user``'s key."""
    return httpx.Client(
        base_url=router, headers={"Authorization": f"Bearer {KEYS[user]}"}, timeout=10
    )


def submit(router: str, user: str, duration_s: float, **body: Any) -> str:
    """Submit a simulated request of ``user`` running ``duration_s``; its id."""
    payload = {
        "model": "llama-3-8b",
        "input": {
            "messages": [{"role": "user", "content": "hi"}],
            "simulate": {"duration_s": duration_s},
        },
        **body,
    }
    with api(router, user) as client:
        response = client.post("/v1/requests", json=payload)
    assert response.status_code == 202, response.text
    request_id: str = response.json()["id"]
    return request_id


def sign_in(page: Page, router: str, user: str) -> None:
    """Open /ui and sign in with ``user``'s key."""
    page.goto(f"{router}/ui")
    page.fill("#key", KEYS[user])
    page.click("#sign-in")
    expect(page.locator("#user-name")).to_have_text(f"{user} ({ROLES[user]})")


def test_an_admin_watches_work_run_and_cordons_a_gpu(router: str, page: Page) -> None:
    """Signed in as admin: GPUs appear, work shows up queued, running and done, a cordon holds."""
    page.goto(f"{router}/")
    expect(page.locator("#login-view")).to_be_visible()
    page.fill("#key", "not-a-key-of-this-router")
    page.click("#sign-in")
    expect(page.locator("#login-error")).to_contain_text("not valid")
    expect(page.locator("#dashboard-view")).to_be_hidden()
    sign_in(page, router, "root")
    gpu = page.locator('[data-gpu="sim:1"]')
    expect(gpu).to_contain_text("H100-80GB")
    expect(page.locator("#gpus .gpu")).to_have_count(2)

    # Two requests that fill both GPUs' memory, and a third that waits for one of them.
    big = {"resources": {"gpu_memory_mb": H100_MIB - 12_000}}
    first = submit(router, "alice", 3.0, **big)
    second = submit(router, "bob", 3.0, **big)
    waiting = submit(router, "alice", 0.5, priority="high", **big)
    queued = page.locator(f'#queue [data-priority="high"] tr[data-request="{waiting}"]')
    expect(queued).to_be_visible(timeout=SHOWN_MS)
    expect(queued.locator("td").first).to_have_text("0")
    expect(page.locator(f'#recent tr[data-request="{first}"]')).to_have_attribute(
        "data-status", "running", timeout=SHOWN_MS
    )
    expect(page.locator("#gpus .running li", has_text=first)).to_be_visible(timeout=SHOWN_MS)
    for request_id in (first, second, waiting):
        expect(page.locator(f'#recent tr[data-request="{request_id}"]')).to_have_attribute(
            "data-status", "succeeded", timeout=SHOWN_MS + 4000
        )
    expect(page.locator(f'#recent tr[data-request="{waiting}"] td.reason')).to_contain_text(
        "balanced"
    )
    expect(page.locator('#usage tr[data-user="alice"]')).to_be_visible()
    expect(page.locator("#charts figure")).to_have_count(3)
    expect(page.locator("#charts figure", has_text="Throughput").locator("polyline")).to_have_count(
        1
    )

    gpu.locator('button[data-action="cordon"]').click()
    expect(gpu.locator(".badge.cordoned")).to_be_visible(timeout=SHOWN_MS)
    with api(router, "root") as client:
        assert client.get("/v1/gpus/sim:1").json()["cordoned"] is True
        gpu.locator('button[data-action="uncordon"]').click()
        expect(gpu.locator('button[data-action="cordon"]')).to_be_visible(timeout=SHOWN_MS)
        assert client.get("/v1/gpus/sim:1").json()["cordoned"] is False
        gpu.locator('button[data-action="drain"]').click()  # idle: cordoned, drained at once
        expect(gpu.locator(".badge.cordoned")).to_be_visible(timeout=SHOWN_MS)
        assert client.get("/v1/gpus/sim:1").json()["cordoned"] is True
        gpu.locator('button[data-action="uncordon"]').click()
        expect(gpu.locator('button[data-action="drain"]')).to_be_visible(timeout=SHOWN_MS)
        explain = client.get(f"/v1/requests/{first}/explain")

    page.locator(f'#recent tr[data-request="{first}"] a').click()
    expect(page.locator("#request-title")).to_have_text(first)
    expect(page.locator("#request-details")).to_contain_text("succeeded")
    if explain.status_code == 404:
        expect(page.locator("#explain-unavailable")).to_contain_text("404")
    else:
        expect(page.locator("#explain .summary")).to_have_text(explain.json()["summary"])

    page.click("#sign-out")
    expect(page.locator("#login-view")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


def test_the_request_page_explains_a_wait_and_then_the_placement(router: str, page: Page) -> None:
    """A request waiting for memory shows why and its position; once placed, the candidates."""
    big = {"resources": {"gpu_memory_mb": H100_MIB - 12_000}}
    for _ in range(2):
        submit(router, "bob", 3.0, **big)
    waiting = submit(router, "alice", 0.5, **big)
    sign_in(page, router, "alice")
    page.goto(f"{router}/ui#/requests/{waiting}")
    explain = page.locator("#explain")
    block = explain.locator(".waiting")
    expect(block).to_contain_text(re.compile("memory|starvation_hold"), timeout=SHOWN_MS)
    expect(block).to_contain_text("expected start")

    expect(page.locator("#request-details")).to_contain_text("succeeded", timeout=SHOWN_MS + 4000)
    with api(router, "alice") as client:
        explained = client.get(f"/v1/requests/{waiting}/explain").json()
    placed_on = explained["placement"]["gpu_id"]
    expect(explain.locator(".summary")).to_have_text(explained["summary"], timeout=SHOWN_MS)
    expect(block).to_have_count(0)
    expect(explain).not_to_contain_text("null")
    expect(explain.locator(f'tr.chosen[data-gpu="{placed_on}"]')).to_be_visible()
    headers = explain.locator("table.candidates th")
    for name in explained["candidates"][0]["score"]:
        expect(headers.filter(has_text=re.compile(f"^{re.escape(name)}$"))).to_have_count(1)
    expect(explain.locator("table.candidates tbody tr")).to_have_count(len(explained["candidates"]))


def test_a_user_sees_only_their_own_requests_and_no_gpu_controls(router: str, page: Page) -> None:
    """Signed in as alice: her requests, not bob's; no cordon buttons; her quota only."""
    mine = submit(router, "alice", 0.1)
    theirs = submit(router, "bob", 0.1)
    sign_in(page, router, "alice")
    expect(page.locator(f'#recent tr[data-request="{mine}"]')).to_be_visible(timeout=SHOWN_MS)
    expect(page.locator("#recent tbody tr td:nth-child(2)")).to_have_text(
        ["alice"] * page.locator("#recent tbody tr").count()
    )
    expect(page.locator(f'[data-request="{theirs}"]')).to_have_count(0)
    expect(page.locator("#gpus .gpu")).to_have_count(2)
    expect(page.locator("button[data-action]")).to_have_count(0)
    expect(page.locator("#gpus .slots").first).to_contain_text("of yours running")
    expect(page.locator("#usage tbody tr")).to_have_count(1)
    expect(page.locator('#usage tr[data-user="alice"]')).to_be_visible()
    expect(page.locator("#charts figure")).to_have_count(3)
    expect(page.locator("#charts figure", has_text="Throughput").locator("polyline")).to_have_count(
        1
    )
    page.goto(f"{router}/ui#/requests/{theirs}")
    expect(page.locator("#request-details")).to_contain_text("No such request")
    page.goto(f"{router}/ui#/requests/{mine}")
    page.reload()  # the key is kept for the tab
    expect(page.locator("#user-name")).to_have_text("alice (user)")
    expect(page.locator("#request-title")).to_have_text(mine)
