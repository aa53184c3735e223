"""The `flashportrait` command line: one subcommand per module.

A subcommand is a module with `add_arguments(parser: argparse.ArgumentParser) -> None` and
`run(args: argparse.Namespace) -> int` (the exit status), listed in `COMMANDS`. Modules are imported
when the parser is built, so they keep heavy imports (torch, tritonclient) inside `run`.

Extension points: the owners of these commands add one `Command` line each, pointing at their module:
- `animate` (client/: stream an animation from a server, or from a local one started on demand),
  e.g. `Command("animate", "animate a portrait with a driving video", "flashportrait.client.cli")`;
- `demo` (the README's first command: synthetic media and demo weights, end to end on the CPU);
- `generate` (export/: write the tiny demo weights in the release's file layout).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: its name, one line of help, and the module implementing it."""

    name: str
    help: str
    module: str


COMMANDS: tuple[Command, ...] = (
    Command(
        "serve",
        "run the local Triton server with a model repository until Ctrl-C",
        "flashportrait.serving.serve",
    ),
    Command("generate", "animate a portrait with a driving video into an MP4 file", "flashportrait.generate"),
    Command(
        "animate",
        "animate a portrait with a driving video through a Triton server",
        "flashportrait.client.cli",
    ),
    Command(
        "demo", "run the whole product on this machine with demo weights and media", "flashportrait.demo"
    ),
)


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashportrait", description="FlashPortrait served by Triton")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        module = importlib.import_module(command.module)
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
