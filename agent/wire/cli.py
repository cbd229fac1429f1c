"""What `edge-agent` and `edge-builder` share: logging, error-to-exit-code
mapping and `--json` output. Subcommands live in their own modules and
register themselves through `register(subparsers)`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from pydantic import BaseModel

from agent.wire.errors import EdgefleetError, ExitCode

log = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace], int]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps example blocks as written and shows every option's default."""


def setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")


def print_json(model: BaseModel) -> None:
    """`--json` prints exactly one JSON object to stdout."""
    sys.stdout.write(model.model_dump_json() + "\n")
    sys.stdout.flush()


def build_parser(prog: str, description: str, command_modules: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=ExitCode.help_text(),
                                     formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging on stderr (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in command_modules:
        importlib.import_module(name).register(subparsers)
    return parser


def run_cli(prog: str, description: str, command_modules: Sequence[str], argv: Sequence[str] | None) -> int:
    parser = build_parser(prog, description, command_modules)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    handler: Handler = args.handler
    try:
        return int(handler(args))
    except EdgefleetError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return int(e.exit_code)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
