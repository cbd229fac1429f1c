"""The demo's MQTT broker: Mosquitto when installed, else an embedded Python broker.

`broker_command()` says how to start one on a given port; the demo runs it as a
subprocess in its own process group like every other part, so stopping it is
the same as stopping an agent. The embedded broker is amqtt (MQTT 3.1.1,
retained messages, wills, persistent sessions), started by running this module:

    python -m builder.demo.broker --port 1883

It is for demos and laptops only: anonymous, loopback, nothing persisted. A
real fleet uses Mosquitto or a broker cluster (deploy/mosquitto.conf).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Literal

from agent.wire.errors import require

BrokerKind = Literal["mosquitto", "amqtt"]
BROKER_CHOICES = ("auto", "mosquitto", "amqtt")


def mosquitto_binary() -> str | None:
    """The mosquitto executable, also where Debian puts it outside a user's PATH."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def choose_broker(wanted: str) -> BrokerKind:
    """`auto` picks Mosquitto when installed, else the embedded broker.

    Raises:
        UsageError: `mosquitto` was asked for and is not installed.
    """
    from agent.wire.errors import UsageError

    if wanted == "amqtt":
        return "amqtt"
    if mosquitto_binary() is not None:
        return "mosquitto"
    if wanted == "mosquitto":
        raise UsageError("--broker mosquitto: no mosquitto binary found: install it (apt-get install mosquitto) "
                         "or use --broker amqtt")
    return "amqtt"


def mosquitto_conf(port: int, host: str = "127.0.0.1") -> str:
    lines = [
        f"listener {port} {host}",
        "allow_anonymous true",
        "persistence false",
        "log_dest stdout",
        "log_type error",
        "log_type warning",
        "log_type notice",
    ]
    if os.geteuid() == 0:
        # As root, mosquitto would switch to a `mosquitto` user that may not exist here.
        lines.insert(0, "user root")
    return "\n".join(lines) + "\n"


def broker_command(kind: BrokerKind, port: int, workdir: Path, host: str = "127.0.0.1") -> list[str]:
    """The argv that runs a broker of `kind` on `host`:`port` (config files go in `workdir`)."""
    if kind == "mosquitto":
        binary = require(mosquitto_binary(), "the mosquitto binary choose_broker() found")
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "mosquitto.conf"
        conf.write_text(mosquitto_conf(port, host))
        return [binary, "-c", str(conf)]
    return [sys.executable, "-m", "builder.demo.broker", "--port", str(port), "--host", host, "--workdir", str(workdir)]


def _amqtt_config(host: str, port: int) -> dict[str, object]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


async def _serve(host: str, port: int) -> None:
    from amqtt.broker import Broker

    broker = Broker(_amqtt_config(host, port))
    await broker.start()
    print(f"event=broker_ready kind=amqtt port={port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m builder.demo.broker",
                                     description="embedded MQTT 3.1.1 broker (amqtt), anonymous, for demos")
    parser.add_argument("--port", type=int, required=True, help="TCP port")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="the demo run this broker belongs to: named on the command line so that a later demo "
                             "finds and stops it if this one was killed (nothing is written there)")
    args = parser.parse_args(argv)
    # amqtt logs every packet at INFO; a demo broker only has to say when something is wrong.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
