"""`edge-builder`: the operator host side."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from agent.clikit import run_cli

# Each module defines register(subparsers); one subcommand (or group) per module.
COMMAND_MODULES: list[str] = [
    "builder.cmd_build",
    "builder.cmd_repo",
    "builder.cmd_rollout",
    "builder.fleet",
]


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("edge-builder", "edgefleet operator tool: build, sign, publish and roll out edge models.",
                   COMMAND_MODULES, argv)


if __name__ == "__main__":
    sys.exit(main())
