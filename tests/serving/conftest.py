"""Live-server fixtures: one real `tritonserver` per test module, always stopped (also on failure)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flashportrait.serving.server import ServerOptions, TritonServer

TEST_REPOSITORY = Path(__file__).resolve().parent / "model_repository"


@contextlib.contextmanager
def running_server(repository: Path = TEST_REPOSITORY, **options: Any) -> Iterator[TritonServer]:
    """A started server on free ports; stopped and its log removed on exit, whatever happened."""
    server = TritonServer(ServerOptions(model_repository=repository, **options))
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def server() -> Iterator[TritonServer]:
    """The test repository served like the CPU product server (`--model-config-name=cpu`)."""
    with running_server(model_config_name="cpu") as live:
        yield live
