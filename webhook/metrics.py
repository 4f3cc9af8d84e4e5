"""Prometheus metrics. Under gunicorn every worker is a process, so the observer runs
prometheus_client in multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by `serve` before
the workers start) and `/metrics` aggregates the workers' files at scrape time.

In that mode every increment takes a lock and writes the worker's mmap file, and a
labelled counter first looks up its child: about 7 us for the two counts of a review,
a quarter of the observer's own time per review. The request path therefore counts into
a `Tally` (a dict under a lock, under 1 us), and the worker's flusher publishes it to the
counters every flush interval, when it stops, and before this worker answers a scrape.
So a scrape can miss up to one flush interval (1 s by default) of the other workers'
counts, and a worker killed outright (SIGKILL, out of memory) loses at most that much.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Iterator

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               generate_latest, multiprocess)
from prometheus_client.core import GaugeMetricFamily, Metric

REVIEWS = Counter("prewarm_reviews_total", "AdmissionReviews answered, by result",
                  ["kind", "result"])
# No latency histogram here: in multiprocess mode each observation writes several mmap
# values on the request path, and the API server already measures every webhook call
# (apiserver_admission_webhook_admission_duration_seconds{name="observe.prewarm.io"}).
IMAGES_OBSERVED = Counter("prewarm_images_observed_total", "image references seen in reviews")
IMAGES_REJECTED = Counter("prewarm_images_rejected_total",
                          "invalid image references (and those past 256 in one object), never "
                          "recorded", ["reason"])
IMAGES_FILTERED = Counter("prewarm_images_filtered_total",
                          "images left out by the allow/deny lists")
IMAGES_REFUSED = Counter("prewarm_images_refused_total",
                         "images not recorded because a cap of learned-images was reached "
                         "or their key holds a value that is not a valid record")
IMAGES_DROPPED = Counter("prewarm_images_dropped_total",
                         "images dropped because the in-memory buffer was full while the "
                         "API server was unreachable, or not written by a stopping worker "
                         "(backfill re-learns them)")
IMAGES_LEARNED = Counter("prewarm_images_learned_total", "images added to learned-images",
                         ["source"])
API_WRITES = Counter("prewarm_api_writes_total", "writes to the Kubernetes API", ["component"])
FLUSHES = Counter("prewarm_flushes_total", "flushes of the observer buffer", ["result"])
BUFFERED = Gauge("prewarm_buffered_images", "images waiting to be written",
                 multiprocess_mode="livesum")
HELPER_FAILING = Gauge("prewarm_prepuller_helper_failing", "prepuller pods whose helper "
                       "container (from Prewarm's own image) cannot start, as of the last "
                       "pass: nothing is pulled on their nodes", multiprocess_mode="max")
RECONCILES = Counter("prewarm_reconciles_total", "reconcile passes, by DaemonSet outcome "
                     "(created, updated, unchanged) or error",
                     ["outcome"])


class Tally:
    """Counts taken on the request path, waiting to be added to their counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[Counter, tuple[str, ...]], float] = {}

    def add(self, counter: Counter, labels: tuple[str, ...] = (), amount: float = 1) -> None:
        key = (counter, labels)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + amount

    def publish(self) -> None:
        """Adds what was counted since the last call to the counters."""
        with self._lock:
            counts, self._counts = self._counts, {}
        for (counter, labels), amount in counts.items():
            (counter.labels(*labels) if labels else counter).inc(amount)


PENDING = Tally()  # per process: each gunicorn worker has its own
count = PENDING.add
publish_pending = PENDING.publish


class ServingCertificate:
    """Collector, read at scrape time from the scraped worker: when the certificate it
    serves expires. Not a multiprocess Gauge: every worker serves the same files, and a
    value read at the scrape follows a rotation even in a worker that no new connection
    has made look at the files since."""

    NAME = "prewarm_serving_certificate_expiration_timestamp_seconds"
    HELP = ("notAfter (Unix time) of the serving certificate the observer hands to new "
            "connections; alert well before it comes (certs.mode=job renews only on helm "
            "upgrade)")

    def __init__(self, expiry: Callable[[], float | None]):
        self.expiry = expiry

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.NAME, self.HELP)

    def collect(self) -> Iterator[Metric]:
        value = self.expiry()
        if value is not None:  # unreadable: no sample rather than a wrong one (logged)
            yield GaugeMetricFamily(self.NAME, self.HELP, value=value)


_AT_SCRAPE: list[ServingCertificate] = []  # collectors computed when this process is scraped


def report_certificate_expiry(expiry: Callable[[], float | None]) -> None:
    """Adds the serving certificate's expiry, `expiry()` at each scrape, to /metrics
    (in place of an earlier one)."""
    _AT_SCRAPE[:] = [ServingCertificate(expiry)]


def exposition() -> tuple[bytes, str]:
    publish_pending()  # this worker's own counts are current; the others' lag <= 1 interval
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY as registry
    at_scrape = CollectorRegistry()
    for collector in _AT_SCRAPE:
        at_scrape.register(collector)
    return generate_latest(registry) + generate_latest(at_scrape), CONTENT_TYPE_LATEST
