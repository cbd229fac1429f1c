"""`edge-builder fleet status|watch`: the fleet table, once or live; and the broker options
shared with `edge-builder rollout`."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

from agent.wire.broker import BrokerCredentials
from agent.wire.cli import HelpFormatter, print_json
from agent.wire.errors import UsageError
from agent.wire.mqtt import utc_now
from builder.fleet.session import (
    DEFAULT_TIMEOUT_S,
    ENV_BROKER,
    ENV_PASSWORD,
    ENV_USERNAME,
    QUIET_S,
    collect_fleet,
    fleet_session,
)
from builder.fleet.view import FleetView, render_table


def add_credential_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--username", default=os.environ.get(ENV_USERNAME), help=f"broker username (env: {ENV_USERNAME})")
    p.add_argument("--password-file", default=None,
                   help=f"file holding the broker password; None: env {ENV_PASSWORD}")
    p.add_argument("--ca-file", default=None, help="CA certificate for mqtts://; None: the system CAs")
    p.add_argument("--cert-file", default=None, help="client certificate for mqtts://")
    p.add_argument("--key-file", default=None, help="client key for mqtts://")


def credentials_from_args(args: argparse.Namespace) -> BrokerCredentials:
    password = os.environ.get(ENV_PASSWORD)
    if args.password_file is not None:
        try:
            password = Path(args.password_file).read_text().strip()
        except OSError as e:
            raise UsageError(f"cannot read --password-file {args.password_file}: {e}") from e
    return BrokerCredentials(username=args.username, password=password, ca_file=args.ca_file,
                             cert_file=args.cert_file, key_file=args.key_file)


def broker_url_from_args(args: argparse.Namespace) -> str:
    if not args.broker:
        raise UsageError(f"no broker: pass --broker mqtt[s]://host:port or set {ENV_BROKER}")
    return str(args.broker)


def _status(args: argparse.Namespace) -> int:
    view = collect_fleet(broker_url_from_args(args), credentials_from_args(args), args.fleet, args.timeout)
    report = view.report(channel=args.channel, state=args.state)
    if args.json:
        print_json(report)
    else:
        print(render_table(report, utc_now()))
    return 0


def _watch(args: argparse.Namespace) -> int:
    view, lock, changed = FleetView(args.fleet), threading.Lock(), threading.Event()
    is_tty = sys.stdout.isatty() and not args.json
    end = time.monotonic() + args.duration if args.duration else None
    with fleet_session(broker_url_from_args(args), credentials_from_args(args), view, lock, changed):
        time.sleep(QUIET_S)  # let the retained burst arrive before the first frame
        changed.set()
        while end is None or time.monotonic() < end:
            # Redraw on a change, and every few seconds anyway so "last seen" ages.
            if changed.wait(min(args.refresh, (end - time.monotonic()) if end else args.refresh)) or is_tty:
                changed.clear()
                with lock:
                    report = view.report(channel=args.channel, state=args.state)
                if args.json:
                    print_json(report)  # one object per line, per change
                else:
                    frame = render_table(report, utc_now())
                    sys.stdout.write(("\x1b[H\x1b[2J" if is_tty else "\n") + frame + "\n")
                    sys.stdout.flush()
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default=os.environ.get(ENV_BROKER),
                   help=f"mqtt://host:port or mqtts://host:port (env: {ENV_BROKER})")
    p.add_argument("--fleet", default="default", help="topic prefix edgefleet/<fleet>")
    p.add_argument("--channel", default=None, help="only devices following this channel")
    p.add_argument("--state", default=None, help="only devices in this state, e.g. ACTIVE or FAILED")
    p.add_argument("--json", action="store_true", help="print a FleetReport JSON object instead of the table")
    add_credential_args(p)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fleet = subparsers.add_parser("fleet", help="see where every device of a fleet stands",
                                  formatter_class=HelpFormatter)
    sub = fleet.add_subparsers(dest="fleet_command", metavar="{status,watch}", required=True)

    status = sub.add_parser(
        "status", help="print the fleet table once", formatter_class=HelpFormatter,
        description="Subscribe to the retained status topics and print one row per device.",
        epilog="example:\n  edge-builder fleet status --broker mqtts://broker:8884 --fleet prod "
               "--username operator --ca-file ca.crt --state FAILED")
    _common(status)
    status.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds to wait for retained statuses at most")
    status.set_defaults(handler=_status)

    watch = sub.add_parser(
        "watch", help="keep the fleet table live", formatter_class=HelpFormatter,
        description="Like status, redrawn on every change (and every --refresh seconds). "
                    "With --json: one FleetReport object per line, per change.",
        epilog="example:\n  edge-builder fleet watch --broker mqtt://127.0.0.1:1883 --fleet demo --channel stable")
    _common(watch)
    watch.add_argument("--refresh", type=float, default=5.0, help="seconds between redraws without changes")
    watch.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: run until ^C)")
    watch.set_defaults(handler=_watch)
