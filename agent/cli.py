"""`edge-agent`: the device side."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from agent.clikit import run_cli

# Each module defines register(subparsers); one subcommand (or group) per module.
COMMAND_MODULES: list[str] = [
    "agent.cmd_run",
    "agent.cmd_update",
    "agent.cmd_doctor",
    "agent.serve_cli",
    "agent.prompt_cli",
]


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("edge-agent", "edgefleet device agent: update, serve and report a local language model.",
                   COMMAND_MODULES, argv)


if __name__ == "__main__":
    sys.exit(main())
