"""The chart's tritonserver arguments, run by a real Triton 2.51 (the nvidia-pytriton wheel's binary):
every flag is accepted, the Python backend maps its shared-memory regions at the chart's size, the
exit timeout is the chart's, and the queue metric the autoscaler's adapter rule reads exists."""

from __future__ import annotations

import re
import signal
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from flashportrait.serving.server import free_port
from flashportrait.serving.triton_env import TritonNotFoundError, locate_triton, server_environment
from tests.deploy.manifests import render
from tests.deploy.tools import Tools

ECHO_CONFIG = """
name: "echo"
backend: "python"
max_batch_size: 0
input [{ name: "X", data_type: TYPE_FP32, dims: [ -1 ] }]
output [{ name: "Y", data_type: TYPE_FP32, dims: [ -1 ] }]
instance_group [{ kind: KIND_CPU, count: 1 }]
"""
ECHO_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x)]))
        return out
"""


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except OSError:
        return 0, ""


@pytest.mark.server
def test_chart_arguments_run_on_triton(deploy_tools: Tools, tmp_path: Path) -> None:
    try:
        install = locate_triton()
    except TritonNotFoundError as error:
        pytest.skip(str(error))
    docs, problems = render(deploy_tools)
    assert problems == []
    (deployment,) = (d for d in docs if d["kind"] == "Deployment")
    chart_args: list[str] = deployment["spec"]["template"]["spec"]["containers"][0]["args"]

    repository = tmp_path / "models"
    (repository / "echo" / "1").mkdir(parents=True)
    (repository / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repository / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    prefix = f"fpdeploy_{uuid.uuid4().hex[:8]}_"
    args = []
    for arg in chart_args:
        name = arg.split("=", 1)[0].removeprefix("--")
        if name == "model-repository":
            arg = f"--model-repository={repository}"
        elif name.endswith("-port"):
            arg = f"--{name}={ports[name.removesuffix('-port')]}"
        args.append(arg)
    # This machine: the wheel's backends, no GPU, and shared-memory names no other server uses.
    args += [f"--backend-directory={install.backend_dir}", "--allow-gpu-metrics=false"]
    args += [f"--backend-config=python,shm-region-prefix-name={prefix}"]
    if install.cache_dir is not None:
        args.append(f"--cache-directory={install.cache_dir}")

    server = subprocess.Popen(
        [str(install.binary), *args],
        env=server_environment(install),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while _get(f"http://127.0.0.1:{ports['http']}/v2/health/ready")[0] != 200:
            assert server.poll() is None, server.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "tritonserver did not become ready"
            time.sleep(0.3)
        assert _get(f"http://127.0.0.1:{ports['http']}/v2/models/echo/ready")[0] == 200

        regions = sorted(Path("/dev/shm").glob(f"{prefix}*"))
        assert regions, "the Python backend mapped no shared memory"
        default_size = int(next(a for a in chart_args if "shm-default-byte-size" in a).rsplit("=", 1)[1])
        assert max(region.stat().st_size for region in regions) == default_size

        status, metrics = _get(f"http://127.0.0.1:{ports['metrics']}/metrics")
        assert status == 200
        assert re.search(r'^nv_inference_pending_request_count\{model="echo",version="1"\} 0$', metrics, re.M)
        assert re.search(r'^nv_inference_queue_duration_us\{model="echo",version="1"\} 0$', metrics, re.M)
    finally:
        server.send_signal(signal.SIGTERM)
        log = server.communicate(timeout=60)[0]
        for region in Path("/dev/shm").glob(f"{prefix}*"):
            region.unlink()
    exit_timeout = next(a for a in chart_args if a.startswith("--exit-timeout-secs=")).split("=", 1)[1]
    assert f'"Timeout {exit_timeout}: Found 0 model versions that have in-flight inferences"' in log
    assert server.returncode == 0, log[-3000:]
