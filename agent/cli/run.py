"""`edge-agent run --config F`: the device daemon (see `agent.daemon`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from agent.config import DEFAULT_CONFIG_PATH
from agent.wire.cli import HelpFormatter
from agent.wire.errors import ExitCode

_EPILOG = """example:
  edge-agent run --config /etc/edge-agent/agent.toml
  EDGE_AGENT_BROKER_URL=mqtt://broker:1883 edge-agent run --config agent.toml

signals: SIGTERM drains requests and exits 0; SIGHUP reloads the config file.
systemd: Type=notify (READY=1 once serving, STATUS= lines, WATCHDOG=1 at half WatchdogSec).
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "run", help="run the device daemon: serve the local API, update on doorbell and poll, report over MQTT",
        formatter_class=HelpFormatter,
        description="The agent daemon: serves the active model on api_bind, checks the signed repository at "
                    "start, on the MQTT releases doorbell, on a check_now command and every poll_interval_s, "
                    "installs updates with load + canary + atomic switch (rollback on failure), and publishes "
                    "status, events and telemetry.",
        epilog=_EPILOG + ExitCode.help_text())
    p.add_argument("--config", default=str(DEFAULT_CONFIG_PATH),
                   help="agent TOML config; every key can be overridden by EDGE_AGENT_<KEY>")
    p.set_defaults(handler=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from agent.daemon import run_daemon

    if args.verbose == 0:
        # A daemon logs one INFO line per event to the journal; -v adds nothing, -vv debug.
        logging.getLogger().setLevel(logging.INFO)
    return run_daemon(Path(args.config))
