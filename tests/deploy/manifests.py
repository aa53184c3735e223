"""Render the Helm chart and check what it renders, in three layers, each of which can fail alone:

1. render: `helm lint --strict` and `helm template` (the chart's values.schema.json and its own
   `fail` rules reject bad values here);
2. schema: every manifest against the Kubernetes JSON schema of the oldest and the newest supported
   Kubernetes release, strict (unknown fields are errors); CRDs against schemas in ./schemas;
3. contract: what FlashPortrait needs of the rendered objects (docker/README.md explains each rule):
   GPUs, an in-memory /dev/shm big enough for the Python backend, weights read-only from a claim,
   Triton's health endpoints, a startup allowance for a 14B model, a grace period that covers the
   server's drain, non-root, metrics scraping, gRPC services, an HPA that owns the replica count.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.tools import REPO, Tools, run

CHART = REPO / "docker/helm/flashportrait"
EXAMPLES = REPO / "docker/helm/examples"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
RELEASE = "fp"
NAMESPACE = "flashportrait"
# Chart.yaml's kubeVersion floor, and the newest release kubernetes-validate ships schemas for.
OLDEST_KUBERNETES = "1.25.0"
# Loading the 14B DiT, umT5-XXL and the VAEs takes minutes; the probe must allow a quarter hour.
MIN_STARTUP_SECONDS = 900
# A generation takes minutes: a drain shorter than this cuts streams.
MIN_EXIT_TIMEOUT_SECONDS = 300
# face_align, text_encoder and feature_extractor's Python variant, plus one sampler per GPU, each map
# one shared-memory region of shm-default-byte-size at start.
PYTHON_INSTANCES_BESIDES_SAMPLERS = 3

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Problem:
    stage: str  # "render", "schema" or "contract"
    message: str

    def __str__(self) -> str:
        return f"[{self.stage}] {self.message}"


def newest_kubernetes() -> str:
    from kubernetes_validate.utils import latest_version

    return latest_version()


def render(
    tools: Tools,
    values: Path | None = None,
    *,
    kube_version: str = OLDEST_KUBERNETES,
    set_values: dict[str, str] | None = None,
) -> tuple[list[Manifest], list[Problem]]:
    """`helm template` with one values file (None: the chart's defaults) -> (manifests, problems)."""
    command: list[str | Path] = [tools.helm, "template", RELEASE, CHART, "--namespace", NAMESPACE]
    command += ["--kube-version", kube_version]
    if values is not None:
        command += ["--values", values]
    for key, value in (set_values or {}).items():
        command += ["--set", f"{key}={value}"]
    done = run(command)
    if done.returncode != 0:
        return [], [Problem("render", done.stderr.strip() or done.stdout.strip())]
    docs = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    return docs, []


def lint(tools: Tools, values: Path | None = None) -> list[Problem]:
    command: list[str | Path] = [tools.helm, "lint", "--strict", CHART]
    if values is not None:
        command += ["--values", values]
    done = run(command)
    if done.returncode != 0:
        return [Problem("render", f"helm lint: {done.stdout.strip()} {done.stderr.strip()}")]
    return []


def _crd_schema(doc: Manifest) -> dict[str, Any] | None:
    group_version = doc.get("apiVersion", "").replace("/", "-")
    path = SCHEMAS / f"{doc.get('kind', '').lower()}-{group_version}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def schema_problems(docs: list[Manifest], kube_version: str) -> list[Problem]:
    import jsonschema
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    problems = []
    for doc in docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')} (Kubernetes {kube_version})"
        crd = _crd_schema(doc)
        try:
            if crd is not None:
                jsonschema.Draft7Validator(crd).validate(doc)
            else:
                kubernetes_validate.validate(doc, kube_version, strict=True)
        except jsonschema.ValidationError as error:
            where = ".".join(str(part) for part in error.absolute_path)
            problems.append(Problem("schema", f"{name}: {where}: {error.message}"))
        except SchemaNotFoundError as error:
            problems.append(Problem("schema", f"{name}: {error.message}"))
    return problems


_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity_bytes(quantity: str | int) -> float:
    """A Kubernetes memory quantity ("16Gi", "500M", 1024) in bytes."""
    match = _QUANTITY.match(str(quantity))
    if match is None or match.group(2) not in _UNITS:
        raise ValueError(f"not a memory quantity: {quantity!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _flags(args: list[str]) -> dict[str, list[str]]:
    """`--name=value` arguments -> {name: [values]} (flags may repeat, like --backend-config)."""
    out: dict[str, list[str]] = {}
    for arg in args:
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def _selects(selector: dict[str, str] | None, labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def _probe_problems(container: Manifest, ports: dict[str, int], http_port: int) -> list[str]:
    out = []
    expected = {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready"}
    expected["livenessProbe"] = "/v2/health/live"
    for probe_name, path in expected.items():
        get = container.get(probe_name, {}).get("httpGet")
        if get is None:
            out.append(f"{probe_name} must be an httpGet of Triton's {path}")
            continue
        port = ports.get(get.get("port"), get.get("port"))
        if get.get("path") != path or port != http_port:
            out.append(f"{probe_name} checks {get.get('path')} on port {port}, not {path} on {http_port}")
    startup = container.get("startupProbe", {})
    allowance = startup.get("initialDelaySeconds", 0) + startup.get("periodSeconds", 10) * startup.get(
        "failureThreshold", 3
    )
    if allowance < MIN_STARTUP_SECONDS:
        out.append(
            f"the startup probe allows {allowance} s, less than the {MIN_STARTUP_SECONDS} s a load takes"
        )
    return out


def _shutdown_problems(pod: Manifest, container: Manifest, flags: dict[str, list[str]]) -> list[str]:
    out = []
    if "exit-timeout-secs" not in flags:
        return ["tritonserver has no --exit-timeout-secs: it would drop running generations on SIGTERM"]
    exit_timeout = int(flags["exit-timeout-secs"][-1])
    if exit_timeout < MIN_EXIT_TIMEOUT_SECONDS:
        out.append(f"--exit-timeout-secs={exit_timeout} is shorter than one generation")
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if len(command) != 2 or command[0] != "sleep":
        return [*out, "the preStop hook must be `sleep N` so endpoint removal propagates before SIGTERM"]
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace < int(command[1]) + exit_timeout:
        out.append(
            f"terminationGracePeriodSeconds={grace} < preStop {command[1]} s + exit timeout {exit_timeout} s"
        )
    return out


def _shm_problems(pod: Manifest, container: Manifest, flags: dict[str, list[str]], gpus: int) -> list[str]:
    python = dict(
        value.split(",", 1)[1].split("=", 1)
        for value in flags.get("backend-config", [])
        if value.startswith("python,")
    )
    if "shm-default-byte-size" not in python or "shm-growth-byte-size" not in python:
        return ["the python backend's shm-default-byte-size and shm-growth-byte-size are not set"]
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    empty_dir = volumes.get(mounts.get("/dev/shm", ""), {}).get("emptyDir")
    if empty_dir is None or empty_dir.get("medium") != "Memory" or "sizeLimit" not in empty_dir:
        return ["/dev/shm must be an emptyDir with medium Memory and a sizeLimit"]
    needed = (PYTHON_INSTANCES_BESIDES_SAMPLERS + gpus) * int(python["shm-default-byte-size"])
    if quantity_bytes(empty_dir["sizeLimit"]) < needed:
        return [
            f"/dev/shm sizeLimit {empty_dir['sizeLimit']} is below {needed} bytes, "
            "the Python model instances' regions at their start size"
        ]
    return []


def _weights_problems(pod: Manifest, container: Manifest) -> list[str]:
    claims = {
        v["name"]: v["persistentVolumeClaim"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v
    }
    mounts = [m for m in container.get("volumeMounts", []) if m["name"] in claims]
    if len(mounts) != 1:
        return ["the weights must come from exactly one PersistentVolumeClaim mount"]
    (mount,) = mounts
    out = []
    if not (mount.get("readOnly") and claims[mount["name"]].get("readOnly")):
        out.append("the weights claim must be mounted read-only (volume and mount)")
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    if env.get("FLASHPORTRAIT_WEIGHTS") != mount["mountPath"]:
        out.append(
            f"FLASHPORTRAIT_WEIGHTS={env.get('FLASHPORTRAIT_WEIGHTS')} is not the mount {mount['mountPath']}"
        )
    return out


def _security_problems(pod: Manifest, container: Manifest) -> list[str]:
    merged = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    out = []
    if merged.get("runAsNonRoot") is not True or merged.get("runAsUser", 0) == 0:
        out.append("the server must run as a non-root uid (runAsNonRoot: true, runAsUser != 0)")
    if merged.get("allowPrivilegeEscalation") is not False:
        out.append("allowPrivilegeEscalation must be false")
    return out


def _service_problems(docs: list[Manifest], labels: dict[str, str], grpc_port: int) -> list[str]:
    out = []
    services = [d for d in docs if d["kind"] == "Service"]
    grpc_ports = [
        (service, port)
        for service in services
        for port in service["spec"].get("ports", [])
        if port.get("targetPort") in ("grpc", grpc_port)
    ]
    if not grpc_ports:
        out.append("no Service exposes the gRPC port")
    for service, port in grpc_ports:
        if not port.get("appProtocol"):
            out.append(
                f"Service {service['metadata']['name']}: the gRPC port needs an appProtocol for L7 balancing"
            )
    for service in services:
        if not _selects(service["spec"].get("selector"), labels):
            out.append(f"Service {service['metadata']['name']} does not select the server pods")
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        if not _selects(pdb["spec"]["selector"].get("matchLabels"), labels):
            out.append(f"PodDisruptionBudget {pdb['metadata']['name']} does not select the server pods")
    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        selected = [
            s
            for s in services
            if _selects(monitor["spec"]["selector"].get("matchLabels"), s["metadata"]["labels"])
        ]
        names = {p.get("name") for s in selected for p in s["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            if endpoint.get("port") not in names:
                out.append(
                    f"ServiceMonitor scrapes port {endpoint.get('port')!r}, which no selected Service has"
                )
            if _seconds(endpoint.get("scrapeTimeout", "10s")) > _seconds(endpoint.get("interval", "30s")):
                out.append("ServiceMonitor scrapeTimeout is longer than its interval")
    return out


def _seconds(duration: str) -> float:
    match = re.match(r"^(\d+)(ms|s|m|h)$", duration)
    if match is None:
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    return int(match.group(1)) * {"ms": 1e-3, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def _autoscaling_problems(docs: list[Manifest], deployment: Manifest) -> list[str]:
    out = []
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        if (target["kind"], target["name"]) != ("Deployment", deployment["metadata"]["name"]):
            out.append(f"HPA {hpa['metadata']['name']} targets {target['kind']}/{target['name']}")
        if "replicas" in deployment["spec"]:
            out.append(
                "the Deployment sets replicas although an HPA scales it (every upgrade would reset it)"
            )
        if {m["type"] for m in hpa["spec"]["metrics"]} - {"Pods", "External"}:
            out.append("the HPA must scale on queued requests (a Pods or External metric)")
    return out


def contract_problems(docs: list[Manifest]) -> list[Problem]:
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    if len(deployments) != 1:
        return [Problem("contract", f"expected one Deployment, found {len(deployments)}")]
    (deployment,) = deployments
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    servers = [c for c in pod["containers"] if c["name"] == "tritonserver"]
    if len(servers) != 1:
        return [Problem("contract", "the pod needs one container named tritonserver")]
    (container,) = servers
    flags = _flags(container.get("args", []))
    http_port, grpc_port, metrics_port = (
        int(flags.get(f"{name}-port", [default])[-1])
        for name, default in (("http", 8000), ("grpc", 8001), ("metrics", 8002))
    )
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    messages = []
    if ports != {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}:
        messages.append(
            f"container ports {ports} do not match tritonserver's {http_port}/{grpc_port}/{metrics_port}"
        )
    gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)
    if int(gpus) < 1 or container["resources"].get("requests", {}).get("nvidia.com/gpu", gpus) != gpus:
        messages.append(f"nvidia.com/gpu limit {gpus} must be >= 1 and equal to the request")
    messages += _probe_problems(container, ports, http_port)
    messages += _shutdown_problems(pod, container, flags)
    messages += _shm_problems(pod, container, flags, int(gpus))
    messages += _weights_problems(pod, container)
    messages += _security_problems(pod, container)
    scraped = annotations.get("prometheus.io/scrape") == "true" and annotations.get(
        "prometheus.io/port"
    ) == str(metrics_port)
    if not scraped and not any(d["kind"] == "ServiceMonitor" for d in docs):
        messages.append(
            "metrics are not scraped: no prometheus.io annotations for the metrics port, no ServiceMonitor"
        )
    startup = container.get("startupProbe", {})
    if deployment["spec"].get("progressDeadlineSeconds", 600) < startup.get(
        "periodSeconds", 10
    ) * startup.get("failureThreshold", 3):
        messages.append(
            "progressDeadlineSeconds is shorter than the startup allowance: rollouts would be reported stuck"
        )
    messages += _service_problems(docs, labels, grpc_port)
    messages += _autoscaling_problems(docs, deployment)
    return [Problem("contract", message) for message in messages]


def check_values(tools: Tools, values: Path | None) -> list[Problem]:
    """Every problem of one values file; stops after the first layer that fails."""
    problems = lint(tools, values)
    rendered = {}
    for version in (OLDEST_KUBERNETES, newest_kubernetes()):
        docs, render_problems = render(tools, values, kube_version=version)
        problems += render_problems
        rendered[version] = docs
    if problems:
        return problems
    for version, docs in rendered.items():
        problems += schema_problems(docs, version)
    if problems:
        return problems
    return contract_problems(rendered[OLDEST_KUBERNETES])
