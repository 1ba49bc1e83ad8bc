"""The `gpurouter` client commands, run as processes against a running `gpurouter serve`."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from routers import Router, clean_environment
from typer.testing import CliRunner, Result

from gpu_request_router.cli import app
from gpu_request_router.testing import free_port

GPUROUTER = str(Path(sys.executable).parent / "gpurouter")
KEY = "cli-test-key"


def _env(**extra: str) -> dict[str, str]:
    return {**clean_environment(), "COLUMNS": "250", **extra}


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `gpurouter serve` process with one user, on SQLite in a temporary folder."""
    workdir = tmp_path_factory.mktemp("cli")
    port = free_port()
    config = {
        "server": {"port": port},
        "auth": {
            "users": [
                {
                    "name": "carol",
                    "role": "admin",
                    "api_key_sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                }
            ]
        },
        "state": {"sqlite_path": str(workdir / "router.db")},
        "monitor": {"poll_interval_s": 0.1},
    }
    process = Router(workdir, port, config)
    try:
        process.wait_ready()
        yield process.url
    finally:
        process.stop()
    logs = process.out.read_text() + process.err.read_text()
    assert "development admin key" not in logs, "users configured"
    assert [path.name for path in workdir.iterdir() if path.suffix == ".devkey"] == []


def _cli(
    router: str, *args: str, key: str = KEY, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GPUROUTER, *args],
        env=env if env is not None else _env(GPUROUTER_URL=router, GPUROUTER_API_KEY=key),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_submit_wait_status_list_and_cancel(router: str) -> None:
    """A request goes through submit --wait, status, wait, list and cancel by the CLI."""
    done = _json(
        _cli(
            router,
            "submit",
            "llama-3-8b",
            "--prompt",
            "Hi",
            "--max-tokens",
            "4",
            "--wait",
            "30",
            "--json",
        )
    )
    assert done["status"] == "succeeded" and done["user"] == "carol"
    assert _json(_cli(router, "status", done["id"], "--json"))["id"] == done["id"]
    assert _json(_cli(router, "wait", done["id"], "--json"))["status"] == "succeeded"
    slow_input = json.dumps(
        {"messages": [{"role": "user", "content": "x"}], "simulate": {"duration_s": 600}}
    )
    slow = _json(_cli(router, "submit", "llama-3-8b", "--input", slow_input, "--json"))
    listed = _json(_cli(router, "list", "--json"))
    ids = [item["id"] for item in (listed if isinstance(listed, list) else [listed])]
    assert ids[:2] == [slow["id"], done["id"]], "newest first"
    assert _json(_cli(router, "cancel", slow["id"], "--json"))["status"] == "cancelled"
    again = _cli(router, "cancel", slow["id"])
    assert again.returncode == 1 and "409" in again.stderr


def test_tables_and_gpus(router: str) -> None:
    """Without --json the commands print tables; gpus lists the simulated fleet."""
    table = _cli(router, "gpus")
    assert table.returncode == 0
    assert len(re.findall(r"sim:\d", table.stdout)) == 4
    assert "H100-80GB" in table.stdout
    gpus = _json(_cli(router, "gpus", "--json"))
    assert [gpu["id"] for gpu in gpus] == ["sim:0", "sim:1", "sim:2", "sim:3"]


def test_errors_and_unreachable_router(router: str) -> None:
    """A refused request exits 1 with the problem's detail; no router at the URL exits 2."""
    refused = _cli(router, "submit", "no-such-model")
    assert refused.returncode == 1 and "unknown model" in refused.stderr
    unauthorised = _cli(router, "list", key="wrong")
    assert unauthorised.returncode == 1 and "401" in unauthorised.stderr
    bad_input = _cli(router, "submit", "llama-3-8b", "--input", "{not json")
    assert bad_input.returncode == 2 and "not JSON" in bad_input.stderr
    nobody = _cli(f"http://127.0.0.1:{free_port()}", "list")
    assert nobody.returncode == 2 and "cannot reach the router" in nobody.stderr


def test_keys_create_prints_a_key_and_the_hash_of_that_key() -> None:
    """The printed config line holds the SHA-256 of the printed key, which is new each time."""
    first = subprocess.run(
        [GPUROUTER, "keys", "create", "--name", "dave", "--role", "admin"],
        capture_output=True,
        text=True,
        check=True,
        env=_env(),
    )
    key = re.search(r"API key \(shown once\): (\S+)", first.stdout).group(1)
    line = re.search(r"\{name: dave, role: admin, api_key_sha256: ([0-9a-f]{64})\}", first.stdout)
    assert line is not None and line.group(1) == hashlib.sha256(key.encode()).hexdigest()
    second = subprocess.run(
        [GPUROUTER, "keys", "create"], capture_output=True, text=True, check=True, env=_env()
    )
    assert key not in second.stdout
    invalid = subprocess.run(
        [GPUROUTER, "keys", "create", "--role", "root"],
        capture_output=True,
        text=True,
        check=False,
        env=_env(),
    )
    assert invalid.returncode == 2 and "invalid user" in invalid.stderr


def test_submit_wait_and_wait_print_the_answer(router: str) -> None:
    """Below the table: a chat's assistant text, or a generic request's result as JSON."""
    chat = _cli(
        router, "submit", "llama-3-8b", "--prompt", "Hi", "--max-tokens", "4", "--wait", "30"
    )
    assert chat.returncode == 0, chat.stderr
    request_id = re.search(r"req_\w+", chat.stdout).group(0)
    done = _json(_cli(router, "status", request_id, "--json"))
    text = done["result"]["choices"][0]["message"]["content"]
    assert text and chat.stdout.rstrip().endswith(text), chat.stdout
    assert text in _cli(router, "wait", request_id).stdout
    generic = _cli(
        router, "submit", "llama-3-8b", "--task", "generic", "--input", '{"x": 1}', "--wait", "30"
    )
    assert generic.returncode == 0, generic.stderr
    answer = generic.stdout[generic.stdout.rindex("\n{") :]
    request_id = re.search(r"req_\w+", generic.stdout).group(0)
    assert json.loads(answer) == _json(_cli(router, "status", request_id, "--json"))["result"]
    without_wait = _cli(router, "submit", "llama-3-8b", "--prompt", "Hi", "--max-tokens", "4")
    assert without_wait.stdout.rstrip().endswith("┘"), "no --wait: the table only"
    failing = json.dumps({"prompt": "x", "simulate": {"failure": "error", "fail_attempts": 99}})
    failed = _cli(
        router, "submit", "llama-3-8b", "--task", "completion", "--input", failing, "--wait", "60"
    )
    assert failed.returncode == 0, failed.stderr
    assert "failed" in failed.stdout and failed.stdout.rstrip().endswith("┘"), "no answer"
    assert "failed" in failed.stderr and "simulated backend error" in failed.stderr


def test_url_and_api_key_options_override_the_environment(
    router: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--url/--api-key after the command or before it beat GPUROUTER_URL/GPUROUTER_API_KEY.

    In-process (typer's runner, the real router over HTTP), to spare a process start per call.
    """
    monkeypatch.setenv("GPUROUTER_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("GPUROUTER_API_KEY", "wrong")
    runner = CliRunner()

    def run(*args: str) -> Result:
        return runner.invoke(app, list(args))

    after = run("gpus", "--json", "--url", router, "--api-key", KEY)
    assert after.exit_code == 0, after.output
    assert len(json.loads(after.stdout)) == 4
    before = run("--url", router, "--api-key", KEY, "list", "--json")
    assert before.exit_code == 0, before.output
    # The command's own option beats the one given before the command.
    assert run("--api-key", "wrong", "gpus", "--api-key", KEY, "--url", router).exit_code == 0
    refused = run("--api-key", KEY, "gpus", "--api-key", "wrong", "--url", router)
    assert refused.exit_code == 1 and "401" in refused.stderr
    # Without the options the environment still decides.
    unreachable = run("gpus")
    assert unreachable.exit_code == 2 and "--url" in unreachable.stderr


def _serve_embedded(workdir: Path, port: int) -> tuple[subprocess.Popen[bytes], str, str]:
    """`gpurouter serve` on the embedded default in ``workdir``; the process, URL and dev key."""
    log_path = workdir / f"serve-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [GPUROUTER, "serve", "--port", str(port)],
            cwd=workdir,
            stdout=log,
            stderr=log,
            env=_env(),
        )
    deadline = time.monotonic() + 20
    while True:
        exports = dict(re.findall(r"export (GPUROUTER_\w+)=(\S+)", log_path.read_text()))
        if len(exports) == 2:
            return process, exports["GPUROUTER_URL"], exports["GPUROUTER_API_KEY"]
        assert process.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.05)


def test_the_development_key_survives_a_restart_on_the_same_state_file(tmp_path: Path) -> None:
    """The key a user exported still works after a restart; it is kept 0600 beside the file."""
    keys = []
    for _ in range(2):
        process, url, key = _serve_embedded(tmp_path, free_port())
        try:
            assert _cli(url, "gpus", "--json", key=key).returncode == 0
            keys.append(key)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(20)
    assert keys[0] == keys[1]
    kept = tmp_path / "gpurouter.db.devkey"
    assert kept.read_text().strip() == keys[0]
    assert kept.stat().st_mode & 0o777 == 0o600
    # A key file that others may read is refused, naming the file, and the router does not start.
    kept.chmod(0o644)
    refused = subprocess.run(
        [GPUROUTER, "serve", "--port", str(free_port())],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert refused.returncode == 1
    assert "development_key_unusable" in refused.stderr and "gpurouter.db.devkey" in refused.stderr
    assert "listening" not in refused.stdout


def test_docs_page_is_served_whole_by_the_router(router: str) -> None:
    """/docs names no other host, and every asset it loads answers 200 from the router process."""
    page = httpx.get(f"{router}/docs", timeout=10)
    assert page.status_code == 200
    assert "http://" not in page.text and "https://" not in page.text
    assets = re.findall(r'(?:href|src)="(/[^"]+)"', page.text)
    assert len(assets) == 3, assets  # stylesheet, icon, script
    for asset in assets:
        assert httpx.get(f"{router}{asset}", timeout=10).status_code == 200, asset
