"""`edge-builder rollout` and `edge-builder rollback`: staged releases of a channel."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from agent.wire.cli import HelpFormatter, print_json
from agent.wire.errors import ExitCode, UsageError
from builder.cli.fleet import add_credential_args, broker_url_from_args, credentials_from_args
from builder.fleet.policy import parse_waves
from builder.fleet.rollout import Broker, RolloutController, RolloutPlan
from builder.fleet.session import ENV_BROKER
from builder.fleet.state import RolloutPhase
from builder.release.repository import parse_duration_s


def _progress(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _broker(args: argparse.Namespace, *, required: bool) -> Broker | None:
    if not args.broker and not required:
        return None
    return Broker(url=broker_url_from_args(args), creds=credentials_from_args(args), fleet=args.fleet)


def _cmd_rollout(args: argparse.Namespace) -> int:
    try:
        waves = parse_waves(args.waves)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if not 0 < args.min_success <= 1:
        raise UsageError(f"--min-success {args.min_success}: give a share in (0, 1], e.g. 0.95")
    wait_s = parse_duration_s(args.wait)
    if wait_s <= 0:
        raise UsageError(f"--wait {args.wait}: a wave needs a wait longer than 0, e.g. 10m")
    plan = RolloutPlan(channel=args.channel, model=args.model, version=args.version, waves=waves,
                       min_success=args.min_success, wait_s=float(wait_s), salt=args.salt)
    controller = RolloutController(Path(args.repo), _broker(args, required=True), progress=_progress)
    state = controller.start(plan)
    if args.json:
        print_json(state)
    if state.phase is RolloutPhase.SUCCEEDED:
        return ExitCode.OK
    _progress(f"edge-builder: rollout {state.phase.value.lower().replace('_', ' ')}: {state.reason}")
    return ExitCode.FAILED


def _cmd_rollback(args: argparse.Namespace) -> int:
    controller = RolloutController(Path(args.repo), _broker(args, required=False), progress=_progress)
    state = controller.rollback(args.channel, reason=args.reason)
    if args.json:
        print_json(state)
    return ExitCode.OK


def _broker_args(p: argparse.ArgumentParser, *, required_note: str) -> None:
    p.add_argument("--broker", default=os.environ.get(ENV_BROKER),
                   help=f"mqtt://host:port or mqtts://host:port; {required_note} (env: {ENV_BROKER})")
    p.add_argument("--fleet", default="default", help="topic prefix edgefleet/<fleet>")
    add_credential_args(p)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "rollout", help="move a channel to a model version wave by wave, rolling back on failure",
        formatter_class=HelpFormatter,
        description="Sign the channel at each wave's percent (one salt for the whole rollout, so cohorts only "
                    "grow), ring the doorbell, and wait until --min-success of the wave's devices report ACTIVE on "
                    "the new version. A wave that fails or times out stops the rollout and signs the previous "
                    "version back at 100% with allow_downgrade. Devices and their channels come from their "
                    "retained statuses. The state is kept in REPO/rollouts/CHANNEL.json: run the same command "
                    "again after an interruption and it continues from the saved wave. Progress goes to stderr.",
        epilog="example:\n  edge-builder rollout stable smollm2 3 --repo ./repo --broker mqtt://127.0.0.1:1883 "
               "--fleet prod --waves 5,25,100 --min-success 0.95 --wait 10m\n" + ExitCode.help_text())
    p.add_argument("channel", metavar="CHANNEL")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("version", metavar="VERSION", type=int)
    p.add_argument("--repo", required=True, metavar="DIR", help="repository dir made by `repo init`")
    _broker_args(p, required_note="required")
    p.add_argument("--waves", default="5,25,100", help="increasing percents of the fleet, the last one 100")
    p.add_argument("--min-success", type=float, default=0.95,
                   help="share of a wave's devices that must report ACTIVE on the new version")
    p.add_argument("--wait", default="10m", help="how long each wave may take (s, m, h, d)")
    p.add_argument("--salt", default=None, help="cohort salt for this rollout; None: a fresh random one")
    p.add_argument("--json", action="store_true", help="print the final rollout state as one JSON object")
    p.set_defaults(handler=_cmd_rollout)

    p = subparsers.add_parser(
        "rollback", help="sign the version a rollout replaced back into the channel", formatter_class=HelpFormatter,
        description="Sign the channel file the last rollout on CHANNEL replaced (from REPO/rollouts/CHANNEL.json) "
                    "at 100% with allow_downgrade, and ring the doorbell when --broker is given. A rollout "
                    "controller still running on the channel notices and stops.",
        epilog="example:\n  edge-builder rollback stable --repo ./repo --broker mqtt://127.0.0.1:1883 --fleet prod\n"
               + ExitCode.help_text())
    p.add_argument("channel", metavar="CHANNEL")
    p.add_argument("--repo", required=True, metavar="DIR", help="repository dir made by `repo init`")
    _broker_args(p, required_note="optional: rings the doorbell")
    p.add_argument("--reason", default="operator rollback", help="recorded in the rollout state")
    p.add_argument("--json", action="store_true", help="print the rollout state as one JSON object")
    p.set_defaults(handler=_cmd_rollback)
