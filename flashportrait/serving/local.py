"""The embedded default: the project's models on a local Triton server, for one client session.

    with local_server(weights) as server:
        client = FlashPortraitClient(server.grpc_url)

assembles the runtime repository for `weights` (`repository.py`), starts `tritonserver` from the
installed wheel (or a system install) on free ports with `FLASHPORTRAIT_WEIGHTS` (and the mode) set
for the models, waits until every model is loaded, and stops it on exit. Without a GPU the CPU
variants (`configs/cpu.pbtxt`) are served.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from flashportrait.serving.repository import assemble_repository
from flashportrait.serving.server import ServerOptions, TritonServer, resolve_config_name
from flashportrait.serving.settings import MODE_ENV, WEIGHTS_ENV


@contextlib.contextmanager
def local_server(
    weights: Path | str,
    *,
    mode: str | None = None,
    config_name: str | None = "auto",
    source: Path | None = None,
    cache_root: Path | None = None,
    log_path: Path | None = None,
    ready_timeout_s: float = 900.0,
) -> Iterator[TritonServer]:
    """A started server for `weights`; stopped (and its temporary log removed) on exit."""
    repository = assemble_repository(weights, source, cache_root)
    env = {WEIGHTS_ENV: str(Path(weights).resolve())}
    if mode is not None:
        env[MODE_ENV] = mode
    server = TritonServer(
        ServerOptions(
            model_repository=repository,
            model_config_name=resolve_config_name(config_name),
            log_path=log_path,
            ready_timeout_s=ready_timeout_s,
            env=env,
        )
    )
    try:
        server.start()
        yield server
    finally:
        server.cleanup()
