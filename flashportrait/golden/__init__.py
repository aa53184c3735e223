"""The golden runner: checks this build against the reference FlashPortrait implementation."""

from flashportrait.golden.case import GoldenCase
from flashportrait.golden.compare import Comparison, compare, compare_exact, failure
from flashportrait.golden.runner import CaseResult, run_case, run_paths

__all__ = [
    "CaseResult",
    "Comparison",
    "GoldenCase",
    "compare",
    "compare_exact",
    "failure",
    "run_case",
    "run_paths",
]
