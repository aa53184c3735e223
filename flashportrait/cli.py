"""The `flashportrait` command line.

Subcommands register themselves in `COMMANDS`: each entry is `(name, add_arguments, run)`, where
`add_arguments(parser)` declares the subcommand's options and `run(args) -> int` does the work and
returns the exit status. Heavy imports happen inside `run`, so `flashportrait --help` stays fast.

Implemented here: `serve`. Extension points, to be added by their owners as `(name, add, run)` entries
in `COMMANDS` (keeping their code in their own modules):
- `animate` (client/: stream an animation from a server, or from a local one started on demand),
- `demo` (the README's first command: synthetic media and demo weights, end to end on the CPU),
- `generate` (export/: write the tiny demo weights in the release's layout).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]


def default_model_repository() -> Path | None:
    """`$FLASHPORTRAIT_MODEL_REPOSITORY`, else the checkout's `model_repository/` (editable installs)."""
    if os.environ.get("FLASHPORTRAIT_MODEL_REPOSITORY"):
        return Path(os.environ["FLASHPORTRAIT_MODEL_REPOSITORY"])
    checkout = Path(__file__).resolve().parents[1] / "model_repository"
    return checkout if checkout.is_dir() else None


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
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


def _run_serve(args: argparse.Namespace) -> int:
    from flashportrait.serving.server import ServerOptions, ServerStartError, TritonServer
    from flashportrait.serving.triton_env import TritonNotFoundError

    repository = args.model_repository or default_model_repository()
    if repository is None:
        print("error: no model repository; pass --model-repository", file=sys.stderr)
        return 2
    config_name = args.model_config_name
    if config_name == "auto":
        config_name = None if Path("/dev/nvidiactl").exists() else "cpu"
    options = ServerOptions(
        model_repository=repository,
        model_config_name=config_name or None,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_verbose=args.log_verbose,
        log_path=args.log_file,
        ready_timeout_s=args.ready_timeout,
        binary=args.tritonserver,
    )
    server = TritonServer(options)
    stop = threading.Event()
    previous: dict[int, object] = {}
    try:
        # Ctrl-C during start-up raises KeyboardInterrupt, and `start` stops what it started.
        server.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda _signum, _frame: stop.set())
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


COMMANDS: list[tuple[str, str, AddArguments, Run]] = [
    (
        "serve",
        "run the local Triton server with a model repository until Ctrl-C",
        _add_serve_arguments,
        _run_serve,
    ),
]
"""(name, one-line help, add_arguments, run) for every subcommand; append new ones here."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashportrait", description="FlashPortrait served by Triton")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_arguments, run in COMMANDS:
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
