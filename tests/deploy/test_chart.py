"""The Helm chart renders valid Kubernetes objects that keep FlashPortrait's serving contract, with its
defaults and every values example, and rejects broken values at the layer that should catch them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tests.deploy.manifests import Manifest, check_values, contract_problems, render
from tests.deploy.tools import Tools
from tests.deploy.validate import example_values

BROKEN = Path(__file__).resolve().parent / "broken"


def _one(docs: list[Manifest], kind: str) -> Manifest:
    (doc,) = (d for d in docs if d["kind"] == kind)
    return doc


def _server(docs: list[Manifest]) -> Manifest:
    return _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def _rendered(tools: Tools, values: Path | None = None, **set_values: str) -> list[Manifest]:
    docs, problems = render(tools, values, set_values=set_values)
    assert problems == []
    return docs


@pytest.mark.parametrize("values", [None, *example_values()], ids=lambda v: v.stem if v else "defaults")
def test_values_render_and_validate(deploy_tools: Tools, values: Path | None) -> None:
    assert [str(p) for p in check_values(deploy_tools, values)] == []


def test_examples_cover_the_deployment_shapes() -> None:
    assert {"single-gpu", "multi-gpu", "fp8-low-memory"} <= {p.stem for p in example_values()}


def test_examples_render_what_they_promise(deploy_tools: Tools) -> None:
    examples = {p.stem: _rendered(deploy_tools, p) for p in example_values()}

    multi = examples["multi-gpu"]
    resources = _server(multi)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 4
    pod = _one(multi, "Deployment")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"] == {
        "medium": "Memory",
        "sizeLimit": "64Gi",
    }
    assert "--exit-timeout-secs=2400" in _server(multi)["args"]
    assert pod["terminationGracePeriodSeconds"] == 15 + 2400 + 30

    fp8 = _server(examples["fp8-low-memory"])
    assert {"name": "FLASHPORTRAIT_PRECISION", "value": "fp8"} in fp8["env"]
    weights = next(m for m in fp8["volumeMounts"] if m["name"] == "weights")
    assert weights == {"name": "weights", "mountPath": "/weights", "subPath": "fp8", "readOnly": True}
    assert fp8["startupProbe"]["failureThreshold"] * fp8["startupProbe"]["periodSeconds"] == 1500

    external = examples["external-metric"]
    (metric,) = _one(external, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["selector"] == {"matchLabels": {"model": "sampler"}}
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "500m"}
    (service,) = (d for d in external if d["kind"] == "Service")
    assert "clusterIP" not in service["spec"]
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc["appProtocol"] == "kubernetes.io/h2c"

    single = examples["single-gpu"]
    assert _one(single, "ServiceMonitor")["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert "replicas" not in _one(single, "Deployment")["spec"]


def test_defaults_serve_grpc_on_a_headless_service_too(deploy_tools: Tools) -> None:
    services = {d["metadata"]["name"]: d["spec"] for d in _rendered(deploy_tools) if d["kind"] == "Service"}
    assert services["fp-flashportrait-grpc"]["clusterIP"] == "None"
    assert [p["port"] for p in services["fp-flashportrait-grpc"]["ports"]] == [8001]
    assert "clusterIP" not in services["fp-flashportrait"]
    assert {p["name"]: p["port"] for p in services["fp-flashportrait"]["ports"]} == {
        "http": 8000,
        "grpc": 8001,
        "metrics": 8002,
    }


def test_grace_period_follows_the_drain(deploy_tools: Tools) -> None:
    docs = _rendered(
        deploy_tools, **{"server.exitTimeoutSeconds": "3600", "lifecycle.preStopSleepSeconds": "20"}
    )
    assert "--exit-timeout-secs=3600" in _server(docs)["args"]
    assert _server(docs)["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "20"]
    assert _one(docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 3650
    explicit = _rendered(deploy_tools, terminationGracePeriodSeconds="4000")
    assert _one(explicit, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 4000


def test_startup_threshold_rounds_the_allowance_up(deploy_tools: Tools) -> None:
    docs = _rendered(deploy_tools, **{"probes.startup.maxStartupSeconds": "1001"})
    startup = _server(docs)["startupProbe"]
    assert (startup["periodSeconds"], startup["failureThreshold"]) == (10, 101)
    assert _one(docs, "Deployment")["spec"]["progressDeadlineSeconds"] == 1010 + 600


def _expectation(path: Path) -> tuple[str, str]:
    header = next(line for line in path.read_text().splitlines() if line.startswith("# expect:"))
    stage, _, needle = header.removeprefix("# expect:").strip().partition(": ")
    return stage, needle


@pytest.mark.parametrize("path", sorted(BROKEN.glob("*.yaml")), ids=lambda p: p.stem)
def test_broken_values_are_rejected_at_the_right_layer(deploy_tools: Tools, path: Path) -> None:
    stage, needle = _expectation(path)
    problems = check_values(deploy_tools, path)
    assert problems, f"{path.name} was accepted"
    assert {p.stage for p in problems} == {stage}, [str(p) for p in problems]
    assert any(needle in p.message for p in problems), [str(p) for p in problems]


def test_contract_catches_hand_edited_manifests(deploy_tools: Tools) -> None:
    docs = _rendered(deploy_tools)
    assert contract_problems(docs) == []

    def broken(edit) -> list[str]:
        edited = copy.deepcopy(docs)
        edit(_one(edited, "Deployment")["spec"]["template"]["spec"])
        return [p.message for p in contract_problems(edited)]

    def no_shm(pod: Manifest) -> None:
        pod["volumes"] = [v for v in pod["volumes"] if v["name"] != "dshm"]

    def root(pod: Manifest) -> None:
        pod["securityContext"]["runAsUser"] = 0

    def writable_weights(pod: Manifest) -> None:
        next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "weights")["readOnly"] = False

    def liveness_on_ready(pod: Manifest) -> None:
        pod["containers"][0]["livenessProbe"]["httpGet"]["path"] = "/v2/health/ready"

    def no_gpu(pod: Manifest) -> None:
        for kind in ("limits", "requests"):
            del pod["containers"][0]["resources"][kind]["nvidia.com/gpu"]

    assert broken(no_shm) == ["/dev/shm must be an emptyDir with medium Memory and a sizeLimit"]
    assert broken(root) == ["the server must run as a non-root uid (runAsNonRoot: true, runAsUser != 0)"]
    assert broken(writable_weights) == ["the weights claim must be mounted read-only (volume and mount)"]
    assert broken(liveness_on_ready) == [
        "livenessProbe checks /v2/health/ready on port 8000, not /v2/health/live on 8000"
    ]
    assert broken(no_gpu)[0] == "nvidia.com/gpu limit 0 must be >= 1 and equal to the request"
