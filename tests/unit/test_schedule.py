"""When the reconciler's leader makes its next pass (webhook/reconciler.py, Schedule)."""

from __future__ import annotations

from webhook.reconciler import MAX_RETRY_DELAY, MAX_SETTLE, SETTLE, Schedule
from webhook.settings import Settings

SETTINGS = Settings(status_interval=10.0, resync_period=300.0)


def attempts(schedule: Schedule, *, seconds: int, fail: bool) -> list[int]:
    """The seconds at which a pass runs, a trigger arriving every second (a busy
    learned-images), each pass failing or not."""
    made = []
    for now in range(seconds):
        if schedule.due(float(now), triggered=True):
            made.append(now)
            if fail:
                schedule.failed(float(now))
            else:
                schedule.succeeded(float(now), full=schedule.full(float(now)))
    return made


def test_a_lasting_failure_is_retried_ever_less_often_up_to_a_minute():
    schedule = Schedule(SETTINGS)
    assert attempts(schedule, seconds=300, fail=True) == [0, 2, 6, 14, 30, 62, 122, 182, 242]
    assert MAX_RETRY_DELAY == 60


def test_a_success_ends_the_backoff_and_a_change_runs_once_settled():
    schedule = Schedule(SETTINGS)
    attempts(schedule, seconds=10, fail=True)  # 0, 2, 6: backing off until 14
    assert not schedule.due(13.0, triggered=True)
    schedule.succeeded(14.0, full=True)
    assert schedule.failures == 0
    assert not schedule.due(15.0, triggered=True)  # a change: quiet for SETTLE first
    assert not schedule.due(16.5, triggered=False)
    assert schedule.due(17.0, triggered=False)
    schedule.succeeded(17.0, full=False)
    assert not schedule.due(18.0, triggered=False)  # nothing new, not yet a status look
    assert schedule.due(27.0, triggered=False)  # the status interval
    assert schedule.full(314.0) and not schedule.full(313.0)


def test_a_burst_of_changes_is_applied_a_few_times_not_at_each():
    # the observers write a new image every second for 30 s: the shard is rolled every
    # MAX_SETTLE seconds meanwhile, and once more SETTLE after the last (status looks
    # every minute here, so they do not blur the count)
    schedule = Schedule(Settings(status_interval=60.0, resync_period=300.0))
    schedule.succeeded(0.0, full=True)
    passes = []
    for now in range(1, 40):
        if schedule.due(float(now), triggered=now <= 30):
            passes.append(now)
            schedule.succeeded(float(now), full=False)
    assert passes == [11, 22, 32]
    assert SETTLE == 2.0 and MAX_SETTLE == 10.0


def test_a_change_while_backing_off_is_applied_when_the_wait_is_over():
    schedule = Schedule(SETTINGS)
    schedule.succeeded(0.0, full=True)
    schedule.failed(5.0)  # next attempt at 7
    assert not schedule.due(5.5, triggered=True)
    assert not schedule.due(6.5, triggered=False)
    assert schedule.due(7.5, triggered=False)


def test_a_new_leadership_starts_with_a_full_pass_now():
    schedule = Schedule(SETTINGS)
    schedule.succeeded(0.0, full=True)
    schedule.failed(5.0)
    schedule.restart()
    assert schedule.due(5.5, triggered=False) and schedule.full(5.5)


class SlowReconciler:
    """Stands in for a pass against an API server that takes `seconds` and then fails
    with `error` (or succeeds when error is None)."""

    def __init__(self, clock: list[float], seconds: float, error: Exception | None):
        self.settings, self.clock, self.seconds, self.error = SETTINGS, clock, seconds, error

    def reconcile_once(self, *, backfill: bool):
        self.clock[0] += self.seconds
        if self.error:
            raise self.error
        from webhook.reconciler import PassResult

        return PassResult()


def test_a_slow_failure_waits_from_when_it_ended_not_from_when_it_started():
    from webhook.reconciler import attempt

    clock = [100.0]
    schedule = Schedule(SETTINGS)
    slow = SlowReconciler(clock, 30.0, TimeoutError("read timed out"))
    assert attempt(slow, schedule, now=100.0, clock=lambda: clock[0]) is None
    assert schedule.retry_at == 132.0  # 130 + 2, not 102: retried at once
    assert not schedule.due(131.0, triggered=True)


def test_losing_leadership_mid_pass_is_no_failure():
    from prometheus_client import REGISTRY

    from webhook.reconciler import NotLeader, attempt

    errors = lambda: REGISTRY.get_sample_value("prewarm_reconciles_total",  # noqa: E731
                                               {"outcome": "error"}) or 0.0
    before, clock, schedule = errors(), [0.0], Schedule(SETTINGS)
    attempt(SlowReconciler(clock, 1.0, NotLeader("lost")), schedule, now=0.0,
            clock=lambda: clock[0])
    assert schedule.failures == 0 and errors() == before and schedule.due(1.0, triggered=True)
    schedule.failed(5.0)
    schedule.restart()  # leadership back: a failure after it waits 2 s again
    assert schedule.failed(10.0) == 2.0


def test_a_failing_image_is_left_out_ever_longer_up_to_a_day():
    from webhook.reconciler import MAX_FAILURES, failure_delay

    assert [failure_delay(1800.0, n) for n in range(1, 10)] == [
        1800, 3600, 7200, 14400, 28800, 57600, 86400, 86400, 86400]
    assert failure_delay(1800.0, MAX_FAILURES) == 86400
    assert failure_delay(2 * 86400.0, 5) == 2 * 86400  # a longer setting is kept, not grown
