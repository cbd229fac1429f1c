"""The one update decision: what a device does with a TUF-verified channel file.

Pure: values in, a value out. The checker (`agent.update.source.check_channel`, run in the
update job) reads the signed channel file, calls `decide_offer`, fetches the signed manifest
only when the offer is wanted, measures the store, and calls `decide_fit`.

Order (design section 2): "is it what runs already", then the rollout cohort, then the
downgrade rule (a lower version only with the signed `allow_downgrade`), then the hardware
requirements and the disk cap, so an incompatible model is never downloaded.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.update.compat import HardwareReport, check_manifest, format_shortfalls
from agent.update.statemachine import ModelRef
from agent.wire.base import FrozenModel
from agent.wire.channel import ChannelFile, is_in_cohort
from agent.wire.errors import VerificationError
from agent.wire.manifest import Manifest

Declined = Literal["current", "not_in_cohort", "downgrade"]


class CheckResult(FrozenModel):
    """What a Checker found. `update_available` needs `target`; `incompatible` needs `reason`;
    an `up_to_date` that declined the channel's offer says why in `declined`."""

    outcome: Literal["up_to_date", "incompatible", "update_available"]
    target: ModelRef | None = None
    reason: str | None = None
    declined: Declined | None = None
    manifest: Manifest | None = None  # the target's TUF-verified manifest: plans disk room before the download


class StoreRoom(FrozenModel):
    """What the store holds that GC may not remove, and what the update would add to it."""

    protected_bytes: int = Field(ge=0)
    missing_bytes: int = Field(ge=0)


def offered(channel: ChannelFile) -> ModelRef:
    return ModelRef(name=channel.model, version=channel.version)


def decide_offer(channel: ChannelFile, active: ModelRef | None, device_id: str) -> CheckResult | None:
    """Whether this device declines the channel's offer, before any manifest is read.

    Returns the `up_to_date` result that declines it, or None when the offered version is wanted.
    """
    offer = offered(channel)
    if offer == active:
        return CheckResult(outcome="up_to_date", declined="current")
    if not is_in_cohort(channel.rollout, device_id):
        return CheckResult(outcome="up_to_date", declined="not_in_cohort",
                           reason=f"{offer} is rolling out to {channel.rollout.percent}% of the fleet and this"
                                  " device is not in that cohort yet")
    if (active is not None and active.name == offer.name and offer.version < active.version
            and not channel.allow_downgrade):
        return CheckResult(outcome="up_to_date", declined="downgrade",
                           reason=f"channel {channel.channel} names {offer}, lower than the active"
                                  f" v{active.version}, without allow_downgrade")
    return None


def decide_fit(channel: ChannelFile, manifest: Manifest, report: HardwareReport, disk_cap_bytes: int | None = None,
               room: StoreRoom | None = None, prefix_cache_bytes: int = 0) -> CheckResult:
    """Whether the wanted version (its TUF-verified manifest) fits this device and its store.

    With `room`, the new files must also fit under the cap next to what GC may not remove
    (`current`, `previous`, staging), so that disk use stays within the cap.

    Raises:
        VerificationError: the manifest is not the one the channel names.
    """
    offer = offered(channel)
    if (manifest.name, manifest.version) != (offer.name, offer.version):
        raise VerificationError(f"channel {channel.channel} names {offer} but its manifest says {manifest.name}"
                                f" v{manifest.version}: republish the channel")
    extra = room.model_dump() if room is not None and disk_cap_bytes is not None else {}
    shortfalls = check_manifest(manifest, report, disk_cap_bytes, **extra, prefix_cache_bytes=prefix_cache_bytes)
    if shortfalls:
        return CheckResult(outcome="incompatible", target=offer,
                           reason=format_shortfalls(manifest.name, manifest.version, shortfalls))
    return CheckResult(outcome="update_available", target=offer, manifest=manifest)
