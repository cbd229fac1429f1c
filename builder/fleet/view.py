"""What the operator sees of a fleet: pure folding of status/telemetry messages
into rows, filtering and the text table. No sockets here (see builder.fleet.session)."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from agent.wire.base import StrictModel
from agent.wire.errors import PayloadError
from agent.wire.mqtt import DeviceStatus, Telemetry, parse_device_message


class FleetRow(StrictModel):
    device_id: str
    online: bool
    state: str
    channel: str | None = None
    model: str | None = None
    version: int | None = None
    agent_version: str | None = None
    last_seen: dt.datetime
    tokens_per_s: float | None = None
    last_error: str | None = None


class FleetReport(StrictModel):
    """`edge-builder fleet status --json`: one object."""

    schema_version: Literal[1] = 1
    fleet: str
    devices: list[FleetRow]
    online: int
    total: int
    dropped_payloads: int


class FleetView:
    """Folds messages from `edgefleet/<fleet>/devices/+/{status,telemetry}` into rows."""

    def __init__(self, fleet: str) -> None:
        self.fleet = fleet
        self._status: dict[str, DeviceStatus] = {}
        self._telemetry: dict[str, Telemetry] = {}
        self.dropped_payloads = 0

    def apply(self, topic: str, payload: bytes | bytearray) -> bool:
        """Take one message; True if the view changed. Bad payloads are counted, not raised."""
        try:
            message = parse_device_message(self.fleet, ("status", "telemetry"), topic, payload)
        except PayloadError:
            self.dropped_payloads += 1
            return False
        if isinstance(message, DeviceStatus):
            self._status[message.device_id] = message
            return True
        if isinstance(message, Telemetry):
            self._telemetry[message.device_id] = message
            return message.device_id in self._status
        return False

    def rows(self, *, channel: str | None = None, state: str | None = None) -> list[FleetRow]:
        rows: list[FleetRow] = []
        for device_id in sorted(self._status):
            s = self._status[device_id]
            t = self._telemetry.get(device_id)
            if channel is not None and s.channel != channel:
                continue
            if state is not None and s.state.upper() != state.upper():
                continue
            last_seen = max(s.timestamp, t.timestamp) if t else s.timestamp
            tokens = t.tokens_per_s if t and t.tokens_per_s is not None else s.tokens_per_s
            rows.append(FleetRow(device_id=device_id, online=s.online, state=s.state, channel=s.channel,
                                 model=s.model, version=s.version, agent_version=s.agent_version,
                                 last_seen=last_seen, tokens_per_s=tokens, last_error=s.last_error))
        return rows

    def report(self, **filters: str | None) -> FleetReport:
        rows = self.rows(**filters)
        return FleetReport(fleet=self.fleet, devices=rows, online=sum(r.online for r in rows), total=len(rows),
                           dropped_payloads=self.dropped_payloads)


def _age(then: dt.datetime, now: dt.datetime) -> str:
    seconds = max(0, int((now - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    if seconds < 172800:
        return f"{seconds // 3600}h ago"
    return f"{seconds // 86400}d ago"


def render_table(report: FleetReport, now: dt.datetime) -> str:
    header = ("DEVICE", "ONLINE", "STATE", "CHANNEL", "MODEL", "VERSION", "LAST SEEN", "TOKENS/S")
    lines = [header]
    for r in report.devices:
        lines.append((r.device_id, "yes" if r.online else "NO", r.state, r.channel or "-", r.model or "-",
                      str(r.version) if r.version is not None else "-", _age(r.last_seen, now),
                      f"{r.tokens_per_s:.1f}" if r.tokens_per_s is not None else "-"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in lines)
    summary = f"{report.total} device(s) in fleet {report.fleet}, {report.online} online"
    if report.dropped_payloads:
        summary += f", {report.dropped_payloads} invalid payload(s) ignored"
    return text + "\n" + summary
