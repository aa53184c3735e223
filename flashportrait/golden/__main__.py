"""`python -m flashportrait.golden PATH...` and `python -m flashportrait.golden --manifests DIR`."""

from __future__ import annotations

import argparse
import sys

from flashportrait.golden.manifests import run_manifests
from flashportrait.golden.runner import run_paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flashportrait.golden",
        description=(
            "Check this build against the reference FlashPortrait golden vectors. Prints one line per case, "
            "'<case> <kind> PASS|FAIL max_abs=<x> max_rel=<y>' (max_rel = max|ours-golden| / max|golden|), "
            "then 'N passed, M failed'. With --manifests, the full-size models are built on the meta device "
            "and their parameter names and shapes compared with each manifest (max_abs/max_rel are 0 there)."
        ),
    )
    parser.add_argument("paths", nargs="*", help="case files (*.json) or folders of them")
    parser.add_argument("--manifests", metavar="DIR", help="folder of checkpoint manifests to check")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every compared output")
    args = parser.parse_args(argv)
    if not args.paths and not args.manifests:
        parser.error("give case files or folders, or --manifests DIR")
    results = []
    try:
        if args.paths:
            results += run_paths(args.paths, verbose=args.verbose)
        if args.manifests:
            results += run_manifests(args.manifests, verbose=args.verbose)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    passed = sum(r.passed for r in results)
    failed = len(results) - passed
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 and results else 1


if __name__ == "__main__":
    sys.exit(main())
