"""The whole API fuzzed from its own OpenAPI document by schemathesis, as ``st run`` does it.

Two runs of the schemathesis command line against a real router on loopback, one with the
admin's key and one with a user's while another user's requests exist: every operation, every
built-in check (``--checks all``, but ``use_after_free``: cancelling is the API's only DELETE
and the request stays) and the router's own (``schemathesis_hooks.py``), all four phases
(examples, coverage, fuzzing, stateful), a fixed seed and 20 examples per operation. The
exceptions to the built-in checks are in ``schemathesis.toml`` beside this file, each with its
reason. In the user's run the other user's request ids are also put into the paths that take a
request id, and a check of the router's own fails any answer that shows one of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from gpu_request_router.api import create_app
from gpu_request_router.config.config_loader import Settings
from gpu_request_router.http.keys import hash_key
from gpu_request_router.testing import free_port, make_settings

HERE = Path(__file__).parent
ST = str(Path(sys.executable).parent / "st")
USER_KEY = "fuzz-user-key-0123456789"
OTHER_KEY = "fuzz-other-key-0123456789"
ADMIN_KEY = "fuzz-admin-key-0123456789"
WORKER_TOKEN = "fuzz-worker-token-0123456789"
SEED = 20261206
EXAMPLES = 20
# Every model of the catalog runs in well under a millisecond here, so that the fleet never
# fills up and a synchronous call is answered within the run's request timeout.
FAST = {"H100-80GB": {"prefill_tokens_per_s": 1e12, "decode_tokens_per_s": 1e9}}


# In the user's run, the other user's running requests are on a GPU of their own: an L4 of a
# second worker, cordoned once they run there. The user's requests never wait behind them
# (nothing of theirs could ever use that GPU but by naming its type), so a long poll of the
# user's own request never outlasts the run's request timeout.
SIDE_GPU = "side:0"
H100S = {"type": "H100-80GB", "count": 2}
L4 = {"type": "L4-24GB", "count": 1}


def fuzz_settings(*, side: bool = False) -> Settings:
    """Two simulated H100s, an admin's and two users' keys; with ``side``, the L4 worker too."""
    backends = [{"name": "sim", "kind": "simulated", "gpus": [H100S], "slots_per_gpu": 8}]
    if side:
        backends.append({"name": "side", "kind": "simulated", "gpus": [L4], "slots_per_gpu": 8})
    return make_settings(
        backends=backends,
        auth={
            "enabled": True,
            "users": [
                {"name": "fuzzer", "role": "user", "api_key_sha256": hash_key(USER_KEY)},
                {"name": "other", "role": "user", "api_key_sha256": hash_key(OTHER_KEY)},
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


@contextmanager
def serving(settings: Settings) -> Iterator[str]:
    """A router for ``settings`` served over loopback: its base URL (stopped on leaving)."""
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
    assert not thread.is_alive()


def run_schemathesis(base_url: str, report_dir: Path, key: str, **env: str) -> None:
    """``st run --checks all`` over every operation with ``key``; it must find no failure.

    ``env`` adds environment variables for ``schemathesis_hooks.py``.
    """
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "FUZZ_KEY": key,
        "FUZZ_WORKER_TOKEN": WORKER_TOKEN,
        **env,
    }
    command = [
        ST,
        "--config-file",
        str(HERE / "schemathesis.toml"),
        "run",
        f"{base_url}/openapi.json",
        "--checks",
        "all",
        # Cancelling is the API's only DELETE: the request stays (see schemathesis.toml).
        "--exclude-checks",
        "use_after_free",
        "--seed",
        str(SEED),
        "--max-examples",
        str(EXAMPLES),
        "--workers",
        "1",
        "--no-color",
        f"--report-dir={report_dir}",
    ]
    run = subprocess.run(
        command,
        env=environment,
        cwd=report_dir,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    document = httpx.get(f"{base_url}/openapi.json").json()
    operations = sum(len(methods) for methods in document["paths"].values())
    assert f"Tested: {operations}" in output, output


def test_schemathesis_finds_no_failure_with_every_check(tmp_path: Path) -> None:
    """``st run --checks all`` over every operation as the admin, with a fixed seed, passes."""
    with serving(fuzz_settings()) as url:
        run_schemathesis(url, tmp_path, ADMIN_KEY)


def test_schemathesis_as_a_user_never_sees_another_users_requests(tmp_path: Path) -> None:
    """As a user, with another user's requests in every state, no answer shows one of them.

    The other user's requests (two running, one succeeded, one cancelled) are handed to the
    hooks, which also put their ids into the paths that take a request id; afterwards the
    running ones still run: nothing the user did cancelled them.
    """
    with serving(fuzz_settings(side=True)) as url:
        other = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {OTHER_KEY}"})
        root = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        with other, root:

            def submit(simulate: dict[str, object], **fields: object) -> str:
                body = {
                    "model": "tinyllama-1.1b",
                    "input": {"prompt": "hello", "max_tokens": 8, "simulate": simulate},
                    **fields,
                }
                response = other.post("/v1/requests", json=body)
                assert response.status_code == 202, response.text
                request_id: str = response.json()["id"]
                return request_id

            on_the_side = {"resources": {"gpu_type": "L4-24GB"}}
            running = [submit({"failure": "hang"}, **on_the_side) for _ in range(2)]
            cancelled = submit({"failure": "hang"}, **on_the_side)
            succeeded = submit({"duration_s": 0.001})
            assert other.delete(f"/v1/requests/{cancelled}").status_code == 200
            done = other.get(f"/v1/requests/{succeeded}", params={"wait": 10}).json()
            assert done["status"] == "succeeded"
            for request_id in running:
                placed = other.get(f"/v1/requests/{request_id}").json()["placement"]
                assert placed["gpu_ids"] == [SIDE_GPU]
            assert root.post(f"/v1/gpus/{SIDE_GPU}/cordon").status_code == 200
            theirs = ",".join([*running, succeeded, cancelled])
            run_schemathesis(url, tmp_path, USER_KEY, FUZZ_FOREIGN_IDS=theirs)
            for request_id in running:
                status = other.get(f"/v1/requests/{request_id}").json()["status"]
                assert status == "running", request_id
