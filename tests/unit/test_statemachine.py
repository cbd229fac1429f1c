"""`step()` for every state x event pair, and the store-count bound and refused versions."""

from __future__ import annotations

import itertools

import pytest

from agent.update.statemachine import (
    IN_PROGRESS,
    MAX_REFUSED,
    MAX_STORE_COUNT,
    Action,
    Event,
    EventKind,
    ModelRef,
    Phase,
    UpdateState,
    step,
)
from agent.wire.errors import InvalidTransition

OLD = ModelRef(name="smollm2", version=1)
NEW = ModelRef(name="smollm2", version=2)
P, K, A = Phase, EventKind, Action

# One representative state per phase: what the driver really journals there.
STATES: dict[Phase, UpdateState] = {
    P.IDLE: UpdateState(),
    P.CHECKING: UpdateState(phase=P.CHECKING, active=OLD, store_count=1),
    P.UP_TO_DATE: UpdateState(phase=P.UP_TO_DATE, active=OLD, store_count=2),
    P.INCOMPATIBLE: UpdateState(phase=P.INCOMPATIBLE, active=OLD, reason="needs more RAM", store_count=2),
    P.DOWNLOADING: UpdateState(phase=P.DOWNLOADING, target=NEW, active=OLD, store_count=2),
    P.VERIFYING: UpdateState(phase=P.VERIFYING, target=NEW, active=OLD, store_count=3),
    P.INSTALLING: UpdateState(phase=P.INSTALLING, target=NEW, active=OLD, store_count=4),
    P.ACTIVATING: UpdateState(phase=P.ACTIVATING, target=NEW, active=OLD, store_count=5),
    P.ACTIVE: UpdateState(phase=P.ACTIVE, target=NEW, active=NEW, previous_active=OLD, store_count=6),
    P.ROLLING_BACK: UpdateState(phase=P.ROLLING_BACK, target=NEW, active=OLD, reason="canary", store_count=6),
    P.FAILED: UpdateState(phase=P.FAILED, active=OLD, reason="canary", store_count=7),
}
EVENTS: dict[EventKind, Event] = {
    K.CHECK_REQUESTED: Event(kind=K.CHECK_REQUESTED),
    K.NO_UPDATE: Event(kind=K.NO_UPDATE),
    K.INCOMPATIBLE: Event(kind=K.INCOMPATIBLE, reason="model smollm2 v2 needs 99 GiB RAM"),
    K.UPDATE_AVAILABLE: Event(kind=K.UPDATE_AVAILABLE, target=NEW),
    K.DOWNLOADED: Event(kind=K.DOWNLOADED, target=NEW),
    K.VERIFIED: Event(kind=K.VERIFIED, target=NEW),
    K.INSTALLED: Event(kind=K.INSTALLED, target=NEW),
    K.ACTIVATED: Event(kind=K.ACTIVATED, target=NEW),
    K.STEP_FAILED: Event(kind=K.STEP_FAILED, target=NEW, reason="boom"),
    K.PROBATION_FAILED: Event(kind=K.PROBATION_FAILED, target=NEW, reason="worker died"),
    K.ROLLED_BACK: Event(kind=K.ROLLED_BACK, target=NEW),
    K.RESTARTED: Event(kind=K.RESTARTED),
}

IGNORED = "ignored"  # same state object back, no actions, nothing journaled
RESTING_COMMON = {K.CHECK_REQUESTED: (P.CHECKING, [A.CHECK]), K.RESTARTED: (None, [A.SERVE_CURRENT])}
# None as the next phase: "stays in the same phase". Every pair not listed raises InvalidTransition.
HANDLED: dict[Phase, dict[EventKind, object]] = {
    P.IDLE: dict(RESTING_COMMON),
    P.UP_TO_DATE: dict(RESTING_COMMON),
    P.INCOMPATIBLE: dict(RESTING_COMMON),
    P.FAILED: dict(RESTING_COMMON),
    P.ACTIVE: {K.CHECK_REQUESTED: (P.CHECKING, [A.CHECK]),
               K.PROBATION_FAILED: (P.ROLLING_BACK, [A.ROLLBACK]),
               K.RESTARTED: (None, [A.SWITCH_CURRENT, A.COLLECT_GARBAGE, A.SERVE_CURRENT])},
    P.CHECKING: {K.CHECK_REQUESTED: IGNORED, K.NO_UPDATE: (P.UP_TO_DATE, []),
                 K.INCOMPATIBLE: (P.INCOMPATIBLE, []), K.UPDATE_AVAILABLE: (P.DOWNLOADING, [A.DOWNLOAD]),
                 K.STEP_FAILED: (P.ROLLING_BACK, [A.ROLLBACK]), K.RESTARTED: (None, [A.CHECK])},
    P.DOWNLOADING: {K.CHECK_REQUESTED: IGNORED, K.DOWNLOADED: (P.VERIFYING, [A.VERIFY]),
                    K.STEP_FAILED: (P.ROLLING_BACK, [A.ROLLBACK]), K.RESTARTED: (None, [A.DOWNLOAD])},
    P.VERIFYING: {K.CHECK_REQUESTED: IGNORED, K.VERIFIED: (P.INSTALLING, [A.INSTALL]),
                  K.STEP_FAILED: (P.ROLLING_BACK, [A.ROLLBACK]), K.RESTARTED: (None, [A.VERIFY])},
    P.INSTALLING: {K.CHECK_REQUESTED: IGNORED, K.INSTALLED: (P.ACTIVATING, [A.ACTIVATE]),
                   K.STEP_FAILED: (P.ROLLING_BACK, [A.ROLLBACK]), K.RESTARTED: (None, [A.INSTALL])},
    P.ACTIVATING: {K.CHECK_REQUESTED: IGNORED,
                   K.ACTIVATED: (P.ACTIVE, [A.SWITCH_CURRENT, A.COLLECT_GARBAGE, A.SERVE_CURRENT]),
                   K.STEP_FAILED: (P.ROLLING_BACK, [A.ROLLBACK]), K.RESTARTED: (None, [A.ACTIVATE])},
    P.ROLLING_BACK: {K.CHECK_REQUESTED: IGNORED, K.ROLLED_BACK: (P.FAILED, [A.SERVE_CURRENT]),
                     K.STEP_FAILED: (P.FAILED, [A.SERVE_CURRENT]), K.RESTARTED: (None, [A.ROLLBACK])},
}

ALL_PAIRS = list(itertools.product(Phase, EventKind))


def test_table_names_every_state_and_event() -> None:
    assert set(STATES) == set(Phase) and set(EVENTS) == set(EventKind) and set(HANDLED) == set(Phase)
    assert len(ALL_PAIRS) == 11 * 12


@pytest.mark.parametrize(("phase", "kind"), ALL_PAIRS, ids=[f"{p.value}-{k.value}" for p, k in ALL_PAIRS])
def test_every_state_event_pair(phase: Phase, kind: EventKind) -> None:
    state, event = STATES[phase], EVENTS[kind]
    expected = HANDLED[phase].get(kind)
    if expected is None:
        with pytest.raises(InvalidTransition, match=f"{phase.value} does not handle event {kind.value}"):
            step(state, event)
        return
    new, actions = step(state, event)
    if expected == IGNORED:
        assert new is state and actions == []
        return
    next_phase, next_actions = expected  # type: ignore[misc]
    assert new.phase is (next_phase or phase)
    assert actions == next_actions
    # Every transition into an in-progress phase counts against the update's bound.
    if new.phase in IN_PROGRESS:
        assert new.store_count == (1 if kind is K.CHECK_REQUESTED else state.store_count + 1)


def test_every_phase_doc_says_what_a_restart_does() -> None:
    for phase in Phase:
        assert phase.__doc__ and "Restart:" in phase.__doc__, phase


def test_happy_path_journals_target_and_moves_active_only_on_activation() -> None:
    s = UpdateState(phase=P.UP_TO_DATE, active=OLD, store_count=9)
    s, _ = step(s, EVENTS[K.CHECK_REQUESTED])
    assert s.store_count == 1 and s.target is None  # a new update starts its own count
    for kind in (K.UPDATE_AVAILABLE, K.DOWNLOADED, K.VERIFIED, K.INSTALLED):
        s, _ = step(s, EVENTS[kind])
        assert s.target == NEW and s.active == OLD
    s, actions = step(s, EVENTS[K.ACTIVATED])
    assert (s.phase, s.active, s.previous_active, s.store_count) == (P.ACTIVE, NEW, OLD, 6)
    assert actions[0] is A.SWITCH_CURRENT


def test_offer_of_the_active_version_is_up_to_date() -> None:
    s, actions = step(STATES[P.CHECKING], Event(kind=K.UPDATE_AVAILABLE, target=OLD))
    assert s.phase is P.UP_TO_DATE and actions == []


def test_update_available_without_target_is_invalid() -> None:
    with pytest.raises(InvalidTransition, match="needs a target"):
        step(STATES[P.CHECKING], Event(kind=K.UPDATE_AVAILABLE))


def test_failed_activation_refuses_the_version_until_a_newer_one() -> None:
    s, _ = step(STATES[P.ACTIVATING], Event(kind=K.STEP_FAILED, reason="canary gave [1, 9], expected [1, 2]"))
    assert s.phase is P.ROLLING_BACK and s.refused == (NEW,)
    assert "ACTIVATING smollm2 v2 failed: canary gave [1, 9]" in (s.reason or "")
    s, _ = step(s, EVENTS[K.ROLLED_BACK])
    assert s.phase is P.FAILED and s.active == OLD

    # The same version again: refused without a download.
    s, _ = step(s, EVENTS[K.CHECK_REQUESTED])
    s, actions = step(s, Event(kind=K.UPDATE_AVAILABLE, target=NEW))
    assert s.phase is P.FAILED and actions == [A.SERVE_CURRENT]
    assert "smollm2 v2 failed activation on this device earlier and is refused" in (s.reason or "")

    # A newer version lifts the refusal of the older one.
    newer = ModelRef(name="smollm2", version=3)
    s, _ = step(s, EVENTS[K.CHECK_REQUESTED])
    s, actions = step(s, Event(kind=K.UPDATE_AVAILABLE, target=newer))
    assert s.phase is P.DOWNLOADING and s.target == newer and s.refused == ()


def test_download_failure_does_not_refuse() -> None:
    s, _ = step(STATES[P.DOWNLOADING], Event(kind=K.STEP_FAILED, reason="connection reset"))
    assert s.phase is P.ROLLING_BACK and s.refused == ()


def test_probation_failure_refuses_and_restores_active() -> None:
    s, actions = step(STATES[P.ACTIVE], EVENTS[K.PROBATION_FAILED])
    assert (s.phase, actions, s.refused) == (P.ROLLING_BACK, [A.ROLLBACK], (NEW,))
    s, _ = step(s, EVENTS[K.ROLLED_BACK])
    assert (s.phase, s.active) == (P.FAILED, OLD)


def test_rollback_failure_ends_in_failed_with_both_reasons() -> None:
    s, _ = step(STATES[P.ROLLING_BACK], Event(kind=K.STEP_FAILED, reason="EIO"))
    assert s.phase is P.FAILED and s.reason == "canary; rollback failed too: EIO"


def test_restart_loop_is_bounded_by_the_store_count() -> None:
    s = STATES[P.ACTIVATING]
    restarts = 0
    while s.phase is P.ACTIVATING:
        s, actions = step(s, EVENTS[K.RESTARTED])
        restarts += 1
        assert restarts <= MAX_STORE_COUNT
    assert s.phase is P.ROLLING_BACK and actions == [A.ROLLBACK]
    assert restarts == MAX_STORE_COUNT - STATES[P.ACTIVATING].store_count + 1
    assert f"bound {MAX_STORE_COUNT}" in (s.reason or "") and "previous model keeps serving" in (s.reason or "")
    # A rollback that keeps crashing the agent ends in FAILED instead of looping.
    s, actions = step(s, EVENTS[K.RESTARTED])
    assert s.phase is P.FAILED and actions == [A.SERVE_CURRENT]
    assert "rollback did not finish" in (s.reason or "")


def test_state_round_trips_through_json() -> None:
    s = STATES[P.ACTIVE].model_copy(update={"refused": (OLD,)})
    assert UpdateState.model_validate_json(s.model_dump_json()) == s


def test_refused_set_is_bounded() -> None:
    s = STATES[P.ACTIVATING]
    for v in range(2, MAX_REFUSED + 5):
        s = s.model_copy(update={"phase": P.ACTIVATING, "target": ModelRef(name=f"m{v}", version=v), "store_count": 1})
        s, _ = step(s, EVENTS[K.STEP_FAILED])
    newest = ModelRef(name=f"m{MAX_REFUSED + 4}", version=MAX_REFUSED + 4)
    assert len(s.refused) == MAX_REFUSED and s.refused[-1] == newest
