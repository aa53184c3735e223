"""Validate the deployment files: the Helm chart with its defaults and every values example, and the
Dockerfile. Prints every problem and exits 1 if there is any.

    .venv/bin/python -m tests.deploy.validate                      # everything
    .venv/bin/python -m tests.deploy.validate --values my.yaml      # one values file
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.deploy.dockerfile import DOCKERFILE, check_dockerfile
from tests.deploy.manifests import EXAMPLES, check_values
from tests.deploy.tools import ToolMissing, find_tools


def example_values() -> list[Path]:
    return sorted(EXAMPLES.glob("*.yaml"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", type=Path, action="append", help="values files (default: all examples)")
    parser.add_argument("--dockerfile", type=Path, default=DOCKERFILE)
    args = parser.parse_args(argv)
    try:
        tools = find_tools()
    except ToolMissing as error:
        print(error, file=sys.stderr)
        return 2
    targets: list[Path | None] = list(args.values) if args.values else [None, *example_values()]
    failed = False
    for values in targets:
        problems = check_values(tools, values)
        failed |= bool(problems)
        print(f"{'FAIL' if problems else 'ok  '} chart with {values or 'default values'}")
        for problem in problems:
            print(f"     {problem}")
    problems = check_dockerfile(tools, args.dockerfile)
    failed |= bool(problems)
    print(f"{'FAIL' if problems else 'ok  '} {args.dockerfile}")
    for problem in problems:
        print(f"     {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
