"""What a Checker concludes from a TUF-verified channel file: the pure update decision.

Apart from the updater's driver (`agent.updater`) so that the update job
(`agent.update_job`, `agent.tuf_source`), which makes the decision next to
TUF, imports the decision and not the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict

from agent.channel import ChannelFile, is_in_cohort
from agent.errors import VerificationError
from agent.hardware import HardwareReport, check_manifest, format_shortfalls
from agent.manifest import MANIFEST_FILENAME, Manifest
from agent.statemachine import ModelRef
from agent.store import Store


class CheckResult(BaseModel):
    """What a Checker found. `update_available` needs `target`; `incompatible` needs `reason`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    outcome: Literal["up_to_date", "incompatible", "update_available"]
    target: ModelRef | None = None
    reason: str | None = None
    manifest: Manifest | None = None  # the target's TUF-verified manifest: plans disk room before the download


def decide_check(channel: ChannelFile, active: ModelRef | None, device_id: str,
                 load_manifest: Callable[[ModelRef], Manifest], report: HardwareReport,
                 disk_cap_bytes: int | None = None, store: Store | None = None) -> CheckResult:
    """What a Checker concludes from a TUF-verified channel file (pure but for `load_manifest`,
    which the caller backs with a TUF-verified fetch; it is only called when an update is due).

    Order: the rollout cohort, then "is it what runs already", then the downgrade rule
    (design section 2: a lower version only with the signed `allow_downgrade`), then the
    hardware and disk-cap check of the manifest, so an incompatible model is never downloaded.
    With `store` and a cap, the new files must also fit next to what GC may not remove
    (`current`, `previous`, staging), so that disk use stays within the cap.
    """
    offered = ModelRef(name=channel.model, version=channel.version)
    if not is_in_cohort(channel.rollout, device_id):
        return CheckResult(outcome="up_to_date", reason=f"{offered} is rolling out to {channel.rollout.percent}%"
                                                        " of the fleet and this device is not in that cohort yet")
    if offered == active:
        return CheckResult(outcome="up_to_date")
    if (active is not None and active.name == offered.name and offered.version < active.version
            and not channel.allow_downgrade):
        return CheckResult(outcome="up_to_date", reason=f"channel {channel.channel} names {offered}, older than the"
                                                        f" active v{active.version}, without allow_downgrade")
    manifest = load_manifest(offered)
    if (manifest.name, manifest.version) != (offered.name, offered.version):
        raise VerificationError(f"channel {channel.channel} names {offered} but its manifest says {manifest.name}"
                                f" v{manifest.version}: republish the channel")
    room: dict[str, int] = {}
    if store is not None and disk_cap_bytes is not None:
        room = {"protected_bytes": store.protected_usage_bytes(), "missing_bytes": store.missing_bytes(manifest)}
    shortfalls = check_manifest(manifest, report, disk_cap_bytes, **room)
    if shortfalls:
        return CheckResult(outcome="incompatible", target=offered,
                           reason=format_shortfalls(manifest.name, manifest.version, shortfalls))
    return CheckResult(outcome="update_available", target=offered, manifest=manifest)


def local_manifest(store: Store, target: ModelRef) -> Manifest | None:
    """The manifest of `target` without the network: the one staged by the check (also after
    a restart mid-update), else the installed one; None when neither is readable."""
    candidates = sorted(store.staging_dir.glob(f"{target.name}-{target.version}.*json"))
    candidates.append(store.model_dir(target.name, target.version) / MANIFEST_FILENAME)
    for path in candidates:
        try:
            return Manifest.model_validate_json(path.read_bytes())
        except (OSError, ValueError):
            continue
    return None
