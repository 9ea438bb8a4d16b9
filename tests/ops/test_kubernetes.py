"""contrib/kubernetes: every manifest is valid offline and the pieces refer to each other correctly.

Core objects are validated with ``kubernetes-validate --strict`` against
pinned Kubernetes versions, the KEDA ScaledObject with ``check-jsonschema``
against the vendored KEDA CRD schema. Nothing is applied to a cluster.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from ..processes import Processes, get_json
from .conftest import ROOT, venv_tool

K8S = ROOT / "contrib" / "kubernetes"
SCHEMAS = K8S / "schemas"
KEDA_SCHEMA = SCHEMAS / "scaledobject-v1alpha1.json"
#: The oldest Kubernetes the manifests claim (README) and a recent one.
KUBERNETES_VERSIONS = ("1.30.0", "1.34.0")
#: Apply sets, in the README's order: one balancer, or three sharing Redis.
LAYOUTS = {
    "single": ["paddler-config.yaml", "paddler-balancer.yaml", "llamacpp.yaml", "keda-scaledobject.yaml"],
    "multi-replica": [
        "paddler-config.yaml",
        "multi-replica/redis.yaml",
        "multi-replica/paddler-balancer.yaml",
        "llamacpp.yaml",
        "keda-scaledobject.yaml",
    ],
}
#: Created by the README's ``kubectl create secret`` step, not by a manifest.
SECRET = ("paddler-management-token", "token")
PADDLER_IMAGE_NAME = "paddler"
LLAMACPP_IMAGE = "ghcr.io/ggml-org/llama.cpp:server"
STATE_URL = "redis://paddler-redis:6379/0"


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if SCHEMAS not in p.parents)


def documents(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def layout(name: str) -> list[dict[str, Any]]:
    return [doc for file in LAYOUTS[name] for doc in documents(K8S / file)]


def objects(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


def flag(args: list[str], name: str) -> str:
    """The value after ``name`` in an argument list (exactly one occurrence)."""
    positions = [i for i, arg in enumerate(args) if arg == name]
    assert len(positions) == 1, f"{name} appears {len(positions)} times in {args}"
    return args[positions[0] + 1]


def balancer_toml() -> dict[str, Any]:
    config_map = objects(documents(K8S / "paddler-config.yaml"), "ConfigMap")["paddler-config"]
    return tomllib.loads(config_map["data"]["paddler.toml"])


def endpoint_port(endpoint: str) -> int:
    """The port of a ``tcp:PORT:...`` endpoint string."""
    kind, port, *_ = endpoint.split(":")
    assert kind in ("tcp", "tcp6"), endpoint
    return int(port)


def is_paddler(container: dict[str, Any]) -> bool:
    return container["image"].rsplit("/", 1)[-1].split(":")[0] == PADDLER_IMAGE_NAME


# -- parsing and schemas ------------------------------------------------------


def test_every_manifest_parses_into_named_objects_with_unique_names() -> None:
    """Every YAML document is a mapping with apiVersion, kind and a name; no kind/name repeats in an apply set."""
    files = manifest_files()
    assert {str(p.relative_to(K8S)) for p in files} == {f for files in LAYOUTS.values() for f in files}
    for path in files:
        docs = documents(path)
        assert docs, f"{path} holds no document"
        for doc in docs:
            assert isinstance(doc, dict), path
            assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), (path, doc)
    for name in LAYOUTS:
        keys = [(doc["kind"], doc["metadata"]["name"]) for doc in layout(name)]
        assert len(keys) == len(set(keys)), f"{name}: duplicate objects {keys}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_pass_strict_kubernetes_schemas(version: str) -> None:
    """Every non-KEDA object validates against the Kubernetes OpenAPI schema, unknown fields refused."""
    import kubernetes_validate

    failures = []
    checked = 0
    for path in manifest_files():
        for doc in documents(path):
            if doc["apiVersion"].startswith("keda.sh/"):
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                checked += 1
            except kubernetes_validate.ValidationError as e:
                failures.append(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")
    assert failures == []
    assert checked >= 10


def test_strict_kubernetes_validation_refuses_a_misspelt_field() -> None:
    """The validator in use does catch mistakes: a misspelt Deployment field and a string port fail."""
    import kubernetes_validate

    deployment = objects(documents(K8S / "paddler-balancer.yaml"), "Deployment")["paddler-balancer"]
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["replicaz"] = misspelt["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSIONS[0], strict=True)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8086"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSIONS[0], strict=True)


def run_check_jsonschema(instance: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [venv_tool("check-jsonschema"), "--schemafile", str(KEDA_SCHEMA), str(instance)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_scaled_object_passes_the_vendored_keda_crd_schema() -> None:
    """check-jsonschema accepts keda-scaledobject.yaml against the KEDA CRD's (strict) schema."""
    result = run_check_jsonschema(K8S / "keda-scaledobject.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_keda_schema_refuses_a_misspelt_scaled_object(tmp_path: Path) -> None:
    """A misspelt ScaledObject field and a wrong kind are errors, not silently pruned."""
    (scaled,) = documents(K8S / "keda-scaledobject.yaml")
    misspelt = copy.deepcopy(scaled)
    misspelt["spec"]["minReplicaCounts"] = misspelt["spec"].pop("minReplicaCount")
    path = tmp_path / "misspelt.yaml"
    path.write_text(yaml.safe_dump(misspelt))
    result = run_check_jsonschema(path)
    assert result.returncode == 1 and "minReplicaCounts" in result.stdout, result.stdout + result.stderr
    wrong_kind = dict(scaled, kind="ScaledJob")
    path.write_text(yaml.safe_dump(wrong_kind))
    assert run_check_jsonschema(path).returncode == 1


def test_vendored_json_schema_is_what_the_generator_makes_from_the_vendored_crd() -> None:
    """schemas/scaledobject-v1alpha1.json is exactly crd_to_jsonschema.py's output for keda.sh_scaledobjects.yaml."""
    spec = importlib.util.spec_from_file_location("crd_to_jsonschema", SCHEMAS / "crd_to_jsonschema.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = module.render(str(SCHEMAS / "keda.sh_scaledobjects.yaml"), "v1alpha1")
    assert KEDA_SCHEMA.read_text(encoding="utf-8") == expected
    readme = (SCHEMAS / "README.md").read_text(encoding="utf-8")
    assert "v2.20.2" in readme and "keda.sh_scaledobjects.yaml" in readme


def test_scaled_object_keeps_the_crd_rule_the_json_schema_cannot_express() -> None:
    """The CRD's CEL rule: minReplicaCount <= maxReplicaCount (default 100)."""
    (scaled,) = documents(K8S / "keda-scaledobject.yaml")
    spec = scaled["spec"]
    assert spec["minReplicaCount"] == 0
    assert spec["minReplicaCount"] <= spec.get("maxReplicaCount", 100)


# -- cross-references -----------------------------------------------------------


@pytest.mark.parametrize("name", LAYOUTS)
def test_services_select_exactly_one_deployments_pods_and_target_its_named_ports(name: str) -> None:
    """Each Service's selector matches one Deployment's pod labels; each targetPort is a named containerPort with the same number."""
    docs = layout(name)
    deployments = objects(docs, "Deployment")
    services = objects(docs, "Service")
    assert services
    for service_name, service in services.items():
        selector = service["spec"]["selector"]
        matching = [
            d for d in deployments.values()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matching) == 1, f"Service {service_name} selects {[d['metadata']['name'] for d in matching]}"
        ports = {
            p["name"]: p["containerPort"]
            for c in matching[0]["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service_name}: no container port named {port['targetPort']}"
            assert port["port"] == ports[port["targetPort"]], f"{service_name}: {port} vs {ports}"


@pytest.mark.parametrize("name", LAYOUTS)
def test_deployment_selectors_match_their_pod_labels(name: str) -> None:
    """Each Deployment's selector matches its own pod template (else the API refuses it)."""
    for deployment in objects(layout(name), "Deployment").values():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_agent_reports_to_the_management_service_port_the_balancer_listens_on(name: str) -> None:
    """--balancer http://paddler-management:8085 names a Service and port whose target is the port paddler.toml listens on."""
    docs = layout(name)
    agent = containers(objects(docs, "Deployment")["llamacpp"])["paddler-agent"]
    url = urlsplit(flag(agent["args"], "--balancer"))
    assert url.scheme == "http" and url.path in ("", "/")
    assert url.hostname
    service = objects(docs, "Service")[url.hostname]
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    balancer = objects(docs, "Deployment")["paddler-balancer"]
    (target,) = [
        p for p in containers(balancer)["balancer"]["ports"] if p["name"] == port["targetPort"]
    ]
    assert target["containerPort"] == endpoint_port(balancer_toml()["management-listen"])
    assert target["name"] == "management"


@pytest.mark.parametrize("name", LAYOUTS)
def test_balancer_ports_probes_and_config_agree(name: str) -> None:
    """The proxy and management container ports are the paddler.toml listeners; readiness is the proxy's /health, liveness the management /health."""
    balancer = objects(layout(name), "Deployment")["paddler-balancer"]
    container = containers(balancer)["balancer"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    toml = balancer_toml()
    assert ports == {
        "proxy": endpoint_port(toml["listen"]),
        "management": endpoint_port(toml["management-listen"]),
    }
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "proxy"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "management"}
    assert flag(container["args"], "--config") == "/etc/paddler/paddler.toml"
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/paddler"]
    (volume,) = [v for v in balancer["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "paddler-config"
    annotations = balancer["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["management"])


MEMORY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "": 1}


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (``1Gi``, ``512Mi``, ``1e9``...) in bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?(?:e\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T|)", quantity)
    assert match, quantity
    return int(float(match.group(1)) * MEMORY_UNITS[match.group(2)])


def test_memory_bytes_reads_binary_and_decimal_suffixes() -> None:
    """The quantity parser used below: 1Gi, 256Mi, 1G and plain bytes."""
    assert [memory_bytes(q) for q in ("1Gi", "256Mi", "1G", "4096")] == [2**30, 256 * 2**20, 10**9, 4096]


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_request_buffer_fits_in_half_the_balancers_memory_limit(name: str) -> None:
    """Buffered bodies are held in memory: max-buffered-requests x max-request-body stays under half the limit."""
    toml = balancer_toml()
    container = containers(objects(layout(name), "Deployment")["paddler-balancer"])["balancer"]
    limit = memory_bytes(container["resources"]["limits"]["memory"])
    assert toml["max-buffered-requests"] * toml["max-request-body"] <= limit / 2


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_llamacpp_pod_runs_llama_server_with_slots_and_the_agent_points_at_it(name: str) -> None:
    """llama-server runs with --slots --metrics -np 4 on the port the agent's --llamacpp and --external-url use."""
    deployment = objects(layout(name), "Deployment")["llamacpp"]
    by_name = containers(deployment)
    server, agent = by_name["llama-server"], by_name["paddler-agent"]
    assert server["image"] == LLAMACPP_IMAGE
    assert {"--slots", "--metrics"} <= set(server["args"]) and flag(server["args"], "-np") == "4"
    port = int(flag(server["args"], "--port"))
    assert [p["containerPort"] for p in server["ports"]] == [port]
    llamacpp = urlsplit(flag(agent["args"], "--llamacpp"))
    external = urlsplit(flag(agent["args"], "--external-url"))
    assert (llamacpp.hostname, llamacpp.port) == ("127.0.0.1", port)
    assert (external.netloc, external.port) == (f"$(POD_IP):{port}", port)
    assert flag(agent["args"], "--name") == "$(POD_NAME)"
    env = {e["name"]: e for e in agent["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    drain = float(flag(agent["args"], "--drain-timeout"))
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_variable_used_in_args_is_defined_in_that_container(name: str) -> None:
    """$(VAR) in args is expanded only when VAR is in the container's env; otherwise Kubernetes passes it literally."""
    for deployment in objects(layout(name), "Deployment").values():
        for container in containers(deployment).values():
            defined = {e["name"] for e in container.get("env", [])}
            used = {m for arg in container.get("args", []) for m in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg)}
            assert used <= defined, f"{container['name']}: {used - defined} undefined"


@pytest.mark.parametrize("name", LAYOUTS)
def test_config_maps_secrets_and_volumes_referenced_exist(name: str) -> None:
    """Every configMapKeyRef/configMap volume names a ConfigMap (and key) in the apply set; every secret is the README's; every mount has a volume."""
    docs = layout(name)
    config_maps = objects(docs, "ConfigMap")
    readme = (K8S / "README.md").read_text(encoding="utf-8")
    assert f"kubectl create secret generic {SECRET[0]}" in readme and f"--from-literal={SECRET[1]}=" in readme
    secrets_used = set()
    for deployment in objects(docs, "Deployment").values():
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{container['name']}: no volume {mount['name']}"
            for env in container.get("env", []):
                source = env.get("valueFrom", {})
                if "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    assert ref["key"] in config_maps[ref["name"]]["data"], ref
                if "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    secrets_used.add((ref["name"], ref["key"]))
                    assert env["name"] == "PADDLER_MANAGEMENT_TOKEN"
    assert secrets_used == {SECRET}


def test_every_paddler_container_runs_the_same_image_and_llamacpp_starts_at_zero() -> None:
    """The balancer and the agent sidecar use one paddler image; KEDA owns the llama.cpp replica count, from 0."""
    images = set()
    for name in LAYOUTS:
        for deployment in objects(layout(name), "Deployment").values():
            images |= {c["image"] for c in containers(deployment).values() if is_paddler(c)}
    assert len(images) == 1, images
    llamacpp = objects(layout("single"), "Deployment")["llamacpp"]
    assert llamacpp["spec"]["replicas"] == 0


@pytest.mark.parametrize("name", LAYOUTS)
def test_containers_are_hardened(name: str) -> None:
    """Non-root, read-only root fs, no privilege escalation, all capabilities dropped, memory limited, no service-account token."""
    for deployment in objects(layout(name), "Deployment").values():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in pod["containers"]:
            context = container["securityContext"]
            where = f"{deployment['metadata']['name']}/{container['name']}"
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert "memory" in container["resources"]["limits"], where
            assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), where
            assert "livenessProbe" in container or "readinessProbe" in container, where


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_scaled_object_scales_the_llamacpp_deployment_from_zero_on_paddler_demand(name: str) -> None:
    """scaleTargetRef is the llama.cpp Deployment; the trigger queries buffered plus in-flight requests; threshold = slots per pod."""
    docs = layout(name)
    (scaled,) = objects(docs, "ScaledObject").values()
    target = scaled["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment" and target.get("apiVersion", "apps/v1") == "apps/v1"
    deployment = objects(docs, "Deployment")[target["name"]]
    assert scaled["spec"]["minReplicaCount"] == 0
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert "sum(paddler_requests_buffered)" in query and "sum(paddler_requests_in_flight)" in query
    server = containers(deployment)["llama-server"]
    assert trigger["metadata"]["threshold"] == flag(server["args"], "-np")
    assert float(trigger["metadata"]["activationThreshold"]) == 0


def test_the_multi_replica_balancer_is_the_single_one_with_three_replicas_and_redis_state() -> None:
    """multi-replica/paddler-balancer.yaml differs from paddler-balancer.yaml only in replicas, --state, spreading and a PDB."""
    single = objects(layout("single"), "Deployment")["paddler-balancer"]
    multi_docs = layout("multi-replica")
    multi = objects(multi_docs, "Deployment")["paddler-balancer"]
    assert multi["spec"]["replicas"] == 3
    args = containers(multi)["balancer"]["args"]
    assert flag(args, "--state") == STATE_URL
    redis_url = urlsplit(STATE_URL)
    assert redis_url.hostname
    redis_service = objects(multi_docs, "Service")[redis_url.hostname]
    assert [p["port"] for p in redis_service["spec"]["ports"]] == [redis_url.port]
    comparable = copy.deepcopy(multi)
    comparable["spec"]["replicas"] = single["spec"]["replicas"]
    comparable["spec"]["template"]["spec"].pop("topologySpreadConstraints")
    container = comparable["spec"]["template"]["spec"]["containers"][0]
    i = container["args"].index("--state")
    del container["args"][i:i + 2]
    assert comparable == single
    (budget,) = objects(multi_docs, "PodDisruptionBudget").values()
    assert budget["spec"]["selector"]["matchLabels"] == multi["spec"]["selector"]["matchLabels"]
    assert budget["spec"]["minAvailable"] < multi["spec"]["replicas"]
    single_services = objects(layout("single"), "Service")
    assert {k: v for k, v in objects(multi_docs, "Service").items() if k in single_services} == single_services


def test_only_balancer_pods_may_reach_redis() -> None:
    """The NetworkPolicy selects the Redis pods and admits only the balancer pods, on Redis's port."""
    docs = layout("multi-replica")
    (policy,) = objects(docs, "NetworkPolicy").values()
    redis = objects(docs, "Deployment")["paddler-redis"]
    balancer = objects(docs, "Deployment")["paddler-balancer"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert source["podSelector"]["matchLabels"].items() <= balancer["spec"]["template"]["metadata"]["labels"].items()
    assert [p["port"] for p in rule["ports"]] == [p["name"] for p in containers(redis)["redis"]["ports"]]


# -- against paddler itself ------------------------------------------------------


def long_flags(args: list[str]) -> set[str]:
    return {arg.split("=", 1)[0] for arg in args if arg.startswith("--")}


def help_flags(text: str) -> set[str]:
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", text))


def test_every_flag_in_the_manifests_is_a_real_paddler_flag(paddler_help) -> None:
    """The agent's and the balancers' flags all appear in `paddler agent --help` / `paddler balancer --help`."""
    unknown = {}
    for name in LAYOUTS:
        for deployment in objects(layout(name), "Deployment").values():
            for container in containers(deployment).values():
                if not is_paddler(container):
                    continue
                subcommand, *args = container["args"]
                missing = long_flags(args) - help_flags(paddler_help(subcommand))
                if missing:
                    unknown[f"{name}: paddler {subcommand}"] = sorted(missing)
    assert unknown == {}


@pytest.mark.integration
def test_the_configmap_starts_a_balancer_that_is_ready_and_alive_with_no_upstream(
    procs: Processes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """paddler.toml from the ConfigMap runs (listeners moved to loopback); with no llama.cpp pod both probe targets answer 200."""
    config = objects(documents(K8S / "paddler-config.yaml"), "ConfigMap")["paddler-config"]
    path = tmp_path / "paddler.toml"
    path.write_text(config["data"]["paddler.toml"], encoding="utf-8")
    monkeypatch.setenv("PADDLER_MANAGEMENT_TOKEN", "a-test-token")
    _, proxy, management = procs.balancer("--config", str(path))
    status, body = get_json(proxy + "/health")
    assert status == 200 and body["upstreams"] == {"healthy": 0, "total": 0}, body
    status, body = get_json(management + "/health")
    assert status == 200, body


def test_the_readme_lists_every_file_and_the_apply_order() -> None:
    """README.md names every manifest and applies the ConfigMap before the balancer and the Deployment before its ScaledObject."""
    readme = (K8S / "README.md").read_text(encoding="utf-8")
    for path in manifest_files():
        assert str(path.relative_to(K8S)) in readme
    applies = [shlex.split(line, comments=True)[-1] for line in readme.splitlines() if line.startswith("kubectl apply -f ")]
    assert applies.index("paddler-config.yaml") < applies.index("paddler-balancer.yaml")
    assert applies.index("llamacpp.yaml") < applies.index("keda-scaledobject.yaml")
    assert applies.index("multi-replica/redis.yaml") < applies.index("multi-replica/paddler-balancer.yaml")
