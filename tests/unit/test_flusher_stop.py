"""A stopping worker's last write (Flusher.stop, gunicorn's worker_exit hook): bounded in
time, never two writes at once, and whatever is not written is counted and logged."""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import REGISTRY

from webhook.observer import Flusher, ImageBuffer
from webhook.settings import Settings
from webhook.store import LearnedSet, Snapshot, StoreUnavailable


def dropped() -> float:
    return REGISTRY.get_sample_value("prewarm_images_dropped_total") or 0.0


class GatedStore:
    """Stands in for learned-images behind an API server that answers only when the
    test opens the gate; records what was written and how many writes overlapped."""

    def __init__(self, *, fail: bool = False):
        self.gate, self.entered = threading.Event(), threading.Event()
        self.fail, self.written = fail, set()
        self._lock, self._active, self.most_at_once = threading.Lock(), 0, 0

    def update(self, mutate):
        with self._lock:
            self._active += 1
            self.most_at_once = max(self.most_at_once, self._active)
        self.entered.set()
        try:
            self.gate.wait(30)
            if self.fail:
                raise StoreUnavailable("API server unreachable")
            learned = LearnedSet()
            mutate(learned)
            self.written |= {r.image for r in learned.records.values()}
            return Snapshot(learned, "1")
        finally:
            with self._lock:
                self._active -= 1


def started(store: GatedStore) -> tuple[Flusher, ImageBuffer]:
    buffer = ImageBuffer(limit=100)
    flusher = Flusher(buffer, lambda: store, Settings(namespace="pw", flush_interval=0.01))
    buffer.add(["a.io/x:1", "a.io/y:1", "a.io/z:1"], "team", 1000.0)
    flusher.start()
    assert store.entered.wait(10), "the flusher never tried to write"
    buffer.add(["b.io/late:1", "b.io/later:1"], "team", 1001.0)  # while that write hangs
    return flusher, buffer


def test_a_write_that_hangs_past_the_deadline_is_counted_as_dropped(caplog):
    store = GatedStore()
    flusher, _ = started(store)
    before = dropped()
    with caplog.at_level(logging.ERROR, logger="webhook.observer"):
        lost = flusher.stop(timeout=0.3)
    store.gate.set()
    assert lost == 5  # the hanging batch and what came after it
    assert dropped() == before + 5
    assert any("stopping with 5 images not written" in r.getMessage() for r in caplog.records)


def test_a_write_that_finishes_in_time_is_followed_by_one_last_write_not_a_second_at_once():
    store = GatedStore()
    flusher, buffer = started(store)
    before = dropped()
    stopping = threading.Thread(target=lambda: setattr(store, "lost", flusher.stop(timeout=20)))
    stopping.start()
    deadline = time.monotonic() + 10
    while not flusher._stop.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)  # polled: the stop has begun before the API server answers
    assert flusher._stop.is_set()
    store.gate.set()  # the API server answers
    stopping.join(30)
    assert store.lost == 0 and len(buffer) == 0 and dropped() == before
    assert store.written == {"a.io/x:1", "a.io/y:1", "a.io/z:1", "b.io/late:1", "b.io/later:1"}
    assert store.most_at_once == 1


def test_a_last_write_that_fails_counts_the_buffer_as_dropped(caplog):
    store = GatedStore(fail=True)
    store.gate.set()
    buffer = ImageBuffer(limit=100)
    flusher = Flusher(buffer, lambda: store, Settings(namespace="pw"))
    buffer.add(["a.io/x:1", "a.io/y:1"], "team", 1000.0)
    before = dropped()
    with caplog.at_level(logging.ERROR, logger="webhook.observer"):
        assert flusher.stop() == 2
    assert dropped() == before + 2
    assert any("(API server unreachable)" in r.getMessage() for r in caplog.records)
