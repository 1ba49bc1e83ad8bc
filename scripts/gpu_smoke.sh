#!/usr/bin/env bash
# Smoke test on a machine with an NVIDIA GPU (about a minute; stops itself within 5):
# a `gpurouter worker` on real NVML running a real PyTorch job through the callable executor,
# a `gpurouter serve` in front of it, work placed through the API, and a summary printed.
#
# Needs: nvidia-smi, and a Python with this package installed (make run builds .venv) and
# PyTorch with CUDA. Set PYTHON to choose the interpreter (default: .venv/bin/python, python3).
# Writes logs and the summary to $OUT if set, else to a temporary folder.
# SIMULATE=2xH100-80GB runs the same flow on simulated GPUs (no GPU, no PyTorch): a dry run of
# this script, which the test suite does.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-$(mktemp -d)}
WORK=$(mktemp -d)
ROUTER_PORT=${ROUTER_PORT:-18080}
WORKER_PORT=${WORKER_PORT:-19090}
JOBS=${JOBS:-4}
KEY=smoke-user-key-0123456789
TOKEN=smoke-worker-token-0123456789
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
exec > >(tee "$OUT/summary.txt") 2>&1

SIMULATE=${SIMULATE:-}
if [ -z "$SIMULATE" ]; then
  echo "== GPUs (nvidia-smi)"
  nvidia-smi --query-gpu=index,name,memory.total,memory.used,utilization.gpu,temperature.gpu,power.draw --format=csv
  echo "== Python and PyTorch"
  "$PYTHON" - <<'PY'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
assert torch.cuda.is_available(), "PyTorch sees no CUDA device"
print("devices:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
PY
  EXECUTOR="executor: callable
  callable: gpu_request_router.worker.jobs:matmul"
  DURATION=10
else
  echo "== dry run on simulated GPUs: $SIMULATE"
  EXECUTOR="executor: simulated
  simulate: $SIMULATE"
  DURATION=0.5
fi

KEY_HASH=$("$PYTHON" -c "import hashlib,sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest())" "$KEY")
cat > "$WORK/config.yaml" <<YAML
server: {port: $ROUTER_PORT}
auth:
  users: [{name: smoke, role: admin, api_key_sha256: $KEY_HASH}]
  worker_token: $TOKEN
state: {backend: sqlite, sqlite_path: $WORK/router.db}
models:
  matmul-job: {task: generic, weights_mb: 0, default_duration_s: $DURATION, max_context: 1}
backends:
  - {name: gpu-host, kind: agent, url: "http://127.0.0.1:$WORKER_PORT"}
worker:
  name: gpu-host
  port: $WORKER_PORT
  slots: 2
  $EXECUTOR
monitor: {poll_interval_s: 0.5, stale_after_s: 10}
logging: {level: warning}
YAML

BIN=$(dirname "$PYTHON")/gpurouter
[ -x "$BIN" ] || BIN="$PYTHON -m gpu_request_router.cli"
$BIN worker --config "$WORK/config.yaml" > "$OUT/worker.log" 2>&1 & pids+=($!)
$BIN serve --config "$WORK/config.yaml" > "$OUT/router.log" 2>&1 & pids+=($!)

"$PYTHON" - "$ROUTER_PORT" "$KEY" "$JOBS" <<'PY'
import json, sys, time, httpx
port, key, jobs = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
url = f"http://127.0.0.1:{port}"
client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
deadline = time.monotonic() + 120
while True:
    try:
        if client.get("/readyz").status_code == 200:
            break
    except httpx.HTTPError:
        pass
    assert time.monotonic() < deadline, "the router and worker did not become ready"
    time.sleep(0.5)
print("== GPUs as the router sees them (NVML through the worker)")
for gpu in client.get("/v1/gpus").json()["items"]:
    print(json.dumps({k: gpu[k] for k in ("id", "name", "type", "uuid", "memory_total_mb",
                      "memory_used_mb", "utilization_pct", "temperature_c", "power_w", "health")}))
print(f"== {jobs} PyTorch matmul jobs through the router")
ids = []
for index in range(jobs):
    body = {"model": "matmul-job", "task": "generic",
            "input": {"n": 8192, "iterations": 100, "dtype": "bfloat16"},
            "resources": {"gpu_memory_mb": 2048}}
    response = client.post("/v1/requests", json=body)
    assert response.status_code == 202, response.text
    ids.append(response.json()["id"])
ok = 0
for request_id in ids:
    done = client.get(f"/v1/requests/{request_id}", params={"wait": 60}).json()
    while done["status"] not in ("succeeded", "failed", "cancelled", "expired"):
        done = client.get(f"/v1/requests/{request_id}", params={"wait": 60}).json()
    result = done.get("result") or {}
    ok += done["status"] == "succeeded"
    print(json.dumps({"id": request_id, "status": done["status"], "gpu": done["placement"]["gpu_id"],
                      "attempts": done["attempts"], "tflops": result.get("tflops"),
                      "seconds": result.get("seconds"), "peak_memory_mb": result.get("peak_memory_mb"),
                      "device": result.get("device"), "error": done.get("error")}))
metrics = client.get("/v1/metrics").json()
print("== summary")
print(json.dumps({"succeeded": ok, "of": jobs, "latency_s": metrics["latency_s"],
                  "queue_wait_s": metrics["queue_wait_s"], "gpus": metrics["gpus"]}))
sys.exit(0 if ok == jobs else 1)
PY
echo "logs and this summary: $OUT"
