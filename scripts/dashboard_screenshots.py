"""Screenshots of the dashboard for docs/images/: a simulated fleet with work running.

Starts `gpurouter serve` on 127.0.0.1 (four simulated H100s, an admin and three users, SQLite in
a temporary folder), keeps a seeded stream of requests coming for ``--seconds``, watches /ui in
Debian's headless chromium the whole time (so that the charts have history), then saves:

- ``dashboard.png``: the dashboard, signed in as the admin;
- ``request.png``: the page of a request that is running, with its explanation.

Run from the repository root, with the dev virtualenv (``make .venv/.dev``)::

    .venv/bin/python scripts/dashboard_screenshots.py            # writes docs/images/*.png
    .venv/bin/python scripts/dashboard_screenshots.py --out /tmp/shots --seconds 20
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from playwright.sync_api import Page, expect, sync_playwright

from gpu_request_router.http.keys import hash_key
from gpu_request_router.testing import HEADLESS_CHROMIUM_ARGS, free_port

GPUROUTER = str(Path(sys.executable).parent / "gpurouter")
USERS = {"ops": "admin", "alice": "user", "bob": "user", "carol": "user"}
MODELS = ["llama-3-8b", "qwen2.5-7b", "tinyllama-1.1b"]
CLASSES = ["high", "normal", "normal", "normal", "low", "batch"]


def key_of(user: str) -> str:
    """The demo API key of ``user``."""
    return f"screenshot-{user}-key-0123456789"


def start_router(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    """`gpurouter serve` with the demo users and four simulated H100s, once it is ready."""
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "auth": {
            "users": [
                {"name": name, "role": role, "api_key_sha256": hash_key(key_of(name))}
                for name, role in USERS.items()
            ]
        },
        "state": {"sqlite_path": str(workdir / "router.db")},
        "backends": [
            {"name": "sim", "kind": "simulated", "gpus": [{"type": "H100-80GB", "count": 4}]}
        ],
        "monitor": {"poll_interval_s": 0.2},
        "logging": {"level": "warning"},
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    log = (workdir / "serve.log").open("wb")
    process = subprocess.Popen(
        [GPUROUTER, "serve", "--config", str(workdir / "config.yaml")],
        cwd=workdir,
        stdout=log,
        stderr=log,
    )
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise SystemExit((workdir / "serve.log").read_text())
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the router did not become ready")
        time.sleep(0.1)


def workload(url: str, seconds: float, seed: int, submitted: list[str]) -> None:
    """Submit a seeded mix of requests for ``seconds``: several users, models and classes.

    About as many arrive as the fleet finishes, then, in the last 8 s, a burst that the queue
    takes.
    """
    rng = random.Random(seed)
    users = [name for name, role in USERS.items() if role == "user"]
    clients = {
        user: httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key_of(user)}"}, timeout=10
        )
        for user in users
    }
    end = time.monotonic() + seconds
    burst = end - min(8.0, seconds / 4)
    while (now := time.monotonic()) < end:
        user = rng.choice(users)
        body: dict[str, Any] = {
            "model": rng.choice(MODELS),
            "priority": rng.choice(CLASSES),
            "input": {
                "messages": [{"role": "user", "content": "Summarise the report."}],
                "simulate": {"duration_s": round(rng.uniform(4, 16), 1)},
            },
            "resources": {"gpu_memory_mb": rng.choice([18_000, 24_000, 30_000, 36_000])},
        }
        response = clients[user].post("/v1/requests", json=body)
        if response.status_code == 202:
            submitted.append(response.json()["id"])
        time.sleep(rng.uniform(0.1, 0.3) if now > burst else rng.uniform(0.4, 0.9))
    for client in clients.values():
        client.close()


def running_request(url: str) -> str:
    """The id of a request running now (the newest one)."""
    headers = {"Authorization": f"Bearer {key_of('ops')}"}
    items = httpx.get(
        f"{url}/v1/requests", params={"status": "running", "limit": 1}, headers=headers
    ).json()["items"]
    if not items:
        raise SystemExit("no request is running: run longer (--seconds)")
    request_id: str = items[0]["id"]
    return request_id


def sign_in(page: Page, url: str) -> None:
    """Open /ui and sign in as the admin."""
    page.goto(f"{url}/ui")
    page.fill("#key", key_of("ops"))
    page.click("#sign-in")
    expect(page.locator("#gpus .gpu")).to_have_count(4)


def main() -> None:
    """Run the fleet, watch it, and save the screenshots."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    parser.add_argument("--seconds", type=float, default=50.0, help="of load before the shots")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        router = start_router(Path(tmp), port)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=args.chromium, args=list(HEADLESS_CHROMIUM_ARGS)
                )
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                sign_in(page, url)
                submitted: list[str] = []
                load = threading.Thread(
                    target=workload, args=(url, args.seconds, args.seed, submitted)
                )
                load.start()
                load.join()
                page.wait_for_timeout(1600)  # one more poll after the last submission
                page.screenshot(path=str(args.out / "dashboard.png"), full_page=True)
                page.goto(f"{url}/ui#/requests/{running_request(url)}")
                expect(page.locator("#request-details .badge")).to_be_visible()
                page.wait_for_timeout(500)
                page.screenshot(path=str(args.out / "request.png"), full_page=True)
                browser.close()
            print(f"{len(submitted)} requests submitted; screenshots in {args.out}")
        finally:
            router.send_signal(signal.SIGTERM)
            router.wait(20)


if __name__ == "__main__":
    main()
