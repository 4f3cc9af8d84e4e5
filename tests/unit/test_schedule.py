"""When the reconciler's leader makes its next pass (webhook/reconciler.py, Schedule)."""

from __future__ import annotations

from webhook.reconciler import MAX_RETRY_DELAY, Schedule
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


def test_a_success_ends_the_backoff_and_triggers_run_at_once_again():
    schedule = Schedule(SETTINGS)
    attempts(schedule, seconds=10, fail=True)  # 0, 2, 6: backing off until 14
    assert not schedule.due(13.0, triggered=True)
    schedule.succeeded(14.0, full=True)
    assert schedule.failures == 0
    assert schedule.due(15.0, triggered=True)
    assert not schedule.due(15.0, triggered=False)  # nothing new, not yet a status look
    assert schedule.due(24.0, triggered=False)  # the status interval
    assert schedule.full(314.0) and not schedule.full(313.0)


def test_a_new_leadership_starts_with_a_full_pass_now():
    schedule = Schedule(SETTINGS)
    schedule.succeeded(0.0, full=True)
    schedule.failed(5.0)
    schedule.restart()
    assert schedule.due(5.5, triggered=False) and schedule.full(5.5)
