"""Run golden cases through our implementation and report one line per case.

Each kind has a module `flashportrait.golden.kinds.<kind>` with `run(case) -> list[Comparison]`,
driven only by the case's own JSON (config, call, tolerance), never by its file name. A kind
without an implementation, or one that raises, is a failure, never a skip.
"""

from __future__ import annotations

import importlib
import json
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from flashportrait.golden.case import GoldenCase
from flashportrait.golden.compare import Comparison, failure

KINDS: dict[str, str] = {
    "transformer_i2v": "flashportrait.golden.kinds.transformer_i2v",
    "portrait_encoder": "flashportrait.golden.kinds.portrait_encoder",
    "lora_merge": "flashportrait.golden.kinds.lora_merge",
    "schedulers": "flashportrait.golden.kinds.schedulers",
    "emo_split": "flashportrait.golden.kinds.emo_split",
    "wan_vae": "flashportrait.golden.kinds.wan_vae",
    "tiny_vae_decoder": "flashportrait.golden.kinds.tiny_vae_decoder",
    "text_encoder": "flashportrait.golden.kinds.text_encoder",
    "image_encoder": "flashportrait.golden.kinds.image_encoder",
    "motion_encoder": "flashportrait.golden.kinds.motion_encoder",
    "context_windows": "flashportrait.golden.kinds.context_windows",
    "pipeline": "flashportrait.golden.kinds.pipeline",
    "face_numeric": "flashportrait.golden.kinds.face_numeric",
}


@dataclass
class CaseResult:
    case: str
    kind: str
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.comparisons) and all(c.passed for c in self.comparisons)

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.comparisons), default=float("nan"))

    @property
    def max_rel(self) -> float:
        return max((c.max_rel for c in self.comparisons), default=float("nan"))

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return f"{self.case} {self.kind} {verdict} max_abs={self.max_abs:.3g} max_rel={self.max_rel:.3g}"


def discover(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Case files among `paths`: JSON files with a `kind` entry, folders searched (not recursively)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            candidates = sorted(path.glob("*.json"))
        elif path.is_file():
            candidates = [path]
        else:
            raise FileNotFoundError(f"{path} does not exist")
        for candidate in candidates:
            try:
                meta = json.loads(candidate.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                if path.is_file():
                    raise
                continue
            if isinstance(meta, dict) and "kind" in meta:
                yield candidate
            elif path.is_file():
                raise ValueError(f"{candidate} is not a golden case (it has no 'kind')")


def run_case(case: GoldenCase) -> CaseResult:
    result = CaseResult(case=case.name, kind=case.kind)
    module_name = KINDS.get(case.kind)
    if module_name is None:
        result.comparisons.append(failure("kind", f"unknown kind {case.kind!r}"))
        return result
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        result.comparisons.append(failure("kind", f"kind {case.kind!r} is not implemented yet"))
        return result
    try:
        comparisons = list(module.run(case))
    except Exception as exc:  # every error is reported as this case's failure
        tb = traceback.format_exc(limit=-3).strip().splitlines()
        result.comparisons.append(failure("error", f"{type(exc).__name__}: {exc} | {' / '.join(tb[-3:])}"))
        return result
    if not comparisons:
        comparisons = [failure("empty", "the kind compared nothing")]
    result.comparisons.extend(comparisons)
    return result


def run_paths(paths: Iterable[str | Path], *, verbose: bool = False, out=print) -> list[CaseResult]:
    results = []
    for path in discover(paths):
        result = run_case(GoldenCase.load(path))
        out(result.line())
        if verbose or not result.passed:
            for comparison in result.comparisons:
                if verbose or not comparison.passed:
                    out(comparison.line())
        results.append(result)
    return results
