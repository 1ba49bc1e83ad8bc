"""The Kubernetes manifests in deploy/kubernetes are valid and run a configuration that loads.

Every document is validated against the Kubernetes OpenAPI schemas bundled with
``kubernetes-validate`` (strict: unknown fields fail). The ConfigMaps' configurations are loaded
through :func:`load_settings` with the environment the pods give them (the Secret's values, the
worker's variables). A cluster never sees them here: scheduling, the image and the NVIDIA device
plugin are not tested.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gpu_request_router.api.routes.metrics_routes import router as health_routes
from gpu_request_router.config.config_loader import Settings, load_settings

KUBERNETES = Path(__file__).parents[3] / "deploy" / "kubernetes"
ParseCommand = Callable[[list[str]], tuple[str, dict[str, Any]]]
#: The oldest Kubernetes the manifests are meant for, and the newest the package knows.
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def documents(name: str) -> list[dict[str, Any]]:
    """The YAML documents of one manifest file."""
    return [doc for doc in yaml.safe_load_all((KUBERNETES / name).read_text()) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The single document of ``kind``."""
    (found,) = [doc for doc in docs if doc["kind"] == kind]
    return found


ROUTER = documents("router.yaml")
WORKER = documents("worker.yaml")


def container(workload: dict[str, Any]) -> dict[str, Any]:
    """The only container of a Deployment's or DaemonSet's pod."""
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def load_config_map(
    config_map: dict[str, Any], key: str, env: dict[str, str], tmp_path: Path
) -> Settings:
    """``load_settings`` on the ConfigMap's file with ``env`` set, as the pod runs it."""
    path = tmp_path / key
    path.write_text(config_map["data"][key])
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        return load_settings(path)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "doc", ROUTER + WORKER, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}"
)
def test_every_document_is_valid(doc: dict[str, Any], version: str) -> None:
    """Each manifest passes the Kubernetes schema of its kind, unknown fields refused."""
    kubernetes_validate.validate(doc, version, strict=True)


def test_a_planted_wrong_field_fails() -> None:
    """The validation is not vacuous: a misspelt probe field is refused."""
    deployment = copy.deepcopy(one(ROUTER, "Deployment"))
    container(deployment)["livenessProbe"]["httpGet"]["pth"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError, match="'pth' was unexpected"):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


class TestRouter:
    def test_config_loads_with_the_secrets(self, tmp_path: Path) -> None:
        """config.yaml loads with the Secret's variables, which give the users and the token."""
        secret = one(ROUTER, "Secret")["stringData"]
        settings = load_config_map(one(ROUTER, "ConfigMap"), "config.yaml", secret, tmp_path)
        assert settings.server.host == "0.0.0.0"
        assert settings.state.backend == "sqlite"
        mount = {
            m["name"]: m["mountPath"] for m in container(one(ROUTER, "Deployment"))["volumeMounts"]
        }
        assert Path(settings.state.sqlite_path).parent == Path(mount["state"])
        assert [user.name for user in settings.auth.users] == ["admin"]
        assert settings.auth.worker_token == secret["GPUROUTER_AUTH__WORKER_TOKEN"]

    def test_one_replica_on_a_claimed_volume(self) -> None:
        """SQLite: one replica, recreated (never two at once), its state on the PVC."""
        deployment = one(ROUTER, "Deployment")
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        claim = volumes["state"]["persistentVolumeClaim"]["claimName"]
        assert claim == one(ROUTER, "PersistentVolumeClaim")["metadata"]["name"]

    def test_probes_ask_the_router_s_health_routes(self) -> None:
        """Liveness on /healthz and readiness on /readyz, routes the router serves, on its port."""
        served = {route.path for route in health_routes.routes}
        router = container(one(ROUTER, "Deployment"))
        assert router["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert router["readinessProbe"]["httpGet"]["path"] == "/readyz"
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert router[probe]["httpGet"]["path"] in served
        service = one(ROUTER, "Service")
        assert (
            service["spec"]["selector"]
            == one(ROUTER, "Deployment")["spec"]["selector"]["matchLabels"]
        )
        assert router["ports"][0]["containerPort"] == 8080

    def test_command_is_a_real_gpurouter_command(self, parse_command: ParseCommand) -> None:
        """The container runs ``gpurouter serve`` on the mounted config."""
        verb, params = parse_command(container(one(ROUTER, "Deployment"))["args"][1:])
        assert verb == "serve"
        assert str(params["config"]) == "/etc/gpurouter/config.yaml"


class TestWorker:
    def test_config_loads_as_the_pod_runs_it(self, tmp_path: Path) -> None:
        """worker.yaml with the pod's variables (node name, pod IP, token) loads and registers."""
        daemon_set = one(WORKER, "DaemonSet")
        pod_values = {"NODE_NAME": "gpu-node-a", "POD_IP": "10.1.2.3"}
        env: dict[str, str] = {}
        for variable in container(daemon_set)["env"]:
            if "value" in variable:
                env[variable["name"]] = re.sub(
                    r"\$\((\w+)\)", lambda m: pod_values[m[1]], variable["value"]
                )
            elif "secretKeyRef" in variable.get("valueFrom", {}):
                key = variable["valueFrom"]["secretKeyRef"]["key"]
                env[variable["name"]] = one(ROUTER, "Secret")["stringData"][key]
        settings = load_config_map(one(WORKER, "ConfigMap"), "worker.yaml", env, tmp_path)
        worker = settings.worker
        assert worker.name == "gpu-node-a"
        assert worker.advertise_url == f"http://10.1.2.3:{worker.port}"
        service = one(ROUTER, "Service")
        assert worker.router_url == (
            f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
        )
        assert settings.auth.worker_token

    def test_runs_on_gpu_nodes_with_their_gpus(self) -> None:
        """A GPU node selector, the GPU taint tolerated, and GPUs in the limits."""
        pod = one(WORKER, "DaemonSet")["spec"]["template"]["spec"]
        assert any(key.startswith("nvidia.com/") for key in pod["nodeSelector"])
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert (
            int(container(one(WORKER, "DaemonSet"))["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        )

    def test_command_is_a_real_gpurouter_command(self, parse_command: ParseCommand) -> None:
        """The container runs ``gpurouter worker`` on the mounted config."""
        verb, params = parse_command(container(one(WORKER, "DaemonSet"))["args"][1:])
        assert verb == "worker"
        assert str(params["config"]) == "/etc/gpurouter/worker.yaml"

    def test_variables_are_configuration_keys(self, config_key: Callable[[str], bool]) -> None:
        """Each GPUROUTER_* variable the manifests set or mention is a settings key."""
        text = (KUBERNETES / "router.yaml").read_text() + (KUBERNETES / "worker.yaml").read_text()
        names = set(re.findall(r"GPUROUTER_[A-Z0-9_]+", text))
        assert len(names) >= 4
        assert [name for name in sorted(names) if not config_key(name)] == []
