"""The local server launcher and `flashportrait serve`: config variants, start-up failures, clean stop."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from flashportrait.serving.server import ServerOptions, ServerStartError, TritonServer, remove_stale_shm
from tests.serving.conftest import TEST_REPOSITORY, running_server

pytestmark = pytest.mark.server
REPO_ROOT = Path(__file__).resolve().parents[2]


def variant(url: str, model: str) -> str:
    config = grpcclient.InferenceServerClient(url).get_model_config(model).config
    return config.parameters["variant"].string_value


def group_members(pgid: int) -> list[int]:
    """Live processes in process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    members.append(int(entry.name))
            except ProcessLookupError:
                continue
    return members


def test_model_config_name_selects_the_cpu_variant_and_falls_back(server: TritonServer) -> None:
    assert variant(server.grpc_url, "stream_chunks") == "cpu"
    # prepare_offset has no configs/cpu.pbtxt: Triton falls back to its config.pbtxt and loads it.
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert client.is_model_ready("prepare_offset") and client.is_model_ready("stream_pipeline")


def test_without_a_config_name_the_plain_config_is_used() -> None:
    only = ("--model-control-mode=explicit", "--load-model=stream_chunks")
    with running_server(extra_args=only) as plain:
        assert variant(plain.grpc_url, "stream_chunks") == "default"
        assert not grpcclient.InferenceServerClient(plain.grpc_url).is_model_ready("stream_pipeline")


def test_a_model_that_fails_to_load_is_reported_with_the_server_log(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(TEST_REPOSITORY / "prepare_offset", repository / "prepare_offset")
    broken = repository / "prepare_offset" / "1" / "model.py"
    broken.write_text(
        broken.read_text().replace(
            "class TritonPythonModel:", "raise ImportError('no such thing')\n\nclass X:"
        )
    )
    server = TritonServer(ServerOptions(model_repository=repository, ready_timeout_s=60))
    with pytest.raises(ServerStartError) as failure:
        server.start()
    message = str(failure.value)
    assert "exited with code" in message and "tritonserver log" in message
    assert "no such thing" in message and "prepare_offset" in message
    assert server.process is None
    server.cleanup()


def test_stop_ends_the_server_and_its_python_stubs() -> None:
    with running_server(extra_args=("--model-control-mode=explicit", "--load-model=prepare_offset")) as live:
        assert live.process is not None
        pgid = live.process.pid
        assert len(group_members(pgid)) >= 2  # tritonserver and the prepare_offset stub
        shm_prefix = live._shm_prefix
    assert group_members(pgid) == []
    assert not list(Path("/dev/shm").glob(f"{shm_prefix}*"))


def test_serve_command_runs_until_interrupted() -> None:
    command = [
        sys.executable,
        "-m",
        "flashportrait.cli",
        "serve",
        f"--model-repository={TEST_REPOSITORY}",
        "--model-config-name=cpu",
        "--http-port=0",
        "--grpc-port=0",
        "--metrics-port=0",
        "--ready-timeout=120",
    ]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        found = re.search(r"tritonserver ready \((\w+)\): grpc=(\S+) http=\S+ metrics=\S+ log=(\S+)", line)
        assert found, line + process.stderr.read() if process.stderr else line
        client = grpcclient.InferenceServerClient(found.group(2))
        assert client.is_server_ready()
        assert variant(found.group(2), "stream_chunks") == "cpu"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        assert "stopping tritonserver" in process.stdout.read()
        log = Path(found.group(3))
        assert "successfully unloaded 'stream_chunks'" in log.read_text()
        log.unlink()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_stale_shared_memory_of_killed_launchers_is_removed() -> None:
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(finished.stdout)
    stale = Path("/dev/shm") / f"flashportrait_{dead_pid}_0123abcd_region"
    live = Path("/dev/shm") / f"flashportrait_{os.getpid()}_0123abcd_region"
    other = Path("/dev/shm") / f"someone_else_{dead_pid}_region"
    try:
        for path in (stale, live, other):
            path.write_bytes(b"x")
        remove_stale_shm()
        assert not stale.exists()
        assert live.exists() and other.exists()
    finally:
        for path in (stale, live, other):
            path.unlink(missing_ok=True)
