"""The observer's write path: an in-memory buffer filled by the request threads, and a
background flusher that merges it into learned-images.

Nothing on the request path talks to the API server: a review only adds to the buffer
(a dict under a lock). The flusher runs in each gunicorn worker (started after the fork,
so no HTTP connection pool is shared between processes), wakes every flush interval,
drops what the last read of the ConfigMap already records, and writes the rest with the
store's conflict-safe read-modify-write. If the API server is unreachable, the batch goes
back into the buffer and the next attempt waits with exponential backoff; the buffer is
bounded and every image dropped past the bound is counted. A stopping worker makes one
last write, bounded in time, and counts what it could not write as dropped too.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Callable, Iterable

from webhook import metrics
from webhook.settings import Settings
from webhook.store import (LearnedImagesStore, MergeResult, Observation, Snapshot,
                           StoreUnavailable, merge, needs_write)

logger = logging.getLogger(__name__)

# A known image is skipped without any API call if the last read is this recent; an
# image that an expiry (reconciler) removed in the meantime is re-added after this.
SNAPSHOT_MAX_AGE = 30.0
MAX_BACKOFF = 30.0
# How long a stopping worker gives its last write: gunicorn kills a worker 20 s
# (graceful_timeout) after asking it to stop, and that time also covers the requests
# still being answered. What is not written by then is counted as dropped.
STOP_TIMEOUT = 8.0


def backoff(failures: int, interval: float) -> float:
    """Seconds before the next attempt after `failures` in a row: doubling from the flush
    interval, at most MAX_BACKOFF, whatever the count (an outage or a lasting 403 can
    fail thousands of times, and 2.0 ** 1024 no longer fits a float)."""
    return min(MAX_BACKOFF, interval * 2.0 ** min(failures, 32))


class ImageBuffer:
    """Thread-safe map of image -> Observation, bounded to `limit` distinct images."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._pending: dict[str, Observation] = {}

    def add(self, images: Iterable[str], namespace: str, when: float) -> int:
        """Records images; returns how many were dropped because the buffer was full."""
        dropped = 0
        with self._lock:
            for image in images:
                seen = self._pending.get(image)
                if seen is None:
                    if len(self._pending) >= self.limit:
                        dropped += 1
                        continue
                    seen = self._pending[image] = Observation()
                seen.add(namespace, when)
        return dropped

    def drain(self) -> dict[str, Observation]:
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    def restore(self, pending: dict[str, Observation]) -> int:
        """Puts an unwritten batch back (merging with what arrived meanwhile)."""
        dropped = 0
        with self._lock:
            for image, seen in pending.items():
                current = self._pending.get(image)
                if current is not None:
                    current.absorb(seen)
                elif len(self._pending) < self.limit:
                    self._pending[image] = seen
                else:
                    dropped += 1
        return dropped

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)


class Flusher:
    def __init__(self, buffer: ImageBuffer, store_factory: Callable[[], LearnedImagesStore],
                 settings: Settings, *, clock: Callable[[], float] = time.time):
        self.buffer, self.settings, self.clock = buffer, settings, clock
        self._store_factory = store_factory
        self._store: LearnedImagesStore | None = None
        self._snapshot: Snapshot | None = None
        self._snapshot_at = 0.0
        # image -> (until when, the namespaces it was refused for; None: any namespace)
        self._refused: dict[str, tuple[float, frozenset[str] | None]] = {}
        self._failures = 0
        self._next_attempt = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._in_flight = 0  # images of the batch being written, out of the buffer
        self.last_error: str = ""
        self._warm: frozenset[str] = frozenset()
        self._warm_wanted = False

    @property
    def store(self) -> LearnedImagesStore:
        if self._store is None:
            self._store = self._store_factory()
        return self._store

    def start(self) -> None:
        """Starts the background loop (gunicorn: after the fork, before serving). The
        store's API client is built here, not on the first flush, so its cost is paid
        before the first review arrives."""
        try:
            self.store
        except StoreUnavailable as error:
            logger.warning("learned-images store not ready yet: %s", error)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prewarm-flusher",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """Stops the loop, which makes a last attempt to write what is buffered, and
        waits for it at most `timeout` seconds. Returns how many images were not
        written: they are counted as dropped (backfill re-learns them) and logged."""
        self._stop.set()
        if self._thread is None:  # never started: the last attempt is made here
            self._final_flush()
        else:
            self._thread.join(timeout)
        metrics.publish_pending()
        lost = len(self.buffer) + self._in_flight
        if lost:
            metrics.IMAGES_DROPPED.inc(lost)
            logger.error("stopping with %d images not written to learned-images (%s); "
                         "counted as dropped, backfill re-learns them", lost,
                         self.last_error or f"the last write did not finish in {timeout:.0f}s")
        return lost

    def _run(self) -> None:
        while not self._stop.wait(self.settings.flush_interval):
            try:
                metrics.publish_pending()  # the request path's counts (webhook/metrics.py)
                self.flush()
                if self._warm_wanted:
                    self._refresh_snapshot()
            except Exception:  # the loop must survive anything (flush restores its batch)
                logger.exception("unexpected error while flushing learned images")
        self._final_flush()

    def _final_flush(self) -> None:
        """One more attempt, whatever the backoff: the worker is about to exit. In this
        thread, so that no two writes of one worker ever run at once."""
        try:
            if len(self.buffer):
                self.flush(force=True)
        except Exception:
            logger.exception("unexpected error in the last flush of learned images")

    def warm_images(self) -> frozenset[str]:
        """Images recorded as warm in the last read of learned-images (for /mutate). The
        first call starts keeping that read fresh (one GET per SNAPSHOT_MAX_AGE)."""
        self._warm_wanted = True
        return self._warm

    def _remember(self, snapshot: Snapshot, now: float) -> None:
        self._snapshot, self._snapshot_at = snapshot, now
        self._warm = frozenset(r.image for r in snapshot.learned.records.values()
                               if r.state == "warm")

    def _refresh_snapshot(self) -> None:
        now = self.clock()
        if self._snapshot is not None and now - self._snapshot_at < SNAPSHOT_MAX_AGE:
            return
        try:
            self._remember(self.store.read(), now)
        except StoreUnavailable as error:
            logger.warning("could not read learned-images for /mutate: %s", error)

    def flush(self, *, force: bool = False) -> MergeResult | None:
        """One attempt; returns the merge result when a write was needed and made."""
        now = self.clock()
        if not force and now < self._next_attempt:
            return None
        metrics.BUFFERED.set(len(self.buffer))  # sampled once per flush interval
        pending = self.buffer.drain()
        if not pending:
            return None
        pending = self._drop_known(pending, now)
        if not pending:
            return None
        self._in_flight = len(pending)
        try:
            return self._write(pending, now)
        finally:
            self._in_flight = 0

    def _write(self, pending: dict[str, Observation], now: float) -> MergeResult | None:
        result = MergeResult()

        def apply(learned) -> bool:
            nonlocal result
            result = merge(learned, pending, source="admission", settings=self.settings)
            return result.changed

        try:
            snapshot = self.store.update(apply)
        except Exception as error:  # StoreUnavailable, or anything unforeseen: keep the batch
            if not isinstance(error, StoreUnavailable):
                logger.exception("unexpected error writing learned-images; batch kept")
            dropped = self.buffer.restore(pending)
            metrics.BUFFERED.set(len(self.buffer))
            if dropped:
                metrics.IMAGES_DROPPED.inc(dropped)
            self._failures += 1
            delay = backoff(self._failures, self.settings.flush_interval)
            self._next_attempt = now + delay * random.uniform(0.8, 1.2)
            self.last_error = str(error)
            metrics.FLUSHES.labels("error").inc()
            logger.warning("could not write %d buffered images (attempt %d, next in %.1fs): %s",
                           len(pending), self._failures, delay, error)
            return None
        if self._failures:
            logger.info("learned-images reachable again after %d failed attempts",
                        self._failures)
        self._failures, self._next_attempt, self.last_error = 0, 0.0, ""
        self._remember(snapshot, now)
        metrics.FLUSHES.labels("written" if result.changed else "unchanged").inc()
        if result.added:
            metrics.IMAGES_LEARNED.labels("admission").inc(len(result.added))
            logger.info("learned %d new images (%s%s)", len(result.added),
                        ", ".join(result.added[:3]), ", ..." if len(result.added) > 3 else "")
        if result.refused:
            metrics.IMAGES_REFUSED.inc(len(result.refused))
            for image, _reason in result.refused:
                full = result.full_in.get(image)
                earlier = self._refused.get(image)  # unexpired: _drop_known pruned at `now`
                if full is not None and earlier is not None and earlier[1] is not None:
                    full |= earlier[1]  # full there too, still
                self._refused[image] = (now + SNAPSHOT_MAX_AGE, full)
            logger.warning("%d images not recorded: %s (first: %s)", len(result.refused),
                           result.refused[0][1], result.refused[0][0])
        if result.unlisted:
            # recorded already; without this they would be merged again every flush
            for image in result.unlisted:
                self._refused[image] = (now + SNAPSHOT_MAX_AGE, None)
            logger.warning("%d known images seen in new namespaces that learned-images has "
                           "no room to list (PREWARM_MAX_BYTES; first: %s)",
                           len(result.unlisted), result.unlisted[0])
        return result

    def _drop_known(self, pending: dict[str, Observation],
                    now: float) -> dict[str, Observation]:
        """Leaves out what needs no write: images the last read already records (with
        these namespaces and a fresh lastSeen) and images a cap refused (or could not
        list in a new namespace) moments ago. An image refused because the namespaces it
        was seen in were full is left out only when seen in no other namespace: one
        with room may take it."""
        # forgotten once past: kept, a steady stream of new images against a full cap
        # would grow this for as long as the snapshot is kept fresh
        self._refused = {image: refusal for image, refusal in self._refused.items()
                         if refusal[0] > now}
        fresh = self._snapshot is not None and now - self._snapshot_at < SNAPSHOT_MAX_AGE
        if not fresh:
            self._refused.clear()
            return pending
        learned = self._snapshot.learned
        needed = {}
        for image, seen in pending.items():
            refusal = self._refused.get(image)
            if refusal is not None and (refusal[1] is None or seen.namespaces <= refusal[1]):
                continue
            if needs_write(learned.get(image), seen, refresh=self.settings.last_seen_refresh):
                needed[image] = seen
        return needed
