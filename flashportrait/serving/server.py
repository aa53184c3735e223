"""A local Triton Inference Server: started on free ports, waited for, and stopped cleanly.

    with TritonServer(ServerOptions(model_repository=Path("model_repository"), model_config_name="cpu")) as s:
        client = tritonclient.grpc.InferenceServerClient(s.grpc_url)

Used by `flashportrait serve`, by the client's embedded default and by the live tests. The server's
stdout and stderr go to a log file (a pipe that nobody drains would block the server); the log's tail
is part of every start-up error.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

from flashportrait.serving.triton_env import TritonInstall, locate_triton, server_environment

# Log lines that mean a port was taken between choosing it and the server binding it.
_PORT_CLASH = ("Address already in use", "failed to start", "Failed to start")
_PR_SET_PDEATHSIG = 1
_SHM_NAME = re.compile(r"flashportrait_(\d+)_[0-9a-f]{8}_")


def has_gpu() -> bool:
    """Whether an NVIDIA driver is present (without touching CUDA)."""
    return Path("/dev/nvidiactl").exists()


def resolve_config_name(name: str | None) -> str | None:
    """`--model-config-name` for a request: "auto" is "cpu" without a GPU (the `configs/cpu.pbtxt`
    variants of the CPU server) and the plain `config.pbtxt` with one; "" means the plain one."""
    if name == "auto":
        return None if has_gpu() else "cpu"
    return name or None


def default_model_repository() -> Path | None:
    """`$FLASHPORTRAIT_MODEL_REPOSITORY`, else the checkout's `model_repository/` (editable installs)."""
    if os.environ.get("FLASHPORTRAIT_MODEL_REPOSITORY"):
        return Path(os.environ["FLASHPORTRAIT_MODEL_REPOSITORY"])
    checkout = Path(__file__).resolve().parents[2] / "model_repository"
    return checkout if checkout.is_dir() else None


class ServerStartError(RuntimeError):
    """The server exited or did not become ready; the message ends with the tail of its log."""


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """How to run the server.

    model_repository: folder of models (`<model>/config.pbtxt`, `<model>/<version>/...`).
    model_config_name: `--model-config-name`; Triton 2.51 then loads `<model>/configs/<name>.pbtxt`
        where it exists and falls back to `<model>/config.pbtxt` (checked by tests/serving).
    http_port, grpc_port, metrics_port: 0 picks a free port.
    host: the address the URLs point at (the server listens on all interfaces).
    ready_timeout_s: how long to wait for readiness (every model loaded) before giving up.
    exit_timeout_s: `--exit-timeout-secs`, how long the server waits for in-flight requests on stop.
    log_verbose: `--log-verbose` level.
    log_path: where the server's output goes; None makes a temporary file.
    extra_args: appended to the command line as they are.
    binary: a specific `tritonserver` (see `triton_env.locate_triton`).
    die_with_parent: the server gets SIGKILL if the thread that started it dies (Linux `PR_SET_PDEATHSIG`),
        so a crashed test run leaves no server behind. Start it from a long-lived thread.
    gpu: whether the machine has a GPU for the server; None looks for `/dev/nvidiactl`. Without one,
        pinned host memory and GPU metrics are switched off (Triton would otherwise try them through CUDA
        and log errors).
    env: environment variables set for the server (and so for its Python models, e.g.
        `FLASHPORTRAIT_WEIGHTS`), on top of this process's environment.
    """

    model_repository: Path
    model_config_name: str | None = None
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    host: str = "127.0.0.1"
    ready_timeout_s: float = 120.0
    exit_timeout_s: int = 10
    log_verbose: int = 0
    log_path: Path | None = None
    extra_args: tuple[str, ...] = ()
    binary: Path | None = None
    die_with_parent: bool = True
    gpu: bool | None = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)


def free_port() -> int:
    """A TCP port nobody listens on right now (it may be taken again before we use it; `start` retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _pdeathsig_hook() -> Callable[[], None]:
    """A `preexec_fn` asking the kernel to SIGKILL the child when its parent thread dies.

    libc is loaded here, in the parent: the forked child only makes the one call (no imports, no
    dlopen, which could deadlock on a lock another thread held at fork time).
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return hook


class TritonServer:
    """One `tritonserver` process. `start()`/`stop()` or use it as a context manager."""

    def __init__(self, options: ServerOptions, install: TritonInstall | None = None) -> None:
        self.options = options
        self.install = install
        self.process: subprocess.Popen[bytes] | None = None
        self.http_port = options.http_port
        self.grpc_port = options.grpc_port
        self.metrics_port = options.metrics_port
        self.log_path = options.log_path
        # Python backend shared-memory regions get our own prefix so a killed server's leftovers in
        # /dev/shm can be removed without touching anyone else's.
        self._shm_prefix = f"flashportrait_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self._log_file_owned = False

    # --- addresses -------------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.options.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.options.host}:{self.metrics_port}/metrics"

    # --- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def command(self) -> list[str]:
        """The full command line (ports must be chosen already)."""
        install = self.install
        assert install is not None
        opts = self.options
        cmd = [
            str(install.binary),
            f"--model-repository={opts.model_repository.resolve()}",
            f"--backend-directory={install.backend_dir}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={opts.exit_timeout_s}",
            f"--log-verbose={opts.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
        ]
        gpu = opts.gpu if opts.gpu is not None else has_gpu()
        if not gpu:
            cmd += ["--pinned-memory-pool-byte-size=0", "--allow-gpu-metrics=false"]
        if install.cache_dir is not None:
            cmd.append(f"--cache-directory={install.cache_dir}")
        if opts.model_config_name:
            cmd.append(f"--model-config-name={opts.model_config_name}")
        cmd.extend(opts.extra_args)
        return cmd

    def start(self) -> None:
        """Start the server and wait until it is ready; on failure nothing is left running."""
        if self.process is not None:
            raise RuntimeError("server already started")
        if not self.options.model_repository.is_dir():
            raise ServerStartError(f"model repository {self.options.model_repository} is not a folder")
        if self.install is None:
            self.install = locate_triton(self.options.binary)
        remove_stale_shm()
        if self.log_path is None:
            handle, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(handle)
            self.log_path = Path(name)
            self._log_file_owned = True
        attempts = 1 if (self.http_port and self.grpc_port and self.metrics_port) else 3
        for attempt in range(attempts):
            self._choose_ports()
            try:
                self._launch()
                self.wait_ready(self.options.ready_timeout_s)
                return
            except ServerStartError as error:
                self.stop()
                clash = any(marker in str(error) for marker in _PORT_CLASH)
                if not clash or attempt == attempts - 1:
                    raise
                self.http_port, self.grpc_port, self.metrics_port = (
                    self.options.http_port,
                    self.options.grpc_port,
                    self.options.metrics_port,
                )
            except BaseException:
                self.stop()
                raise

    def _choose_ports(self) -> None:
        chosen: set[int] = set()
        ports = []
        for wanted in (self.http_port, self.grpc_port, self.metrics_port):
            port = wanted
            while not port or port in chosen:
                port = free_port()
            chosen.add(port)
            ports.append(port)
        self.http_port, self.grpc_port, self.metrics_port = ports

    def _launch(self) -> None:
        assert self.install is not None and self.log_path is not None
        with self.log_path.open("ab") as log:
            log.write(f"$ {' '.join(self.command())}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**server_environment(self.install), **self.options.env},
                # Own process group: `stop` can kill the server and its Python stubs together.
                start_new_session=True,
                preexec_fn=_pdeathsig_hook() if self.options.die_with_parent else None,
            )

    def log_text(self) -> str:
        """Everything the server has written so far."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def _failure(self, message: str, tail_lines: int = 60) -> ServerStartError:
        tail = "\n".join(self.log_text().splitlines()[-tail_lines:])
        return ServerStartError(f"{message}\n--- tritonserver log ({self.log_path}) ---\n{tail}")

    def is_ready(self) -> bool:
        """Whether `/v2/health/ready` answers 200 (all models loaded, with strict readiness)."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise self._failure(f"tritonserver exited with code {code} before it was ready")
            if self.is_ready():
                return
            time.sleep(0.1)
        raise self._failure(f"tritonserver was not ready after {timeout_s:.0f} s")

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGINT (Triton finishes in-flight requests up to its exit timeout), then SIGKILL the group."""
        process = self.process
        if process is not None:
            grace = timeout_s if timeout_s is not None else self.options.exit_timeout_s + 5
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=grace)
            # The group is ours (start_new_session): this also ends Python stubs a killed server left.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            self.process = None
        self._remove_shm_leftovers()

    def _remove_shm_leftovers(self) -> None:
        shm = Path("/dev/shm")
        if shm.is_dir():
            for leftover in shm.glob(f"{self._shm_prefix}*"):
                with contextlib.suppress(OSError):
                    leftover.unlink()

    def cleanup(self) -> None:
        """Stop, and delete the log if we created it."""
        self.stop()
        if self._log_file_owned and self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()


def remove_stale_shm() -> None:
    """Delete Python backend regions left in /dev/shm by launchers of ours that were killed.

    Only names this module makes (`flashportrait_<launcher pid>_<8 hex>_...`) whose launcher process is
    gone are removed; a live launcher's server cleans up after itself.
    """
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return
    for region in shm.iterdir():
        found = _SHM_NAME.match(region.name)
        if found is None:
            continue
        try:
            os.kill(int(found.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                region.unlink()
        except PermissionError:
            continue
