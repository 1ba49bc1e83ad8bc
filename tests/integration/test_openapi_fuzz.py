"""The whole API fuzzed from its own OpenAPI document by schemathesis, as ``st run`` does it.

One run of the schemathesis command line against a real router on loopback: every operation,
every built-in check (``--checks all``) and the router's own (``schemathesis_hooks.py``), all
four phases (examples, coverage, fuzzing, stateful), a fixed seed and 20 examples per operation.
The exceptions to the built-in checks are in ``schemathesis.toml`` beside this file, each with its
reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from gpu_request_router.api import create_app
from gpu_request_router.api.middleware.auth import hash_key
from gpu_request_router.testing import free_port, make_settings

HERE = Path(__file__).parent
ST = str(Path(sys.executable).parent / "st")
USER_KEY = "fuzz-user-key-0123456789"
ADMIN_KEY = "fuzz-admin-key-0123456789"
WORKER_TOKEN = "fuzz-worker-token-0123456789"
SEED = 20261206
EXAMPLES = 20
# Every model of the catalog runs in well under a millisecond here, so that the fleet never
# fills up and a synchronous call is answered within the run's request timeout.
FAST = {"H100-80GB": {"prefill_tokens_per_s": 1e12, "decode_tokens_per_s": 1e9}}


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    """A router with two simulated H100s and an admin and a user key, served over loopback."""
    app = create_app(
        make_settings(
            gpus=[("H100-80GB", 2)],
            auth={
                "enabled": True,
                "users": [
                    {"name": "fuzzer", "role": "user", "api_key_sha256": hash_key(USER_KEY)},
                    {"name": "root", "role": "admin", "api_key_sha256": hash_key(ADMIN_KEY)},
                ],
                "worker_token": WORKER_TOKEN,
                "max_failures_per_minute": 1_000_000,
            },
            quota={"requests_per_minute": None, "max_queued": 200},
            monitor={"poll_interval_s": 0.2},
            models={
                name: {"throughput": FAST, "default_duration_s": 0.001}
                for name in ("llama-3-8b", "qwen2.5-7b", "tinyllama-1.1b", "all-minilm-l6-v2")
            },
        )
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    assert not thread.is_alive()


def test_schemathesis_finds_no_failure_with_every_check(base_url: str, tmp_path: Path) -> None:
    """``st run --checks all`` over every operation, with a fixed seed, reports no failure."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "FUZZ_ADMIN_KEY": ADMIN_KEY,
        "FUZZ_WORKER_TOKEN": WORKER_TOKEN,
    }
    command = [
        ST,
        "--config-file",
        str(HERE / "schemathesis.toml"),
        "run",
        f"{base_url}/openapi.json",
        "--checks",
        "all",
        "--seed",
        str(SEED),
        "--max-examples",
        str(EXAMPLES),
        "--workers",
        "1",
        "--no-color",
        f"--report-dir={tmp_path}",
    ]
    run = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    document = httpx.get(f"{base_url}/openapi.json").json()
    operations = sum(len(methods) for methods in document["paths"].values())
    assert f"Tested: {operations}" in output, output
