"""The update thread's inbox: checks coalesce, probation holds checks but not failures or a stop."""

from __future__ import annotations

from agent.update.requests import CheckRequest, ProbationFailure, UpdateRequests


class FakeClock:
    """A FAKE monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_queued_checks_are_answered_by_one_pass_and_a_failure_keeps_its_place() -> None:
    requests = UpdateRequests()
    requests.check("doorbell")
    requests.check("poll")
    requests.probation_failed("worker exited with -9", "/s/models/m/2")
    requests.check("command")
    assert requests.next() == CheckRequest(frozenset({"doorbell", "poll"}))
    assert requests.next() == ProbationFailure(reason="worker exited with -9", model_dir="/s/models/m/2")
    assert requests.next() == CheckRequest(frozenset({"command"}))


def test_a_stop_ends_the_loop_even_behind_queued_checks() -> None:
    requests = UpdateRequests()
    requests.check("poll")
    requests.stop()
    requests.check("doorbell")
    assert requests.next() is None


def test_during_probation_a_failure_overtakes_the_held_check() -> None:
    clock = FakeClock()
    requests = UpdateRequests(clock)
    requests.hold_checks(60)
    requests.check("doorbell")
    requests.probation_failed("worker exited with 1", "/s/models/m/3")
    assert requests.next() == ProbationFailure(reason="worker exited with 1", model_dir="/s/models/m/3")
    requests.release_checks()  # the rollback is under way: held checks may run
    assert requests.next() == CheckRequest(frozenset({"doorbell"}))


def test_checks_held_by_a_window_run_as_one_once_it_has_passed() -> None:
    clock = FakeClock()
    requests = UpdateRequests(clock)
    requests.hold_checks(60)
    requests.check("doorbell")
    requests.check("poll")
    clock.now += 61  # the window has passed
    assert requests.next() == CheckRequest(frozenset({"doorbell", "poll"}))


def test_a_held_check_absorbs_the_checks_that_arrive_while_it_waits() -> None:
    """The hold is real time here (a FAKE clock cannot make queue.get return): 0.2 s, with two
    checks queued behind the first; the first wait takes the second, the next the third."""
    requests = UpdateRequests()
    requests.hold_checks(0.2)
    for trigger in ("doorbell", "poll", "command"):
        requests.check(trigger)
    assert requests.next() == CheckRequest(frozenset({"doorbell", "poll", "command"}))
