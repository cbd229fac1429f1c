"""`edge-agent`: the device side."""

from __future__ import annotations

from collections.abc import Sequence

from agent.wire.cli import run_cli

# Each module defines register(subparsers); one subcommand (or group) per module.
COMMAND_MODULES: list[str] = [
    "agent.cli.run",
    "agent.cli.update",
    "agent.cli.doctor",
    "agent.cli.serve",
    "agent.cli.prompt",
]


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("edge-agent", "edgefleet device agent: update, serve and report a local language model.",
                   COMMAND_MODULES, argv)

