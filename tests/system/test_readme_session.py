"""The README's quickstart, run as printed against `gpurouter serve` on the embedded default."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from gpu_request_router.testing import free_port

ROOT = Path(__file__).resolve().parents[2]


def _json_documents(output: str) -> tuple[list[dict[str, Any]], str]:
    """The JSON documents curl printed one after another (no newlines between), and the rest."""
    decoder = json.JSONDecoder()
    documents = []
    position = 0
    while output.startswith("{", position):
        document, position = decoder.raw_decode(output, position)
        documents.append(document)
    return documents, output[position:]


def test_readme_curl_session_works_as_printed(tmp_path: Path) -> None:
    """The embedded default prints an admin key that the README's curl commands run with."""
    readme = (ROOT / "README.md").read_text()
    session = re.search(r"paste the two `export` lines, then:\n\n```sh\n(.*?)```", readme, re.S)
    assert session is not None, "the README has the curl session"
    gpurouter = str(Path(sys.executable).parent / "gpurouter")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("GPUROUTER_")}
    with (tmp_path / "serve.log").open("wb") as log:
        server = subprocess.Popen(
            [gpurouter, "serve", "--port", str(port)], cwd=tmp_path, stdout=log, stderr=log, env=env
        )
    try:
        exports: dict[str, str] = {}
        deadline = time.monotonic() + 20
        while len(exports) < 2:
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            exports = dict(
                re.findall(r"export (GPUROUTER_\w+)=(\S+)", (tmp_path / "serve.log").read_text())
            )
            time.sleep(0.05)
        while httpx.get(f"{exports['GPUROUTER_URL']}/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", session.group(1)],
            env={**env, **exports},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        documents, rest = _json_documents(result.stdout)
        gpus, done, listing, cancelled, metrics = documents
        assert len(gpus["items"]) == 4 and gpus["items"][0]["type"] == "H100-80GB"
        assert done["status"] == "succeeded"
        assert done["result"]["object"] == "chat.completion"
        assert done["id"] in {item["id"] for item in listing["items"]}
        assert cancelled["status"] == "cancelled"
        assert metrics["requests"]["succeeded"] >= 1
        series = 'gpurouter_requests_total{model="llama-3-8b",priority="normal",status="succeeded"}'
        assert rest.startswith(series)
        assert (tmp_path / "gpurouter.db").exists(), "the embedded default keeps SQLite here"
        # The development key is an admin's: every priority class is open to it.
        critical = httpx.post(
            f"{exports['GPUROUTER_URL']}/v1/requests",
            json={
                "model": "llama-3-8b",
                "priority": "critical",
                "input": {"messages": [{"role": "user", "content": "hi"}]},
            },
            headers={"Authorization": f"Bearer {exports['GPUROUTER_API_KEY']}"},
        )
        assert critical.status_code == 202, critical.text
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(20)
