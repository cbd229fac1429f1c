"""`edge-builder repo|publish|channel|serve`: the signed release repository."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.wire.channel import ChannelFile, Rollout
from agent.wire.cli import HelpFormatter, print_json
from agent.wire.errors import ExitCode, UsageError
from builder.release.repository import DEFAULT_EXPIRY_S, ROLES, RepoSettings, TufRepo, parse_duration_s


def _parse_role_value(items: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        role, sep, value = item.partition("=")
        if not sep or role not in ROLES:
            raise UsageError(f"--{what} {item!r} must be ROLE=VALUE with ROLE one of {', '.join(ROLES)}")
        out[role] = value
    return out


def _cmd_init(args: argparse.Namespace) -> int:
    settings = RepoSettings()
    for role, value in _parse_role_value(args.expires, "expires").items():
        seconds = parse_duration_s(value)
        if seconds <= 0:
            raise UsageError(f"--expires {role}={value}: the validity must be longer than 0")
        settings.expiry_s[role] = seconds  # type: ignore[index]
    for role, value in _parse_role_value(args.threshold, "threshold").items():
        if not value.isdigit() or int(value) < 1:
            raise UsageError(f"--threshold {role}={value}: the threshold must be a whole number >= 1")
        settings.thresholds[role] = int(value)  # type: ignore[index]
    repo = TufRepo.init(Path(args.repo_dir), settings)
    if args.json:
        print_json(repo.status())
    else:
        print(f"repository ready in {args.repo_dir}: serve {repo.www_dir}, provision devices with "
              f"{repo.metadata_dir / 'root.json'}, keep {repo.keys_dir} private", file=sys.stderr)
    return ExitCode.OK


def _cmd_refresh(args: argparse.Namespace) -> int:
    repo = TufRepo.load(Path(args.repo))
    repo.refresh()
    if args.json:
        print_json(repo.status())
    return ExitCode.OK


def _cmd_rotate(args: argparse.Namespace) -> int:
    repo = TufRepo.load(Path(args.repo))
    new = repo.rotate_key(args.role)
    if args.json:
        print_json(repo.status())
    else:
        print(f"rotated {args.role}: new key(s) {', '.join(new)}", file=sys.stderr)
    return ExitCode.OK


def _cmd_status(args: argparse.Namespace) -> int:
    print_json(TufRepo.load(Path(args.repo)).status())
    return ExitCode.OK


def _cmd_publish(args: argparse.Namespace) -> int:
    result = TufRepo.load(Path(args.repo)).publish(Path(args.artifact_dir))
    if args.json:
        print_json(result)
    else:
        print(f"published {result.model} v{result.version}: {len(result.targets)} targets, "
              f"{result.bytes_added} new bytes", file=sys.stderr)
    return ExitCode.OK


def _cmd_channel_set(args: argparse.Namespace) -> int:
    repo = TufRepo.load(Path(args.repo))
    channel = ChannelFile(channel=args.channel, model=args.model, version=args.version,
                          rollout=Rollout(percent=args.percent,
                                          salt=args.salt if args.salt is not None else args.channel),
                          allow_downgrade=args.allow_downgrade)
    repo.set_channel(channel)
    if args.json:
        print_json(channel)
    else:
        print(f"channel {channel.channel} -> {channel.model} v{channel.version} "
              f"({channel.rollout.percent}% of devices)", file=sys.stderr)
    return ExitCode.OK


def _cmd_serve(args: argparse.Namespace) -> int:
    from builder.release.server import make_server

    directory = Path(args.directory)
    if (directory / "www").is_dir() and not (directory / "metadata").is_dir():
        directory = directory / "www"  # a repository dir was given: serve only its public tree
    server = make_server(directory, args.host, args.port)
    host, port = server.server_address[:2]
    if isinstance(host, bytes):
        host = host.decode()
    print(f"serving {directory} on http://{host}:{port}/", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return ExitCode.OK


def _add_repo_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", required=True, metavar="DIR", help="repository dir made by `repo init`")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    defaults = ", ".join(f"{r}={DEFAULT_EXPIRY_S[r] // 86400}d" for r in ROLES)
    repo = subparsers.add_parser(
        "repo", help="create and maintain the signed TUF repository", formatter_class=HelpFormatter,
        description="Create and maintain the signed TUF repository.",
        epilog="examples:\n  edge-builder repo init ./repo\n  edge-builder repo refresh --repo ./repo   # from cron, "
               "at least daily\n  edge-builder repo rotate-key timestamp --repo ./repo")
    sub = repo.add_subparsers(dest="repo_command", metavar="ACTION", required=True)

    p = sub.add_parser("init", help="create keys and the first signed metadata", formatter_class=HelpFormatter,
                       epilog="example:\n  edge-builder repo init ./repo --expires timestamp=12h --threshold root=2")
    p.add_argument("repo_dir", metavar="DIR")
    p.add_argument("--expires", action="append", default=[], metavar="ROLE=DURATION",
                   help=f"validity of a role's metadata, e.g. timestamp=12h (defaults: {defaults})")
    p.add_argument("--threshold", action="append", default=[], metavar="ROLE=N",
                   help="keys a role needs to sign (default 1 for every role); N keys are generated")
    p.add_argument("--json", action="store_true", help="print the repository status as one JSON object")
    p.set_defaults(handler=_cmd_init)

    p = sub.add_parser("refresh", help="re-sign timestamp (and snapshot/targets when half expired)",
                       formatter_class=HelpFormatter, epilog="example:\n  edge-builder repo refresh --repo ./repo")
    _add_repo_arg(p)
    p.add_argument("--json", action="store_true", help="print the repository status as one JSON object")
    p.set_defaults(handler=_cmd_refresh)

    p = sub.add_parser("rotate-key", help="replace the keys of a role (root included)", formatter_class=HelpFormatter,
                       epilog="example:\n  edge-builder repo rotate-key root --repo ./repo")
    p.add_argument("role", choices=ROLES)
    _add_repo_arg(p)
    p.add_argument("--json", action="store_true", help="print the repository status as one JSON object")
    p.set_defaults(handler=_cmd_rotate)

    p = sub.add_parser("status", help="versions, expiries and key ids as JSON", formatter_class=HelpFormatter,
                       epilog="example:\n  edge-builder repo status --repo ./repo")
    _add_repo_arg(p)
    p.set_defaults(handler=_cmd_status)

    p = subparsers.add_parser(
        "publish", help="sign an artifact (manifest + files) into the repository", formatter_class=HelpFormatter,
        description="Add models/<name>/<version>/manifest.json and every artifact file as TUF targets; "
                    "the version must be higher than the last published one.",
        epilog="example:\n  edge-builder publish ./out/smollm2-v3 --repo ./repo")
    p.add_argument("artifact_dir", metavar="ARTIFACT_DIR")
    _add_repo_arg(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(handler=_cmd_publish)

    channel = subparsers.add_parser("channel", help="point a release channel at a model version",
                                    formatter_class=HelpFormatter)
    csub = channel.add_subparsers(dest="channel_command", metavar="ACTION", required=True)
    p = csub.add_parser(
        "set", help="sign channels/<CHANNEL>.json", formatter_class=HelpFormatter,
        epilog="examples:\n  edge-builder channel set stable smollm2 3 --repo ./repo --percent 10\n"
               "  edge-builder channel set stable smollm2 2 --repo ./repo --allow-downgrade   # signed rollback")
    p.add_argument("channel")
    p.add_argument("model")
    p.add_argument("version", type=int)
    _add_repo_arg(p)
    p.add_argument("--percent", type=int, default=100, help="share of devices (0-100) whose cohort installs it")
    p.add_argument("--salt", default=None, help="cohort salt (default: the channel name); change it to reshuffle")
    p.add_argument("--allow-downgrade", action="store_true",
                   help="let devices on a higher version install this lower one (a signed rollback)")
    p.add_argument("--json", action="store_true", help="print the signed channel file as one JSON object")
    p.set_defaults(handler=_cmd_channel_set)

    p = subparsers.add_parser(
        "serve", help="serve a repository's www/ over HTTP with Range (demos, tests)", formatter_class=HelpFormatter,
        epilog="example:\n  edge-builder serve ./repo/www --port 8000\nproduction: any static server, see "
               "deploy/nginx.conf")
    p.add_argument("directory", metavar="DIR", help="the www/ dir (or the repository dir)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes it to the network")
    p.set_defaults(handler=_cmd_serve)
