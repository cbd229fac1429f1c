"""`edge-builder`: the operator host side."""

from __future__ import annotations

from collections.abc import Sequence

from agent.wire.cli import run_cli

# Each module defines register(subparsers); one subcommand (or group) per module.
COMMAND_MODULES: list[str] = [
    "builder.cli.build",
    "builder.cli.repo",
    "builder.cli.rollout",
    "builder.cli.fleet",
]


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("edge-builder", "edgefleet operator tool: build, sign, publish and roll out edge models.",
                   COMMAND_MODULES, argv)

