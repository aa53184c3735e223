"""Lint docker/Dockerfile with hadolint, then check what the serving image must be.

The contract (docker/README.md): the final stage is NGC's tritonserver image at an exact release tag
and FlashAttention is compiled in an earlier stage; the server runs as a non-root user with a
health check and `tritonserver` as its entrypoint; the default flags drain running generations and
size the Python backend's shared memory like the Helm chart's defaults do; no weights are copied in.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.deploy.manifests import CHART, Problem
from tests.deploy.tools import REPO, Tools, run

DOCKERFILE = REPO / "docker/Dockerfile"
HADOLINT_CONFIG = REPO / "docker/.hadolint.yaml"
TRITON_BASE = re.compile(r"^nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3(@sha256:[0-9a-f]{64})?$")
WEIGHT_FILES = re.compile(r"\.(safetensors|pt|pth|bin|ckpt|onnx|plan|engine)$|(^|/)(weights|artifacts)(/|$)")


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    arguments: str


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and blank lines dropped."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        continued = stripped.endswith("\\")
        pending.append(stripped[:-1].strip() if continued else stripped)
        if not continued:
            keyword, _, arguments = " ".join(pending).partition(" ")
            out.append(Instruction(start, keyword.upper(), arguments.strip()))
            pending = []
    return out


def _exec_form(arguments: str) -> list[str]:
    """JSON array form of CMD/ENTRYPOINT/HEALTHCHECK CMD; shell form split on spaces."""
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments.split()
    return [str(part) for part in parsed] if isinstance(parsed, list) else arguments.split()


def _stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    stages: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def contract_problems(text: str, chart_values: dict | None = None) -> list[Problem]:
    """What the image must be; `chart_values` (values.yaml) adds the cross-checks with the chart."""
    stages = _stages(parse(text))
    messages = []
    if len(stages) < 2:
        messages.append("FlashAttention must be built in a separate builder stage (one FROM found)")
    for stage in stages:
        image = stage[0].arguments.split()[0]
        if image.startswith("$") or ":" not in image.split("/")[-1] or image.endswith(":latest"):
            messages.append(f"line {stage[0].line}: base image {image!r} is not pinned to an exact tag")
    final = stages[-1] if stages else []
    if final and not TRITON_BASE.match(final[0].arguments.split()[0]):
        messages.append(
            f"the final stage must be nvcr.io/nvidia/tritonserver:<YY.MM>-py3, not {final[0].arguments}"
        )
    by_keyword: dict[str, list[Instruction]] = {}
    for instruction in final:
        by_keyword.setdefault(instruction.keyword, []).append(instruction)
    users = by_keyword.get("USER", [])
    user = users[-1].arguments.split(":")[0] if users else "root"
    if user in ("root", "0"):
        messages.append("the final stage must switch to a non-root USER")
    healthchecks = by_keyword.get("HEALTHCHECK", [])
    if not healthchecks or "/v2/health/" not in healthchecks[-1].arguments:
        messages.append("the image needs a HEALTHCHECK on Triton's /v2/health endpoint")
    entrypoint = _exec_form(by_keyword["ENTRYPOINT"][-1].arguments) if "ENTRYPOINT" in by_keyword else []
    if not any(part.endswith("tritonserver") for part in entrypoint):
        messages.append(f"the entrypoint must run tritonserver, not {entrypoint}")
    cmd = _exec_form(by_keyword["CMD"][-1].arguments) if "CMD" in by_keyword else []
    flags = dict(
        arg[2:].split("=", 1) for arg in cmd if arg.startswith("--") and "=" in arg and "backend" not in arg
    )
    backend = dict(
        arg.split(",", 1)[1].split("=", 1) for arg in cmd if arg.startswith("--backend-config=python,")
    )
    for needed in ("model-repository", "exit-timeout-secs"):
        if needed not in flags:
            messages.append(f"the default flags lack --{needed}")
    if not {"shm-default-byte-size", "shm-growth-byte-size"} <= backend.keys():
        messages.append("the default flags do not size the python backend's shared memory")
    exposed = {port for item in by_keyword.get("EXPOSE", []) for port in item.arguments.split()}
    if not {"8000", "8001", "8002"} <= exposed:
        messages.append(f"EXPOSE must list Triton's 8000, 8001 and 8002, not {sorted(exposed)}")
    for instruction in by_keyword.get("COPY", []) + by_keyword.get("ADD", []):
        sources = [s for s in instruction.arguments.split()[:-1] if not s.startswith("--")]
        if any(WEIGHT_FILES.search(source) for source in sources):
            messages.append(f"line {instruction.line}: weights must be mounted, never copied into the image")
    if chart_values is not None:
        messages += _chart_agreement(flags, backend, user, chart_values)
    return [Problem("contract", message) for message in messages]


def _chart_agreement(flags: dict[str, str], backend: dict[str, str], user: str, values: dict) -> list[str]:
    """`docker run` and `helm install` should behave alike with their defaults."""
    out = []
    if flags.get("exit-timeout-secs") != str(values["server"]["exitTimeoutSeconds"]):
        out.append("--exit-timeout-secs differs from the chart's server.exitTimeoutSeconds")
    shm = values["server"]["pythonBackend"]
    if backend.get("shm-default-byte-size") != str(shm["shmDefaultByteSize"]):
        out.append("shm-default-byte-size differs from the chart's server.pythonBackend.shmDefaultByteSize")
    if user != str(values["podSecurityContext"]["runAsUser"]):
        out.append(f"USER {user} differs from the chart's podSecurityContext.runAsUser")
    if flags.get("model-repository") not in values["server"]["modelRepositories"]:
        out.append("the image's --model-repository is not among the chart's server.modelRepositories")
    return out


def hadolint_problems(tools: Tools, dockerfile: Path) -> list[Problem]:
    done = run(
        [
            tools.hadolint,
            "--config",
            HADOLINT_CONFIG,
            "--disable-ignore-pragma",
            "--no-color",
            "--format",
            "tty",
            dockerfile,
        ]
    )
    if done.returncode == 0:
        return []
    lines = (done.stdout + done.stderr).strip().splitlines() or [f"hadolint exited {done.returncode}"]
    return [Problem("hadolint", line) for line in lines]


def check_dockerfile(tools: Tools, dockerfile: Path = DOCKERFILE) -> list[Problem]:
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    return hadolint_problems(tools, dockerfile) + contract_problems(dockerfile.read_text(), chart_values)
