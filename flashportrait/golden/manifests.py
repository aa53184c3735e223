"""Check that our full-size models have exactly the parameter names and shapes of the release.

Each manifest (`golden/manifests/*.json`) names the reference class it was dumped from. We map that
class to a function of ours that builds the full-size model on the meta device and returns the names
and shapes a release checkpoint must hold in the manifest's key space (after the loader's rewrite).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

from flashportrait.golden.compare import Comparison, failure
from flashportrait.golden.runner import CaseResult

# reference class (first word of the manifest's `reference_class`) -> "module:function"
BUILDERS: dict[str, str] = {
    "wan.models.wan_transformer3d.WanTransformer3DModel": "flashportrait.models.transformer:manifest_shapes",
    "wan.models.portrait_encoder.PortraitEncoder": "flashportrait.models.portrait_encoder:manifest_shapes",
    "wan.models.wan_vae.AutoencoderKLWan": "flashportrait.models.wan_vae:manifest_shapes",
    "wan.models.wan_vae_tiny.TAEHV": "flashportrait.models.tiny_vae:manifest_shapes",
    "wan.models.wan_text_encoder.WanT5EncoderModel": "flashportrait.models.t5:manifest_shapes",
    "wan.models.wan_image_encoder.CLIPModel": "flashportrait.models.clip:manifest_shapes",
    "wan.models.pdf.FanEncoder": "flashportrait.models.motion_encoder:manifest_shapes",
}


def _builder(reference_class: str) -> Callable[[dict], dict[str, tuple[int, ...]]]:
    key = reference_class.split()[0]
    target = BUILDERS.get(key)
    if target is None:
        raise LookupError(f"no model of ours corresponds to reference class {key!r}")
    module_name, func = target.split(":")
    return getattr(importlib.import_module(module_name), func)


def check_manifest(path: Path) -> CaseResult:
    manifest = json.loads(path.read_text())
    result = CaseResult(case=path.stem, kind="manifest")
    try:
        ours = _builder(manifest["reference_class"])(manifest)
    except Exception as exc:  # reported as this manifest's failure
        result.comparisons.append(failure("build", f"{type(exc).__name__}: {exc}"))
        return result
    expected = {k: tuple(v) for k, v in manifest["keys"].items()}
    missing = sorted(set(expected) - set(ours))
    extra = sorted(set(ours) - set(expected))
    wrong = sorted(k for k in set(ours) & set(expected) if tuple(ours[k]) != expected[k])
    for name, keys in (("missing", missing), ("unexpected", extra)):
        if keys:
            result.comparisons.append(failure(name, f"{len(keys)} key(s): {', '.join(keys[:10])}"))
    if wrong:
        shown = ", ".join(f"{k} ours {list(ours[k])} release {list(expected[k])}" for k in wrong[:10])
        result.comparisons.append(failure("shapes", f"{len(wrong)} shape mismatch(es): {shown}"))
    if not result.comparisons:
        result.comparisons.append(Comparison(f"{len(expected)} tensors", True, 0.0, 0.0, 0.0, 0.0))
    return result


def run_manifests(folder: str | Path, *, verbose: bool = False, out=print) -> list[CaseResult]:
    results = []
    for path in sorted(Path(folder).glob("*.json")):
        result = check_manifest(path)
        out(result.line())
        if verbose or not result.passed:
            for comparison in result.comparisons:
                out(comparison.line())
        results.append(result)
    return results
