"""`flashportrait serve`: the local Triton server in the foreground until Ctrl-C (or SIGTERM).

With `--weights DIR` (default `$FLASHPORTRAIT_WEIGHTS`) the project's repository is first assembled
for those weights (`repository.assemble_repository`: the feature extractor's ONNX file is exported or
reused) and the models read the weights from `$FLASHPORTRAIT_WEIGHTS`, which the server is given;
without weights the repository is served as it is (test repositories).

Prints one line once the server is ready (`tritonserver ready (<wheel|system>): grpc=HOST:PORT
http=HOST:PORT metrics=URL log=PATH`), and `stopping tritonserver` when asked to stop.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from flashportrait.serving.server import (
    ServerOptions,
    ServerStartError,
    TritonServer,
    default_model_repository,
    resolve_config_name,
)
from flashportrait.serving.settings import MODE_ENV, WEIGHTS_ENV
from flashportrait.serving.triton_env import TritonNotFoundError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=None,
        help="model repository folder (default: $FLASHPORTRAIT_MODEL_REPOSITORY, else the checkout's "
        "model_repository/)",
    )
    parser.add_argument(
        "--model-config-name",
        default="auto",
        help="load <model>/configs/<NAME>.pbtxt where it exists; 'auto' (default) means 'cpu' on a machine "
        "without a GPU and the plain config.pbtxt otherwise; '' forces config.pbtxt",
    )
    parser.add_argument("--http-port", type=int, default=8000, help="0 picks a free port (default 8000)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="0 picks a free port (default 8001)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="0 picks a free port (default 8002)")
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    parser.add_argument("--log-file", type=Path, default=None, help="write the server log here")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for readiness")
    parser.add_argument("--tritonserver", type=Path, default=None, help="use this tritonserver binary")
    parser.add_argument(
        "--weights",
        type=Path,
        default=os.environ.get(WEIGHTS_ENV) or None,
        help=f"weights folder in the release layout (default ${WEIGHTS_ENV}); "
        "assembles the repository for it",
    )
    parser.add_argument(
        "--mode",
        choices=["fast", "quality"],
        default=None,
        help=f"sampler mode (default ${MODE_ENV} or fast)",
    )


def run(args: argparse.Namespace) -> int:
    repository = args.model_repository or default_model_repository()
    if repository is None:
        print("error: no model repository; pass --model-repository", file=sys.stderr)
        return 2
    config_name = resolve_config_name(args.model_config_name)
    env: dict[str, str] = {}
    if args.weights is not None:
        from flashportrait.serving.repository import RepositoryError, assemble_repository

        try:
            repository = assemble_repository(args.weights, repository)
        except RepositoryError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        env[WEIGHTS_ENV] = str(Path(args.weights).resolve())
    if args.mode is not None:
        env[MODE_ENV] = args.mode
    options = ServerOptions(
        model_repository=repository,
        model_config_name=config_name,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_verbose=args.log_verbose,
        log_path=args.log_file,
        ready_timeout_s=args.ready_timeout,
        binary=args.tritonserver,
        env=env,
    )
    server = TritonServer(options)
    stop = threading.Event()
    previous: dict[int, object] = {}
    try:
        # During start-up Ctrl-C and SIGTERM raise KeyboardInterrupt, and `start` stops what it started.
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, signal.default_int_handler)
        server.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous.setdefault(sig, signal.signal(sig, lambda _signum, _frame: stop.set()))
        source = server.install.source if server.install else "?"
        print(
            f"tritonserver ready ({source}): grpc={server.grpc_url} http={server.http_url} "
            f"metrics={server.metrics_url} log={server.log_path}",
            flush=True,
        )
        while not stop.wait(0.5):
            if server.process is None or server.process.poll() is not None:
                print(f"error: tritonserver exited; log: {server.log_path}", file=sys.stderr)
                return 1
        print("stopping tritonserver", flush=True)
        return 0
    except (ServerStartError, TritonNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
