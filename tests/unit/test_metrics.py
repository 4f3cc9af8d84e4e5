"""Request-path counts (webhook/metrics.py, Tally): counted on the request path,
published to the Prometheus counters by the worker's flusher, when it stops, and before
a scrape. The prometheus_client registry is process-wide, so each test compares values
before and after."""

from __future__ import annotations

import json
import threading
import time

import pytest
from prometheus_client import REGISTRY

from webhook import metrics
from webhook.app import create_app
from webhook.observer import Flusher, ImageBuffer
from webhook.settings import Settings
from webhook.store import StoreUnavailable

OBSERVED = ("prewarm_reviews_total", {"kind": "Pod", "result": "observed"})


@pytest.fixture(autouse=True)
def published_before():
    """What other tests counted in this process is published before a test starts."""
    metrics.publish_pending()


def value(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_counts_from_many_threads_are_published_exactly_once():
    tally = metrics.Tally()
    labelled = value("prewarm_reviews_total", {"kind": "Job", "result": "dry-run"})
    plain = value("prewarm_images_filtered_total")

    def count():
        for _ in range(5000):
            tally.add(metrics.REVIEWS, ("Job", "dry-run"))
            tally.add(metrics.IMAGES_FILTERED, (), 2)

    threads = [threading.Thread(target=count) for _ in range(8)]
    for thread in threads:
        thread.start()
    assert value("prewarm_images_filtered_total") == plain  # nothing before publishing
    for thread in threads:
        thread.join()
    tally.publish()
    tally.publish()  # a second call adds only what came since: nothing
    assert value("prewarm_reviews_total", {"kind": "Job", "result": "dry-run"}) == labelled + 40000
    assert value("prewarm_images_filtered_total") == plain + 80000


def review(uid: str) -> str:
    return json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                       "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
                                   "namespace": "team", "operation": "CREATE",
                                   "object": {"spec": {"containers": [{"name": "a", "image": "nginx"},
                                                                      {"name": "b", "image": "Bad/Upper"}]}}}})


def test_a_scrape_shows_the_reviews_this_worker_answered_just_before():
    app = create_app(Settings(namespace="prewarm"))
    client = app.test_client()
    before = value(*OBSERVED), value("prewarm_images_rejected_total",
                                     {"reason": "repository name must be lowercase"})
    for index in range(3):
        assert client.post("/observe", data=review(f"u-{index}"),
                           headers={"Content-Type": "application/json"}).status_code == 200
    assert client.post("/observe", data="{", headers={"Content-Type": "application/json"}
                       ).status_code == 400
    scrape = client.get("/metrics").text
    assert f'prewarm_reviews_total{{kind="Pod",result="observed"}} {before[0] + 3}' in scrape
    assert value("prewarm_images_rejected_total",
                 {"reason": "repository name must be lowercase"}) == before[1] + 3
    assert value("prewarm_reviews_total", {"kind": "", "result": "bad_request"}) >= 1


def test_what_a_client_names_never_becomes_a_metric_series():
    """Kinds and operations come from a fixed set: made-up ones are refused (400), so a
    client cannot add series to the metrics (files in a small in-memory /tmp)."""
    app = create_app(Settings(namespace="prewarm"))
    client = app.test_client()
    for index in range(20):
        body = json.loads(review(f"u-{index}"))
        body["request"]["kind"]["kind"] = f"Made{index}"
        body["request"]["operation"] = "DELETE"
        other = json.loads(review(f"v-{index}"))
        other["request"]["operation"] = f"OP{index}"
        for doc in (body, other):
            assert client.post("/observe", data=json.dumps(doc),
                               headers={"Content-Type": "application/json"}).status_code == 400
    scrape = client.get("/metrics").text
    assert "Made" not in scrape and "OP1" not in scrape
    assert value("prewarm_reviews_total", {"kind": "", "result": "bad_request"}) >= 40


def unreachable():
    raise StoreUnavailable("no API server in this test")


def test_a_stopping_worker_publishes_what_it_counted():
    flusher = Flusher(ImageBuffer(10), unreachable, Settings())
    before = value(*OBSERVED)
    metrics.count(metrics.REVIEWS, ("Pod", "observed"), 5)
    assert value(*OBSERVED) == before
    flusher.stop()  # gunicorn's worker_exit hook
    assert value(*OBSERVED) == before + 5


def test_the_running_flusher_publishes_every_interval():
    flusher = Flusher(ImageBuffer(10), unreachable, Settings(flush_interval=0.05))
    before = value(*OBSERVED)
    flusher.start()
    try:
        metrics.count(metrics.REVIEWS, ("Pod", "observed"), 2)
        deadline = time.monotonic() + 10  # polled: stop() would publish too
        while value(*OBSERVED) != before + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert value(*OBSERVED) == before + 2
    finally:
        flusher.stop()
