"""The runtime model repository: `model_repository/` plus the artefacts made from the weights.

`model_repository/` holds configs and adapters only. `feature_extractor` is served by Triton's
ONNX Runtime backend (or, on the CPU server, a Python model running the same file), so it needs
`feature_extractor/1/model.onnx`, exported from the weights' `pd_fpg.pth`. That file is an artefact,
never committed; `assemble_repository` makes a runnable repository in a cache folder:

- every model folder of the source repository (a folder with a `config.pbtxt`) is linked in as it
  is, except `feature_extractor`, which is rebuilt of links to its files plus `1/model.onnx`;
- `model.onnx` is, in this order: the prepared folder's
  `<weights>/model_repository/feature_extractor/1/model.onnx` if the weights folder has one (read-only
  volumes, engines built ahead), else a cached export keyed by the SHA-256 of the motion encoder's
  checkpoint (the release's `pd_fpg.pth`, or a prepared folder's `motion_encoder.safetensors`) and the
  exporter's format version (`<cache>/feature_extractor/<key>/model.onnx`), exported on first use
  (a few seconds on a CPU) and checked against PyTorch with ONNX Runtime.

The assembled folder is named by a hash of the source repository's path and model list and of the
ONNX file used, so it is built once and reused; building is atomic (a staging folder renamed into
place), so servers started at the same time do not see half a repository.

    python -m flashportrait.serving.repository --weights DIR [--out DIR] [--model-repository DIR]
    python -m flashportrait.serving.repository --out DIR --exec tritonserver --model-repository=DIR ...

prints the assembled folder; with `--exec` it then replaces itself with the given command. The Docker
image's entrypoint is the second form, so `docker run` and the Helm chart assemble the repository for
the mounted weights before `tritonserver` starts (`flashportrait serve --weights` does the same).
Models read the weights folder from `$FLASHPORTRAIT_WEIGHTS` (see `settings.py`); the server started
on an assembled repository must have it set.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import uuid
from pathlib import Path

from flashportrait.serving.server import default_model_repository
from flashportrait.serving.triton_env import user_cache_dir

FEATURE_EXTRACTOR = "feature_extractor"
ONNX_FILE = "model.onnx"
# Bump when the exported graph changes (input format, opset, preprocessing): cached files are keyed by it.
ONNX_FORMAT = "pd-fgc-uint8-opset17-v1"
PREPARED_ONNX = Path("model_repository") / FEATURE_EXTRACTOR / "1" / ONNX_FILE
_READY = "READY"


class RepositoryError(RuntimeError):
    """The repository cannot be assembled (no source, missing weights file, failed export)."""


def file_digest(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def model_folders(source: Path) -> list[Path]:
    """The model folders of a repository: sub-folders holding a `config.pbtxt`, by name."""
    return sorted(p for p in source.iterdir() if p.is_dir() and (p / "config.pbtxt").is_file())


def _publish(staging: Path, target: Path) -> None:
    """Rename a finished staging folder into place; a finished `target` from a racing process wins."""
    (staging / _READY).write_text("")
    try:
        staging.rename(target)
    except OSError:
        if not (target / _READY).is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)


def feature_extractor_onnx(weights: Path, cache_root: Path | None = None) -> Path:
    """The motion encoder as ONNX for `weights` (see the module docstring for where it comes from)."""
    prepared = weights / PREPARED_ONNX
    if prepared.is_file():
        return prepared
    from flashportrait.components import WeightPaths
    from flashportrait.components.prepared import PreparedPaths, is_prepared

    if is_prepared(weights):
        checkpoint = PreparedPaths(weights).tensors("motion_encoder")
    else:
        checkpoint = WeightPaths.under(weights).motion_encoder
    if not checkpoint.is_file():
        raise RepositoryError(f"{checkpoint} is missing: the feature extractor is exported from it")
    key = f"{file_digest(checkpoint)[:24]}-{ONNX_FORMAT}"
    folder = (cache_root or user_cache_dir()) / FEATURE_EXTRACTOR / key
    if (folder / _READY).is_file():
        return folder / ONNX_FILE
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _export_onnx(weights, staging / ONNX_FILE)
        _publish(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder / ONNX_FILE


def _export_onnx(weights: Path, path: Path) -> None:
    import torch

    from flashportrait.components import FEATURE_EXTRACTOR_PARTS, load_components
    from flashportrait.export.motion_encoder import (
        FeatureExtractor,
        compare_features,
        example_input,
        export_onnx,
        onnx_features,
    )

    encoder = load_components(weights, mode="quality", parts=FEATURE_EXTRACTOR_PARTS).motion_encoder
    export_onnx(encoder, path)
    crops = example_input("uint8", batch=2)
    with torch.no_grad():
        expected = FeatureExtractor(encoder.eval()).eval()(crops).numpy()
    parity = compare_features(onnx_features(path, crops.numpy()), expected)
    if not parity.passed:
        raise RepositoryError(
            "the exported feature extractor disagrees with PyTorch:\n" + "\n".join(parity.lines())
        )


def _link(target: Path, link: Path) -> None:
    link.symlink_to(target.resolve(), target_is_directory=target.is_dir())


def _populate(staging: Path, source: Path, onnx: Path) -> None:
    for model in model_folders(source):
        if model.name != FEATURE_EXTRACTOR:
            _link(model, staging / model.name)
            continue
        # Links to each file, so the artefact is added without writing into the source repository.
        folder = staging / model.name
        folder.mkdir()
        for entry in model.iterdir():
            if entry.name != "1":
                _link(entry, folder / entry.name)
        version = folder / "1"
        version.mkdir()
        if (model / "1").is_dir():
            for entry in (model / "1").iterdir():
                if entry.name != ONNX_FILE and entry.name != "__pycache__":
                    _link(entry, version / entry.name)
        _link(onnx, version / ONNX_FILE)


def assemble_repository(
    weights: Path | str,
    source: Path | str | None = None,
    cache_root: Path | None = None,
    out: Path | None = None,
) -> Path:
    """A runnable model repository for `weights` (see the module docstring); returns its folder.

    source: the repository of configs and adapters (default: `server.default_model_repository()`).
    out: build exactly here (replacing what is there) instead of the shared cache folder.
    """
    weights = Path(weights).resolve()
    if not weights.is_dir():
        raise RepositoryError(f"the weights folder {weights} does not exist")
    source_dir = Path(source) if source is not None else default_model_repository()
    if source_dir is None or not source_dir.is_dir():
        raise RepositoryError(
            "no model repository: pass --model-repository or set $FLASHPORTRAIT_MODEL_REPOSITORY"
        )
    source_dir = source_dir.resolve()
    models = model_folders(source_dir)
    if not any(m.name == FEATURE_EXTRACTOR for m in models):
        raise RepositoryError(f"{source_dir} has no {FEATURE_EXTRACTOR} model")
    cache_root = cache_root or user_cache_dir()
    onnx = feature_extractor_onnx(weights, cache_root)
    if out is not None:
        out = Path(out)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        _populate(out, source_dir, onnx)
        return out
    key = hashlib.sha256(
        "\n".join([str(source_dir), *(m.name for m in models), str(onnx.resolve())]).encode()
    ).hexdigest()[:16]
    target = cache_root / "model_repositories" / key
    if (target / _READY).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        _populate(staging, source_dir, onnx)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flashportrait.serving.repository",
        description="Assemble the runtime model repository for a weights folder and print its path.",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=os.environ.get("FLASHPORTRAIT_WEIGHTS"),
        help="default $FLASHPORTRAIT_WEIGHTS",
    )
    parser.add_argument("--model-repository", type=Path, default=None, help="source repository")
    parser.add_argument("--out", type=Path, default=None, help="build here instead of the cache")
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default: the user cache)")
    parser.add_argument(
        "--exec",
        dest="command",
        nargs=argparse.REMAINDER,
        default=None,
        help="then run this command in place of this process (the rest of the command line)",
    )
    args = parser.parse_args(argv)
    if args.weights is None:
        print("error: pass --weights DIR or set $FLASHPORTRAIT_WEIGHTS", file=sys.stderr)
        return 2
    try:
        built = assemble_repository(args.weights, args.model_repository, args.cache, args.out)
    except RepositoryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not args.command:
        print(built)
        return 0
    print(f"model repository for {args.weights}: {built}", file=sys.stderr, flush=True)
    os.execvp(args.command[0], args.command)
    return 1  # not reached: execvp replaces this process or raises


if __name__ == "__main__":
    sys.exit(main())
