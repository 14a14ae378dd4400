"""The deployment files, checked without a cluster or Docker.

The Helm chart (deploy/helm/voicebus) is linted and rendered with its defaults, with a
cluster's values (ci/cluster-values.yaml, the SIP gateway on its nodes' network) and with the
gateway behind a Service (ci/sip-service-values.yaml); every rendered object must pass Kubernetes' own
schemas (kubernetes-validate, strict: an unknown field fails) for one pinned Kubernetes
release, and must keep the promises of docs/operations.md and docs/security.md. The compose
file is loaded by compose-go, the loader `docker compose` uses (deploy/composecheck).

helm and composecheck are built from pinned Go modules by scripts/install-helm.sh and
scripts/install-composecheck.sh: a few minutes the first time, then cached in .cache/.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "voicebus"
CLUSTER_VALUES = CHART / "ci" / "cluster-values.yaml"
SIP_SERVICE_VALUES = CHART / "ci" / "sip-service-values.yaml"
COMPOSE = ROOT / "deploy" / "compose.yaml"
LIVEKIT_SIP = ROOT / "deploy" / "compose.livekit-sip.yaml"

# The oldest release the chart is checked against; kubernetes-validate 1.37.0 ships its schemas.
KUBERNETES = "1.33.0"
STAGES = ("ingress", "stt", "llm", "tts", "egress")
ROLES = (*STAGES, "token")
# The SIP gateway: off by default; its own Deployment where it is on.
SIP = "sip"
# Kinds from CRDs, which kubernetes-validate has no schema for: checked by hand below.
CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}
# The handover needs VOICEBUS_SHUTDOWN_GRACE plus this much (docs/operations.md).
HANDOVER_MARGIN = 5
# On SIGTERM the SIP gateway hangs its calls up within this many seconds (services/sip).
SIP_HANG_UP = 5

# Building helm takes minutes on a fresh machine: longer than the suite's 300 s per test.
pytestmark = pytest.mark.timeout(1200)


def _install(script: str) -> Path:
    done = subprocess.run([str(ROOT / "scripts" / script)], stdout=subprocess.PIPE, text=True,
                          check=True, timeout=1100)
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path.is_file(), done.stdout
    return path


@pytest.fixture(scope="session")
def helm() -> Path:
    return _install("install-helm.sh")


@pytest.fixture(scope="session")
def composecheck() -> Path:
    return _install("install-composecheck.sh")


def run(*args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)


def render(helm: Path, *options: Any) -> list[dict[str, Any]]:
    done = run(helm, "template", "voicebus", CHART, "--namespace", "voice",
               "--kube-version", KUBERNETES, *options)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="session")
def defaults(helm: Path) -> list[dict[str, Any]]:
    return render(helm)


@pytest.fixture(scope="session")
def cluster(helm: Path) -> list[dict[str, Any]]:
    return render(helm, "-f", CLUSTER_VALUES)


@pytest.fixture(scope="session")
def sip_service(helm: Path) -> list[dict[str, Any]]:
    return render(helm, "-f", SIP_SERVICE_VALUES)


@pytest.fixture(params=["defaults", "cluster", "sip_service"])
def manifests(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return request.getfixturevalue(request.param)


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """Objects of one kind by their component label (ingress … egress, token, sip)."""
    return {doc["metadata"]["labels"]["app.kubernetes.io/component"]: doc
            for doc in docs if doc["kind"] == kind}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container(deployment)["env"]}


def secret_volumes(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {volume["name"]: volume["secret"]
            for volume in deployment["spec"]["template"]["spec"]["volumes"] if "secret" in volume}


def mounted_file(deployment: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) of the file at ``path`` in the container, or an assertion."""
    volumes = secret_volumes(deployment)
    for mount in container(deployment)["volumeMounts"]:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix) and mount["name"] in volumes:
            secret = volumes[mount["name"]]
            name = path[len(prefix):]
            keys = [item["key"] for item in secret.get("items", []) if item["path"] == name]
            return secret["secretName"], keys[0] if keys else name
    raise AssertionError(f"{path} is not in a mounted Secret")


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


# ---- the chart -----------------------------------------------------------------------------

@pytest.mark.parametrize("values", [[], ["-f", CLUSTER_VALUES], ["-f", SIP_SERVICE_VALUES]],
                         ids=["defaults", "cluster", "sip-service"])
def test_the_chart_lints(helm: Path, values: list[Any]) -> None:
    done = run(helm, "lint", "--strict", CHART, *values)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


def test_every_object_is_valid_kubernetes(manifests: list[dict[str, Any]]) -> None:
    for doc in manifests:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_each_stage_has_a_deployment_a_budget_and_an_autoscaler(
        defaults: list[dict[str, Any]], cluster: list[dict[str, Any]]) -> None:
    for docs, roles in ((defaults, set(ROLES)), (cluster, {*ROLES, SIP})):
        assert set(by_kind(docs, "Deployment")) == roles
        assert set(by_kind(docs, "PodDisruptionBudget")) == roles
        for budget in by_kind(docs, "PodDisruptionBudget").values():
            assert budget["spec"]["maxUnavailable"] == 1
    assert set(by_kind(defaults, "HorizontalPodAutoscaler")) == set(STAGES)
    # The cluster values turn the LLM's off: a fixed count instead.
    assert set(by_kind(cluster, "HorizontalPodAutoscaler")) == set(STAGES) - {"llm"}
    deployments = by_kind(cluster, "Deployment")
    assert deployments["llm"]["spec"]["replicas"] == 3
    # With an autoscaler the Deployment leaves the count to it (an upgrade would reset it).
    assert "replicas" not in deployments["stt"]["spec"]


def test_the_image_is_the_stage(cluster: list[dict[str, Any]]) -> None:
    for role, deployment in by_kind(cluster, "Deployment").items():
        assert container(deployment)["image"] == f"registry.example.com/voicebus-{role}:0.1.0"


def test_ready_means_joined_discovery(manifests: list[dict[str, Any]]) -> None:
    for role, deployment in by_kind(manifests, "Deployment").items():
        if role == SIP:  # its own port and address: test_the_gateway_probes_its_metrics_port
            continue
        box = container(deployment)
        ports = {port["name"]: port["containerPort"] for port in box["ports"]}
        assert ports["metrics"] == 9100
        assert env(deployment)["VOICEBUS_METRICS_PORT"]["value"] == "9100"
        assert env(deployment)["VOICEBUS_METRICS_ADDR"]["value"] == "0.0.0.0"
        assert box["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        if role == "token":  # its own endpoint: 503 while the bus is unreachable
            assert box["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
            assert ports["http"] == 8080
        else:
            assert box["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        strategy = deployment["spec"]["strategy"]["rollingUpdate"]
        assert (strategy["maxSurge"], strategy["maxUnavailable"]) == (1, 0)


def test_the_grace_period_covers_the_handover(manifests: list[dict[str, Any]]) -> None:
    for role, deployment in by_kind(manifests, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        hook = container(deployment).get("lifecycle", {}).get("preStop", {})
        sleep = hook.get("sleep", {}).get("seconds", 0)
        if role == SIP:
            # No handover: it hangs its calls up (5 s at most), unregisters (2 s) and drains.
            assert "VOICEBUS_SHUTDOWN_GRACE" not in env(deployment)
            assert pod["terminationGracePeriodSeconds"] >= sleep + SIP_HANG_UP + HANDOVER_MARGIN
            continue
        shutdown = float(env(deployment)["VOICEBUS_SHUTDOWN_GRACE"]["value"])
        assert pod["terminationGracePeriodSeconds"] >= sleep + shutdown + HANDOVER_MARGIN, role
        if role == "token":  # behind a Service: endpoints must be gone before uvicorn stops
            assert sleep >= 1


def test_a_stage_can_have_a_pre_stop_pause(cluster: list[dict[str, Any]]) -> None:
    llm = by_kind(cluster, "Deployment")["llm"]
    assert container(llm)["lifecycle"]["preStop"] == {"sleep": {"seconds": 3}}
    assert llm["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 30


def test_the_chart_refuses_a_grace_period_shorter_than_the_handover(helm: Path) -> None:
    done = run(helm, "template", "voicebus", CHART, "--kube-version", KUBERNETES,
               "--set", "stages.stt.preStopSleepSeconds=6")
    assert done.returncode != 0
    assert "stt: terminationGracePeriodSeconds 20 is too short" in done.stderr


def test_the_chart_refuses_an_unknown_setting(helm: Path) -> None:
    done = run(helm, "template", "voicebus", CHART, "--set", "stages.stt.replica=3")
    assert done.returncode != 0
    assert "replica" in done.stderr


def test_autoscaling_follows_sessions(defaults: list[dict[str, Any]]) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for stage, hpa in by_kind(defaults, "HorizontalPodAutoscaler").items():
        assert hpa["spec"]["scaleTargetRef"]["name"] == f"voicebus-{stage}"
        metrics = {metric["type"]: metric for metric in hpa["spec"]["metrics"]}
        sessions = metrics["Pods"]["pods"]
        assert sessions["metric"]["name"] == "voicebus_sessions_active"
        wanted = values["stages"][stage]["autoscaling"]["sessionsPerPod"]
        assert sessions["target"] == {"type": "AverageValue", "averageValue": str(wanted)}
        # Scaling down hands sessions over: one pod at a time.
        assert hpa["spec"]["behavior"]["scaleDown"]["policies"] == [
            {"type": "Pods", "value": 1, "periodSeconds": 120}]
    stt = by_kind(defaults, "HorizontalPodAutoscaler")["stt"]["spec"]["metrics"]
    assert {"type": "Resource", "resource": {"name": "cpu", "target": {
        "type": "Utilization", "averageUtilization": 70}}} in stt


def test_each_role_mounts_only_its_own_seed(manifests: list[dict[str, Any]]) -> None:
    deployments = by_kind(manifests, "Deployment")
    seeds: dict[str, list[str]] = {}
    for role, deployment in deployments.items():
        variables = env(deployment)
        secret, key = mounted_file(deployment, variables["VOICEBUS_NATS_NKEY_FILE"]["value"])
        assert (secret, key) == (f"voicebus-nkey-{role}", f"{role}.nk")
        for volume in secret_volumes(deployment).values():
            if "-nkey-" in volume["secretName"]:
                seeds.setdefault(volume["secretName"], []).append(role)
        if "VOICEBUS_SESSION_PAGES_NKEY_FILE" in variables:  # the token service, pages on
            assert role == "token"
            pages = variables["VOICEBUS_SESSION_PAGES_NKEY_FILE"]["value"]
            assert mounted_file(deployment, pages) == ("voicebus-nkey-pages", "pages.nk")
    # Every seed is in exactly one Deployment, and it is its role's.
    for secret, holders in seeds.items():
        role = secret.removeprefix("voicebus-nkey-")
        assert holders == ["token" if role == "pages" else role], secret


def test_the_livekit_secret_goes_only_to_the_edges(manifests: list[dict[str, Any]]) -> None:
    for role, deployment in by_kind(manifests, "Deployment").items():
        variables = env(deployment)
        if role in ("ingress", "egress", "token"):
            for name in ("LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
                assert "secretKeyRef" in variables[name]["valueFrom"], (role, name)
        else:
            assert not {"LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"} & set(variables), role


SECRET_NAME = re.compile(r"(SECRET|API_KEY|PASSWORD|TOKEN)$")
SECRET_TEXT = [
    re.compile(r"\bS[UAO][A-Z2-7]{56}\b"),  # an nkey seed
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"voicebus-development-secret|devkey"),  # the development LiveKit pair
]


def test_no_secret_value_is_rendered(manifests: list[dict[str, Any]]) -> None:
    assert not [doc for doc in manifests if doc["kind"] == "Secret"]
    text = yaml.safe_dump_all(manifests)
    for pattern in SECRET_TEXT:
        assert not pattern.search(text), pattern.pattern
    for role, deployment in by_kind(manifests, "Deployment").items():
        for name, item in env(deployment).items():
            if SECRET_NAME.search(name):
                assert "value" not in item and "secretKeyRef" in item["valueFrom"], (role, name)
            if name.endswith(("_FILE", "_TLS_KEY", "_TLS_CERT", "_TLS_CA")):
                # A path to a mounted Secret, never the content.
                mounted_file(deployment, item["value"])


def test_the_cluster_settings_reach_every_service(cluster: list[dict[str, Any]]) -> None:
    nodes = [f"tls://nats-{i}.nats-headless.voice.svc.cluster.local:4222" for i in range(3)]
    for role, deployment in by_kind(cluster, "Deployment").items():
        variables = env(deployment)
        assert variables["VOICEBUS_NATS_URL"]["value"].split(",") == nodes
        # The gateway keeps nothing in JetStream.
        assert variables.get("VOICEBUS_JS_REPLICAS", {}).get("value") == (
            None if role == SIP else "3"), role
        tls = {name: variables[f"VOICEBUS_NATS_TLS_{name}"]["value"] for name in
               ("CA", "CERT", "KEY")}
        for name, path in tls.items():
            assert mounted_file(deployment, path)[0] == "voicebus-nats-client-tls", name
    llm = env(by_kind(cluster, "Deployment")["llm"])
    assert llm["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "voicebus-openai", "key": "api-key"}
    token = env(by_kind(cluster, "Deployment")["token"])
    assert token["VOICEBUS_LIVEKIT_PUBLIC_URL"]["value"] == "wss://livekit.example.com"
    assert token["VOICEBUS_SESSION_PAGES"]["value"] == "true"
    (ingress,) = [doc for doc in cluster if doc["kind"] == "Ingress"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "voicebus-token", "port": {"name": "http"}}


def test_the_pod_monitor_scrapes_the_metrics_port(cluster: list[dict[str, Any]]) -> None:
    (monitor,) = [doc for doc in cluster if doc["kind"] == "PodMonitor"]
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    selector = monitor["spec"]["selector"]["matchLabels"]
    for deployment in by_kind(cluster, "Deployment").values():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()


# ---- the SIP gateway -----------------------------------------------------------------------

SIP_CONFIG = "/etc/voicebus/sip/trunks.toml"


def sip_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())["sip"]


def mounted_config(deployment: dict[str, Any], path: str) -> tuple[str, str]:
    """(ConfigMap name, key) of the file at ``path`` in the container, or an assertion."""
    volumes = {volume["name"]: volume["configMap"]
               for volume in deployment["spec"]["template"]["spec"]["volumes"]
               if "configMap" in volume}
    for mount in container(deployment)["volumeMounts"]:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix) and mount["name"] in volumes:
            assert mount.get("readOnly") is True, mount
            return volumes[mount["name"]]["name"], path[len(prefix):]
    raise AssertionError(f"{path} is not in a mounted ConfigMap")


@pytest.fixture(params=["cluster", "sip_service"])
def with_sip(request: pytest.FixtureRequest) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The manifests with the gateway on, and the values that turned it on."""
    values = {"cluster": CLUSTER_VALUES, "sip_service": SIP_SERVICE_VALUES}[request.param]
    return request.getfixturevalue(request.param), sip_values(values)


def test_the_gateway_is_off_by_default(defaults: list[dict[str, Any]]) -> None:
    assert yaml.safe_load((CHART / "values.yaml").read_text())["sip"]["enabled"] is False
    for doc in defaults:
        assert doc["metadata"]["labels"]["app.kubernetes.io/component"] != SIP, doc["kind"]
        assert SIP not in doc["metadata"]["name"].split("-"), doc["metadata"]["name"]
    assert not [doc for doc in defaults if doc["kind"] == "ConfigMap"]
    names = {item.get("name") for node in walk(defaults) if isinstance(node, dict)
             for item in node.get("env", [])}
    assert not [name for name in names if name and name.startswith("VOICEBUS_SIP_")]


def test_the_gateway_mounts_only_its_seed_and_its_trunks(
        with_sip: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    docs, values = with_sip
    gateway = by_kind(docs, "Deployment")[SIP]
    variables = env(gateway)
    # Its own seed, and no other role's.
    seed = mounted_file(gateway, variables["VOICEBUS_NATS_NKEY_FILE"]["value"])
    assert seed == ("voicebus-nkey-sip", "sip.nk")
    seeds = [v["secretName"] for v in secret_volumes(gateway).values()
             if "-nkey-" in v["secretName"]]
    assert seeds == ["voicebus-nkey-sip"]
    assert not {"LIVEKIT_API_KEY", "LIVEKIT_API_SECRET", "LIVEKIT_URL"} & set(variables)
    # The trunks file: sip.config as a ConfigMap, mounted read-only where VOICEBUS_SIP_CONFIG
    # says; the pods roll when it changes.
    assert variables["VOICEBUS_SIP_CONFIG"]["value"] == SIP_CONFIG
    name, key = mounted_config(gateway, SIP_CONFIG)
    (config_map,) = [doc for doc in docs if doc["kind"] == "ConfigMap"]
    assert (config_map["metadata"]["name"], key) == (name, "trunks.toml") == (
        "voicebus-sip", "trunks.toml")
    assert config_map["data"]["trunks.toml"].strip() == values["config"].strip()
    annotations = gateway["spec"]["template"]["metadata"]["annotations"]
    assert len(annotations["checksum/sip-config"]) == 64
    # Listening beyond loopback, which the trunks file makes safe (the gateway refuses without).
    assert variables["VOICEBUS_SIP_LISTEN"]["value"] == "0.0.0.0:5060"
    assert variables["VOICEBUS_SIP_TRANSPORTS"]["value"] == "udp,tcp"
    assert re.fullmatch(r"\d+-\d+", variables["VOICEBUS_SIP_RTP_PORTS"]["value"])


def test_the_gateways_passwords_come_from_secrets(
        with_sip: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    docs, values = with_sip
    gateway = by_kind(docs, "Deployment")[SIP]
    names = [item["name"] for item in container(gateway)["env"]]
    assert len(names) == len(set(names))  # a plain value cannot hide behind a secret one
    variables = env(gateway)
    (config_map,) = [doc for doc in docs if doc["kind"] == "ConfigMap"]
    trunks = config_map["data"]["trunks.toml"]
    assert not re.search(r"(?m)^\s*password\s*=", trunks)
    for name in re.findall(r'password_env\s*=\s*"([A-Za-z_][A-Za-z0-9_]*)"', trunks):
        assert "value" not in variables[name]
        ref = variables[name]["valueFrom"]["secretKeyRef"]
        assert {"name": name, "secret": ref["name"], "key": ref["key"]} in values["secretEnv"]


def test_the_gateway_probes_its_metrics_port(
        with_sip: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    docs, _ = with_sip
    gateway = by_kind(docs, "Deployment")[SIP]
    box = container(gateway)
    chart = yaml.safe_load((CHART / "values.yaml").read_text())
    port = chart["sip"]["metricsPort"]
    assert port != chart["metrics"]["port"]  # 9100 is node-exporter's on a node's network
    ports = {(p["name"], p["protocol"]): p["containerPort"] for p in box["ports"]}
    assert ports[("metrics", "TCP")] == port
    assert (ports[("sip-udp", "UDP")], ports[("sip-tcp", "TCP")]) == (5060, 5060)
    assert env(gateway)["VOICEBUS_METRICS_PORT"]["value"] == str(port)
    # Ready while SIP listens and the bus is connected; alive while the process serves.
    assert box["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert box["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    annotations = gateway["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    # A call cannot move between pods, and on the node's network the ports are the old pod's.
    strategy = gateway["spec"]["strategy"]["rollingUpdate"]
    assert (strategy["maxSurge"], strategy["maxUnavailable"]) == (0, 1)


def test_the_gateway_on_its_nodes_network(cluster: list[dict[str, Any]]) -> None:
    gateway = by_kind(cluster, "Deployment")[SIP]
    pod = gateway["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"  # the NATS Service still resolves
    assert pod["nodeSelector"] == {"voicebus.example.com/sip": "true"}
    assert gateway["spec"]["replicas"] == 2
    # Each port is the node's: the scheduler puts one gateway on a node.
    for port in container(gateway)["ports"]:
        assert port["hostPort"] == port["containerPort"], port
    variables = env(gateway)
    # Callers get the node's address; /metrics is served on the node's cluster address only,
    # not on every address of the node.
    assert variables["VOICEBUS_SIP_EXTERNAL_HOST"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "status.hostIP"}}
    assert variables["VOICEBUS_METRICS_ADDR"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "status.podIP"}}
    assert variables["VOICEBUS_GREETING"]["value"] == "Hello, how can I help?"
    assert SIP not in by_kind(cluster, "Service")


def test_the_gateway_behind_a_service(sip_service: list[dict[str, Any]]) -> None:
    values = sip_values(SIP_SERVICE_VALUES)
    gateway = by_kind(sip_service, "Deployment")[SIP]
    pod = gateway["spec"]["template"]["spec"]
    assert "hostNetwork" not in pod and gateway["spec"]["replicas"] == 1
    variables = env(gateway)
    assert variables["VOICEBUS_SIP_EXTERNAL_HOST"]["value"] == values["externalHost"]
    assert variables["VOICEBUS_METRICS_ADDR"]["value"] == "0.0.0.0"
    service = by_kind(sip_service, "Service")[SIP]["spec"]
    assert service["type"] == "LoadBalancer"
    assert service["externalTrafficPolicy"] == "Local"  # the allow lists see the caller
    assert service["loadBalancerSourceRanges"] == values["service"]["loadBalancerSourceRanges"]
    assert service["selector"].items() <= gateway["spec"]["template"]["metadata"]["labels"].items()
    first, last = map(int, values["rtpPorts"].split("-"))
    wanted = {(5060, "UDP"), (5060, "TCP")} | {(p, "UDP") for p in range(first, last + 1)}
    assert {(p["port"], p["protocol"]) for p in service["ports"]} == wanted
    for port in service["ports"]:  # the same number everywhere: the gateway writes it in SDP
        assert port["targetPort"] == port["port"], port
    assert variables["VOICEBUS_SIP_RTP_PORTS"]["value"] == values["rtpPorts"]


def test_a_node_port_service_keeps_every_number(helm: Path) -> None:
    docs = render(helm, "-f", SIP_SERVICE_VALUES, "--set", "sip.service.type=NodePort",
                  "--set", "sip.port=30060", "--set", "sip.rtpPorts=30100-30103")
    service = by_kind(docs, "Service")[SIP]["spec"]
    assert "loadBalancerSourceRanges" not in service
    assert sorted((p["nodePort"], p["port"]) for p in service["ports"]) == [
        (30060, 30060), (30060, 30060), *((n, n) for n in range(30100, 30104))]
    assert env(by_kind(docs, "Deployment")[SIP])["VOICEBUS_SIP_LISTEN"]["value"] == "0.0.0.0:30060"


def test_the_example_trunks_file_goes_in_as_it_is(helm: Path) -> None:
    """deploy/sip/trunks.example.toml, comments and all, passes the chart's password check (its
    passwords are password_env) and reaches the gateway unchanged."""
    example = ROOT / "deploy" / "sip" / "trunks.example.toml"
    names = re.findall(r'(?m)^[^#\n]*password_env\s*=\s*"(\w+)"', example.read_text())
    assert names  # the example shows how
    secret_env = [{"name": name, "secret": "voicebus-sip-trunks", "key": name.lower()}
                  for name in names]
    docs = render(helm, "--set", "sip.enabled=true", "--set-file", f"sip.config={example}",
                  "--set-json", f"sip.secretEnv={json.dumps(secret_env)}")
    (config_map,) = [doc for doc in docs if doc["kind"] == "ConfigMap"]
    assert config_map["data"]["trunks.toml"] == example.read_text().strip() + "\n"
    variables = env(by_kind(docs, "Deployment")[SIP])
    for name in names:
        assert variables[name]["valueFrom"]["secretKeyRef"]["name"] == "voicebus-sip-trunks"


SIP_REFUSALS = {
    "no trunks file": (["--set", "sip.enabled=true"], "sip.config: the trunks file"),
    "a password in the trunks file": (
        ["--set", "sip.enabled=true", "--set-string",
         # helm's --set takes "\," for a comma inside a value
         'sip.config=[[trunks]]\nname = "o"\nusers = [{username = "a"\\, password = "x"}]'],
        "sip.config: a password is written in the trunks file"),
    "a password_env that no Secret fills": (
        ["-f", CLUSTER_VALUES, "--set-json", "sip.secretEnv=[]"],
        "sip.config: password_env EXOTEL_SIP_PASSWORD is not in sip.secretEnv"),
    "two replicas behind a Service": (
        ["-f", SIP_SERVICE_VALUES, "--set", "sip.replicas=2"], "sip.replicas: one in service mode"),
    "a Service without the address": (
        ["-f", SIP_SERVICE_VALUES, "--set", "sip.externalHost="], "sip.externalHost: in service"),
    "a grace period shorter than the hang-up": (
        ["-f", CLUSTER_VALUES, "--set", "sip.terminationGracePeriodSeconds=9"],
        "sip: terminationGracePeriodSeconds 9 is too short"),
    "an unknown setting": (["--set", "sip.hostNetwork=true"], "hostNetwork"),
    "an unknown network": (["--set", "sip.network=host"], "value must be one of"),
}


@pytest.mark.parametrize("case", sorted(SIP_REFUSALS))
def test_the_chart_refuses_a_gateway_that_cannot_work(helm: Path, case: str) -> None:
    args, message = SIP_REFUSALS[case]
    done = run(helm, "template", "voicebus", CHART, "--kube-version", KUBERNETES, *args)
    assert done.returncode != 0, done.stdout
    assert message in done.stderr


def _stt(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return copy.deepcopy(by_kind(docs, "Deployment")["stt"])


def _misspelt_probe(doc: dict[str, Any]) -> None:
    box = container(doc)
    box["readinesProbe"] = box.pop("readinessProbe")


def _replicas_as_words(doc: dict[str, Any]) -> None:
    doc["spec"]["replicas"] = "two"


def _probe_without_port(doc: dict[str, Any]) -> None:
    del container(doc)["readinessProbe"]["httpGet"]["port"]


def _no_selector(doc: dict[str, Any]) -> None:
    del doc["spec"]["selector"]


BROKEN_MANIFESTS = {
    "misspelt field": (_misspelt_probe, "'readinesProbe' was unexpected"),
    "wrong type": (_replicas_as_words, "'two' is not of type 'integer'"),
    "missing probe port": (_probe_without_port, "'port' is a required property"),
    "missing selector": (_no_selector, "'selector' is a required property"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_MANIFESTS))
def test_kubernetes_validate_rejects_a_broken_manifest(defaults: list[dict[str, Any]],
                                                       case: str) -> None:
    mutate, message = BROKEN_MANIFESTS[case]
    kubernetes_validate.validate(_stt(defaults), KUBERNETES, strict=True)  # sound before
    broken = _stt(defaults)
    mutate(broken)
    with pytest.raises(kubernetes_validate.ValidationError, match=re.escape(message)):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_a_bad_value_that_helm_renders_is_caught(helm: Path) -> None:
    """--set makes 5 a number; an annotation must be a string. helm renders it anyway."""
    docs = render(helm, "--set", r"stages.stt.podAnnotations.example\.com/weight=5")
    with pytest.raises(kubernetes_validate.ValidationError, match="is not of type 'string'"):
        kubernetes_validate.validate(by_kind(docs, "Deployment")["stt"], KUBERNETES, strict=True)


# ---- the compose file ----------------------------------------------------------------------

def check_compose(composecheck: Path, path: Path, *env: str) -> subprocess.CompletedProcess[str]:
    return run(composecheck, *[arg for name in env for arg in ("-e", name)], path)


def test_livekit_sip_runs_beside_the_stack_with_a_shared_redis(composecheck: Path) -> None:
    """deploy/compose.livekit-sip.yaml over the main file: valid as compose merges them,
    livekit-server and LiveKit SIP share a password-protected Redis, LiveKit SIP gets no
    bus identity and its secrets only from the environment."""
    done = run(composecheck, "-e", "LIVEKIT_API_SECRET=not-a-secret", "-e", "REDIS_PASSWORD=pw",
               COMPOSE, LIVEKIT_SIP)
    assert done.returncode == 0, done.stderr
    refused = run(composecheck, "-e", "LIVEKIT_API_SECRET=not-a-secret", COMPOSE, LIVEKIT_SIP)
    assert refused.returncode != 0 and "REDIS_PASSWORD" in refused.stderr
    services = yaml.safe_load(LIVEKIT_SIP.read_text())["services"]
    sip = services["livekit-sip"]
    assert "secrets" not in sip and sip["network_mode"] == "host"
    body = sip["environment"]["SIP_CONFIG_BODY"]
    assert "${LIVEKIT_API_SECRET:?" in body and "${REDIS_PASSWORD:?" in body
    assert re.search(r"(?m)^\s*password:\s*\$\{REDIS_PASSWORD", body)
    command = services["livekit"]["command"]
    assert command[command.index("--redis-host") + 1] == "redis:6379"
    assert services["redis"]["ports"] == ["127.0.0.1:6379:6379"]  # loopback only


def test_the_compose_file_is_valid(composecheck: Path) -> None:
    done = check_compose(composecheck, COMPOSE, "LIVEKIT_API_SECRET=not-a-secret")
    assert done.returncode == 0, done.stderr
    assert "valid (project voicebus," in done.stdout


def test_the_compose_file_needs_no_credentials_to_be_checked(composecheck: Path,
                                                             tmp_path: Path) -> None:
    """The secrets' files (deploy/bus, made by `voicebus credentials`) are not committed; the
    loader does not open them, so a copy in a folder without them checks the same."""
    copied = tmp_path / "compose.yaml"
    shutil.copy(COMPOSE, copied)
    assert not (tmp_path / "bus").exists()
    done = check_compose(composecheck, copied, "LIVEKIT_API_SECRET=not-a-secret")
    assert done.returncode == 0, done.stderr


def test_the_compose_file_demands_the_livekit_secret(composecheck: Path) -> None:
    done = check_compose(composecheck, COMPOSE)
    assert done.returncode == 1
    assert "required variable LIVEKIT_API_SECRET is missing a value" in done.stderr


def test_the_phone_gateway_is_behind_its_profile_with_its_own_seed() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    sip = services["sip"]
    # A plain `up` starts no gateway, so it needs no trunks file.
    assert sip["profiles"] == ["phone"]
    # Its own seed and no other's; nobody else holds it; no LiveKit secret.
    assert sip["secrets"] == ["sip_nkey"]
    assert compose["secrets"]["sip_nkey"] == {"file": "./bus/sip.nk"}
    assert [name for name, s in services.items() if "sip_nkey" in s.get("secrets", [])] == ["sip"]
    variables = sip["environment"]
    assert variables["VOICEBUS_NATS_NKEY_FILE"] == "/run/secrets/sip_nkey"
    assert not [name for name in variables if name.startswith("LIVEKIT_")]
    # The trunks file, read-only, from deploy/sip/trunks.toml (a copy of the example).
    (trunks,) = [v for v in sip["volumes"] if v["target"] == variables["VOICEBUS_SIP_CONFIG"]]
    assert (trunks["type"], trunks["source"], trunks["read_only"]) == (
        "bind", "./sip/trunks.toml", True)
    assert trunks["bind"]["create_host_path"] is False
    assert (COMPOSE.parent / "sip" / "trunks.example.toml").is_file()
    # SIP on UDP and TCP, and the RTP range the gateway uses, published as is.
    rtp = variables["VOICEBUS_SIP_RTP_PORTS"]
    assert sip["ports"] == ["5060:5060/udp", "5060:5060/tcp", f"{rtp}:{rtp}/udp"]
    assert variables["VOICEBUS_SIP_EXTERNAL_HOST"].startswith("${VOICEBUS_SIP_EXTERNAL_HOST:-")
    # Prometheus scrapes it (a job of its own: the name resolves only with the profile on).
    scrape = yaml.safe_load((COMPOSE.parent / "prometheus.yml").read_text())
    (job,) = [job for job in scrape["scrape_configs"] if job["job_name"] == "voicebus-sip"]
    assert job["dns_sd_configs"] == [{"names": ["sip"], "type": "A", "port": 9100}]
    assert "Dockerfile.sip" in sip["build"]["dockerfile"]
    assert "EXPOSE 5060/udp 5060/tcp 9100" in (COMPOSE.parent / "Dockerfile.sip").read_text()


def test_the_compose_file_takes_another_rtp_range(composecheck: Path) -> None:
    done = check_compose(composecheck, COMPOSE, "LIVEKIT_API_SECRET=not-a-secret",
                         "VOICEBUS_SIP_RTP_PORTS=20000-20009",
                         "VOICEBUS_SIP_EXTERNAL_HOST=203.0.113.7")
    assert done.returncode == 0, done.stderr


BROKEN_COMPOSE = {
    "unknown top-level key": (lambda text: text + "\nservice:\n  oops: {}\n",
                              "additional properties 'service' not allowed"),
    "wrong type": (lambda text: text.replace("stop_grace_period: 20s", "stop_grace_period: [20]"),
                   "stop_grace_period must be a string"),
    "undefined secret": (lambda text: text.replace("secrets: [stt_nkey]", "secrets: [stt_key]"),
                         'refers to undefined secret stt_key'),
}


@pytest.mark.parametrize("case", sorted(BROKEN_COMPOSE))
def test_composecheck_rejects_a_broken_compose_file(composecheck: Path, tmp_path: Path,
                                                    case: str) -> None:
    mutate, message = BROKEN_COMPOSE[case]
    text = COMPOSE.read_text()
    broken = mutate(text)
    assert broken != text
    path = tmp_path / "compose.yaml"
    path.write_text(broken)
    done = check_compose(composecheck, path, "LIVEKIT_API_SECRET=not-a-secret")
    assert done.returncode == 1, done.stdout
    assert message in done.stderr
