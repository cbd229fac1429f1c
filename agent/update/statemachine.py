"""The update state machine of design section 5, as a pure function.

```
IDLE -> CHECKING -> (UP_TO_DATE | INCOMPATIBLE | DOWNLOADING) -> VERIFYING ->
INSTALLING -> ACTIVATING (load + canary) -> ACTIVE
any failure -> ROLLING_BACK -> FAILED(reason), the previous model serving
```

`step(state, event) -> (state, actions)` takes values and returns values: no
clock, file or socket. The driver (`agent.update.updater`) journals the returned state
*before* it runs the actions, so after `kill -9` the journal names the step
that was about to run, and the `RESTARTED` event says what a restart does from
each state (each `Phase` member's docstring says it in words). Every
(phase, event kind) pair is either handled here or raises `InvalidTransition`.

Two guards live here because they must hold whatever the I/O does:

- a store count per update, like Mender's `MaximumStateDataStoreCount`: each
  journaled transition of one update counts; past `MAX_STORE_COUNT` (a restart
  loop, say a model whose load kills the agent) the update is abandoned
  through ROLLING_BACK, and a ROLLING_BACK that itself loops ends in FAILED;
- a refused-versions set: a version that failed activation (load, canary or
  probation) is refused, without a download, until the channel offers a newer
  version of that model.
"""

from __future__ import annotations

import enum

from pydantic import Field

from agent.wire.base import FrozenModel
from agent.wire.errors import InvalidTransition
from agent.wire.manifest import ModelName

# Mender uses 30. A normal update stores 7 transitions; the rest is headroom for restarts.
MAX_STORE_COUNT = 30
# Refused versions remembered at most (across all model names).
MAX_REFUSED = 16


class Phase(str, enum.Enum):
    """The states of design section 5. Each member's `__doc__` says what a restart does from there."""

    def __new__(cls, value: str, doc: str) -> Phase:
        member = str.__new__(cls, value)
        member._value_ = value
        member.__doc__ = doc
        return member

    IDLE = (
        "IDLE",
        "No update has run yet. Restart: serve `current` if there is one, wait for a check.",
    )

    CHECKING = (
        "CHECKING",
        "Reading the signed channel file and checking the hardware. Restart: check again (read-only, "
        "idempotent).",
    )

    UP_TO_DATE = (
        "UP_TO_DATE",
        "The channel's version is the active one. Restart: serve `current`, wait for the next check.",
    )

    INCOMPATIBLE = (
        "INCOMPATIBLE",
        "This device cannot run the channel's model (reason says why); nothing was downloaded. Restart: serve "
        "`current`, wait for the next check.",
    )

    DOWNLOADING = (
        "DOWNLOADING",
        "Fetching the target's files into `staging/`. Restart: download again; partial files resume.",
    )

    VERIFYING = (
        "VERIFYING",
        "Checking staged files against their TUF lengths and hashes and adopting them as blobs. Restart: "
        "verify again (adopted blobs are already verified; the rest is re-checked).",
    )

    INSTALLING = (
        "INSTALLING",
        "Assembling `models/<name>/<version>/` from blobs. Restart: leftover `.tmp-*` dirs are removed by "
        "store recovery, then the assembly runs again (it is a no-op if the dir is complete).",
    )

    ACTIVATING = (
        "ACTIVATING",
        "Loading the new model and running its canary; `current` has not moved. Restart: activate again "
        "(bounded by the store count), the old `current` serving meanwhile.",
    )

    ACTIVE = (
        "ACTIVE",
        "The target passed its canary and `current` points at it (`previous` at the old model). Restart: "
        "switch `current` to the target again and clean up its staging if the crash came before (both "
        "idempotent), serve it.",
    )

    ROLLING_BACK = (
        "ROLLING_BACK",
        "Abandoning the update: `current` goes back to `previous` if it had moved, staging is discarded. "
        "Restart: roll back again (idempotent); a rollback that loops past the store count ends in FAILED.",
    )

    FAILED = (
        "FAILED",
        "The update failed (reason says why); the previous model serves. Restart: serve `current`, wait for "
        "the next check.",
    )


# Phases in which an update is under way; everything else is a resting phase.
IN_PROGRESS: frozenset[Phase] = frozenset({
    Phase.CHECKING, Phase.DOWNLOADING, Phase.VERIFYING, Phase.INSTALLING, Phase.ACTIVATING, Phase.ROLLING_BACK,
})
RESTING: frozenset[Phase] = frozenset(set(Phase) - IN_PROGRESS)


class ModelRef(FrozenModel):
    """One version of one model, as the channel file names it."""

    name: ModelName
    version: int = Field(gt=0)

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"


class UpdateState(FrozenModel):
    """Everything `step()` needs; also the body of `state.json` (see `agent.update.journal`)."""

    phase: Phase = Phase.IDLE
    target: ModelRef | None = Field(default=None, description="the version being installed (in-progress phases)")
    active: ModelRef | None = Field(default=None, description="the version `current` serves, as last known")
    previous_active: ModelRef | None = Field(default=None, description="what `previous` serves, as last known")
    reason: str | None = Field(default=None, description="why INCOMPATIBLE or FAILED (or why ROLLING_BACK)")
    store_count: int = Field(default=0, ge=0, description="journaled transitions of the current/last update")
    refused: tuple[ModelRef, ...] = Field(default=(), description="versions that failed activation")

    def is_refused(self, ref: ModelRef) -> bool:
        return ref in self.refused


class EventKind(str, enum.Enum):
    CHECK_REQUESTED = "CHECK_REQUESTED"      # poll timer, MQTT doorbell, `check_now` command
    NO_UPDATE = "NO_UPDATE"                  # checker: the channel's version is the active one
    INCOMPATIBLE = "INCOMPATIBLE"            # checker: this device cannot run it (reason)
    UPDATE_AVAILABLE = "UPDATE_AVAILABLE"    # checker: install `target`
    DOWNLOADED = "DOWNLOADED"
    VERIFIED = "VERIFIED"
    INSTALLED = "INSTALLED"
    ACTIVATED = "ACTIVATED"                  # loaded and the canary reproduced exactly
    STEP_FAILED = "STEP_FAILED"              # the running step's action failed (reason)
    PROBATION_FAILED = "PROBATION_FAILED"    # the new model crashed within its probation window (reason)
    ROLLED_BACK = "ROLLED_BACK"
    RESTARTED = "RESTARTED"                  # the agent started and read this state from the journal


class Event(FrozenModel):
    kind: EventKind
    target: ModelRef | None = None
    reason: str | None = None


class Action(str, enum.Enum):
    """What the driver runs after journaling the new state. Each is idempotent (restarts repeat them)."""

    CHECK = "CHECK"                      # -> NO_UPDATE | INCOMPATIBLE | UPDATE_AVAILABLE | STEP_FAILED
    DOWNLOAD = "DOWNLOAD"                # -> DOWNLOADED | STEP_FAILED
    VERIFY = "VERIFY"                    # -> VERIFIED | STEP_FAILED
    INSTALL = "INSTALL"                  # -> INSTALLED | STEP_FAILED
    ACTIVATE = "ACTIVATE"                # -> ACTIVATED | STEP_FAILED
    SWITCH_CURRENT = "SWITCH_CURRENT"    # current <- target (no-op if it already is); no event
    ROLLBACK = "ROLLBACK"                # current <- previous if current is the target; discard staging -> ROLLED_BACK
    COLLECT_GARBAGE = "COLLECT_GARBAGE"  # discard staging of the finished update, GC to the disk cap; no event
    SERVE_CURRENT = "SERVE_CURRENT"      # make the serving layer serve whatever `current` is; no event


Result = tuple[UpdateState, list[Action]]


def initial_state() -> UpdateState:
    return UpdateState()


def _invalid(state: UpdateState, event: Event) -> InvalidTransition:
    return InvalidTransition(
        f"update state {state.phase.value} does not handle event {event.kind.value}"
        f" (target {state.target}, event target {event.target}): this is a bug in the caller of step()"
    )


def _need_target(event: Event, state: UpdateState) -> ModelRef:
    if event.target is None:
        raise InvalidTransition(f"event {event.kind.value} in {state.phase.value} needs a target model")
    return event.target


def _advance(state: UpdateState, phase: Phase, actions: list[Action], **changes: object) -> Result:
    """Move to an in-progress or resting phase, counting the store as Mender does."""
    count = state.store_count + 1
    if phase in IN_PROGRESS and count > MAX_STORE_COUNT:
        return _past_bound(state)
    return state.model_copy(update={"phase": phase, "store_count": count, **changes}), actions


def _past_bound(state: UpdateState) -> Result:
    why = (f"update of {state.target} stored its state {state.store_count} times (bound {MAX_STORE_COUNT}),"
           f" last in {state.phase.value}: a restart loop; abandoned, the previous model keeps serving")
    if state.phase is Phase.ROLLING_BACK:
        # The rollback itself loops: stop retrying it. Every link rename is atomic, so `current`
        # is still a complete model dir (the old or the new one).
        reason = f"{state.reason}; rollback did not finish: {why}" if state.reason else why
        return state.model_copy(update={"phase": Phase.FAILED, "reason": reason,
                                        "store_count": state.store_count + 1}), [Action.SERVE_CURRENT]
    return state.model_copy(update={"phase": Phase.ROLLING_BACK, "reason": why,
                                    "store_count": state.store_count + 1}), [Action.ROLLBACK]


def _refuse(state: UpdateState, ref: ModelRef | None) -> tuple[ModelRef, ...]:
    if ref is None or ref in state.refused:
        return state.refused
    # Bounded so that a journal never grows without end; the oldest refusal lapses first.
    return (*state.refused, ref)[-MAX_REFUSED:]


def _start_check(state: UpdateState) -> Result:
    # A new update starts its own store count (Mender resets it per deployment).
    return state.model_copy(update={"phase": Phase.CHECKING, "store_count": 1, "reason": None,
                                    "target": None}), [Action.CHECK]


def _on_update_available(state: UpdateState, event: Event) -> Result:
    target = _need_target(event, state)
    if target == state.active:
        return _advance(state, Phase.UP_TO_DATE, [], target=None)
    if state.is_refused(target):
        # No download: this exact version already failed activation on this device.
        return _advance(state, Phase.FAILED, [Action.SERVE_CURRENT], target=None, reason=(
            f"{target} failed activation on this device earlier and is refused until a newer"
            f" version of {target.name} is published"))
    # A newer (or operator-chosen) version is published: older refusals of this model lapse.
    refused = tuple(r for r in state.refused if r.name != target.name or r.version > target.version)
    return _advance(state, Phase.DOWNLOADING, [Action.DOWNLOAD], target=target, refused=refused, reason=None)


def _fail(state: UpdateState, event: Event, *, refuse: bool) -> Result:
    what = f"{state.phase.value} {state.target}" if state.target else state.phase.value
    reason = f"{what} failed: {event.reason or 'no reason given'}"
    refused = _refuse(state, state.target) if refuse else state.refused
    return _advance(state, Phase.ROLLING_BACK, [Action.ROLLBACK], reason=reason, refused=refused)


def step(state: UpdateState, event: Event) -> Result:
    """The next state and the actions to run after it is journaled.

    Returns the same `state` object and no actions when an event is deliberately
    ignored (a check requested while an update is under way): the driver then
    journals nothing.

    Raises:
        InvalidTransition: the state does not handle this event.
    """
    phase, kind = state.phase, event.kind
    K = EventKind

    if kind is K.RESTARTED:
        return _on_restart(state)

    if phase in RESTING:
        if kind is K.CHECK_REQUESTED:
            return _start_check(state)
        if phase is Phase.ACTIVE and kind is K.PROBATION_FAILED:
            # The update's own store count goes on: probation is the end of that update.
            return _fail(state.model_copy(update={"target": state.target or state.active}), event, refuse=True)
        raise _invalid(state, event)

    # In-progress phases from here on.
    if kind is K.CHECK_REQUESTED:
        return state, []  # coalesced: the running update already reads the newest channel file
    if kind is K.STEP_FAILED:
        if phase is Phase.ROLLING_BACK:
            return _advance(state, Phase.FAILED, [Action.SERVE_CURRENT],
                            reason=f"{state.reason}; rollback failed too: {event.reason}")
        return _fail(state, event, refuse=phase is Phase.ACTIVATING)

    if phase is Phase.CHECKING:
        if kind is K.NO_UPDATE:
            return _advance(state, Phase.UP_TO_DATE, [], target=None, reason=event.reason)
        if kind is K.INCOMPATIBLE:
            return _advance(state, Phase.INCOMPATIBLE, [], target=None,
                            reason=event.reason or "incompatible (no reason given)")
        if kind is K.UPDATE_AVAILABLE:
            return _on_update_available(state, event)
    elif phase is Phase.DOWNLOADING and kind is K.DOWNLOADED:
        return _advance(state, Phase.VERIFYING, [Action.VERIFY])
    elif phase is Phase.VERIFYING and kind is K.VERIFIED:
        return _advance(state, Phase.INSTALLING, [Action.INSTALL])
    elif phase is Phase.INSTALLING and kind is K.INSTALLED:
        return _advance(state, Phase.ACTIVATING, [Action.ACTIVATE])
    elif phase is Phase.ACTIVATING and kind is K.ACTIVATED:
        return _advance(state, Phase.ACTIVE, [Action.SWITCH_CURRENT, Action.COLLECT_GARBAGE, Action.SERVE_CURRENT],
                        active=state.target, previous_active=state.active)
    elif phase is Phase.ROLLING_BACK and kind is K.ROLLED_BACK:
        if state.active is not None and state.active == state.target:
            # Rolled back from probation: `current` is the old model again.
            return _advance(state, Phase.FAILED, [Action.SERVE_CURRENT],
                            active=state.previous_active, previous_active=None)
        return _advance(state, Phase.FAILED, [Action.SERVE_CURRENT])
    raise _invalid(state, event)


_RESTART_ACTIONS: dict[Phase, list[Action]] = {
    Phase.CHECKING: [Action.CHECK],
    Phase.DOWNLOADING: [Action.DOWNLOAD],
    Phase.VERIFYING: [Action.VERIFY],
    Phase.INSTALLING: [Action.INSTALL],
    Phase.ACTIVATING: [Action.ACTIVATE],
    Phase.ROLLING_BACK: [Action.ROLLBACK],
}


def _on_restart(state: UpdateState) -> Result:
    """What a restart does from each phase (the `Phase` docstrings say the same in words)."""
    if state.phase in IN_PROGRESS:
        # Re-journaling the same phase counts: a crash loop reaches the bound.
        if state.store_count + 1 > MAX_STORE_COUNT:
            return _past_bound(state)
        return state.model_copy(update={"store_count": state.store_count + 1}), list(_RESTART_ACTIONS[state.phase])
    if state.phase is Phase.ACTIVE:
        # The crash may have come after journaling ACTIVE and before the switch or the cleanup;
        # both are idempotent.
        return state, [Action.SWITCH_CURRENT, Action.COLLECT_GARBAGE, Action.SERVE_CURRENT]
    return state, [Action.SERVE_CURRENT]

