"""The admission endpoints' HTTP adapter (webhook/app.py, AdmissionEndpoints) through
flask's WSGI test client: what reaches the review, what a request that is not a review
gets back, and what is left to flask. The real server over TLS, called by the real API
server, is in tests/cluster/test_observer.py."""

from __future__ import annotations

import io
import json

import pytest

from webhook import admission
from webhook.app import create_app
from webhook.settings import Settings

REVIEW = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
          "request": {"uid": "u-7", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                      "namespace": "team", "operation": "CREATE",
                      "object": {"spec": {"containers": [{"name": "a", "image": "nginx"}]}}}}
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def app():
    return create_app(Settings(namespace="prewarm", max_body_bytes=4096))


def buffered(app) -> set[str]:
    return set(app.extensions["prewarm"].buffer.drain())


def test_a_review_is_answered_allowed_and_its_images_buffered(app):
    answer = app.test_client().post("/observe", data=json.dumps(REVIEW), headers=JSON)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json == {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                           "response": {"uid": "u-7", "allowed": True}}
    assert buffered(app) == {"docker.io/library/nginx:latest"}


def test_a_chunked_body_is_read_to_its_end(app):
    # no Content-Length: gunicorn frames the body and says so (wsgi.input_terminated)
    answer = app.test_client().post(
        "/observe", input_stream=io.BytesIO(json.dumps(REVIEW).encode()), headers=JSON,
        environ_overrides={"wsgi.input_terminated": True})
    assert answer.status_code == 200 and answer.json["response"]["allowed"] is True


@pytest.mark.parametrize("server_frames_body", [False, True], ids=["werkzeug", "gunicorn"])
def test_a_body_cut_short_gets_a_400_saying_so(app, server_frames_body):
    # gunicorn frames the body itself (wsgi.input_terminated) and its stream just ends
    # early; without that flag werkzeug's LimitedStream does the framing
    whole = json.dumps(REVIEW).encode()
    overrides = {"CONTENT_LENGTH": str(len(whole) + 10)}
    if server_frames_body:
        overrides["wsgi.input_terminated"] = True
    answer = app.test_client().post("/observe", input_stream=io.BytesIO(whole), headers=JSON,
                                    environ_overrides=overrides)
    assert answer.status_code == 400
    assert answer.json == {"error": f"the body ended after {len(whole)} of its "
                                    f"{len(whole) + 10} bytes (Content-Length)"}
    assert buffered(app) == set()


@pytest.mark.parametrize("body,headers,fragment", [
    (b"x" * 5000, JSON, "over the limit of 4096 bytes"),
    (json.dumps(REVIEW).encode(), {"Content-Type": "text/plain; charset=utf-8"},
     "content type must be application/json, got 'text/plain'"),
    (b"{", JSON, "not valid JSON"),
    # JSON as the API server sends it, UTF-8 and nothing else (orjson)
    (b'{"kind": NaN}', JSON, "not valid JSON"),
    ("{}".encode("utf-16"), JSON, "not valid JSON"),
    (b"\xef\xbb\xbf" + json.dumps(REVIEW).encode(), JSON, "not valid JSON"),
    (json.dumps(REVIEW).encode() + b"{", JSON, "not valid JSON"),
    (b"", JSON, "the body is empty: an AdmissionReview (JSON) is expected"),
    (b" \n", JSON, "the body is empty"),
    (json.dumps({**REVIEW, "kind": "Pod"}).encode(), JSON, "AdmissionReview"),
])
def test_what_is_not_a_review_gets_a_400_naming_the_problem(app, body, headers, fragment):
    answer = app.test_client().post("/observe", data=body, headers=headers)
    assert answer.status_code == 400
    assert fragment in answer.json["error"]
    assert buffered(app) == set()


def test_a_content_type_with_parameters_is_json(app):
    answer = app.test_client().post("/observe", data=json.dumps(REVIEW),
                                    headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert answer.status_code == 200


def test_other_methods_get_405_with_the_allowed_one(app):
    for method in ("GET", "PUT", "DELETE"):
        answer = app.test_client().open("/mutate", method=method)
        assert answer.status_code == 405
        assert answer.headers["Allow"] == "POST"
        assert answer.json == {"error": f"method {method} not allowed on /mutate"}


def test_a_bug_in_the_review_still_allows_the_pod(app, monkeypatch):
    def broken(*_args, **_kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(admission, "review", broken)
    client = app.test_client()
    answer = client.post("/observe", data=json.dumps(REVIEW), headers=JSON)
    assert answer.status_code == 200
    assert answer.json["response"] == {"uid": "u-7", "allowed": True}
    # without a uid there is nothing to answer: a 400 (failurePolicy Ignore), not a 500
    no_uid = json.loads(json.dumps(REVIEW))
    del no_uid["request"]["uid"]
    answer = client.post("/observe", data=json.dumps(no_uid), headers=JSON)
    assert answer.status_code == 400 and answer.json["error"]


def test_the_other_paths_are_flask_views(app):
    client = app.test_client()
    assert client.get("/healthz").json == {"status": "ok"}
    assert client.get("/readyz").json["buffered"] == 0
    missing = client.get("/observe/")
    assert missing.status_code == 404
    assert missing.json == {"error": "no such endpoint: /observe/"}


def test_a_review_full_of_long_invalid_references_logs_a_bounded_few_lines(caplog):
    """Each invalid reference is counted; only the first few are logged, cut short, so a
    review of thousands of them cannot flood the log."""
    app = create_app(Settings(namespace="prewarm"))
    junk = [f"Bad/{index:03d}/" + "X" * 10_000 for index in range(30)]
    body = json.loads(json.dumps(REVIEW))
    body["request"]["object"]["spec"]["containers"] = [
        {"name": f"c{index}", "image": image} for index, image in enumerate(junk)]
    with caplog.at_level("INFO", logger="webhook.app"):
        answer = app.test_client().post("/observe", data=json.dumps(body), headers=JSON)
    assert answer.status_code == 200 and answer.json["response"]["allowed"] is True
    lines = [r.getMessage() for r in caplog.records if r.name == "webhook.app"]
    assert len(lines) == 6, lines
    assert all(len(line) < 400 for line in lines)
    assert "'Bad/000/XXX" in lines[0] and "(10008 characters)" in lines[0]
    assert lines[-1].startswith("25 more invalid image references in team/Pod")


def test_images_past_the_cap_are_counted_and_logged_in_one_line_not_as_invalid(caplog):
    from webhook import admission, metrics

    app = create_app(Settings(namespace="prewarm"))
    cap = admission.MAX_IMAGES_PER_OBJECT
    body = json.loads(json.dumps(REVIEW))
    body["request"]["object"]["spec"]["containers"] = [
        {"name": f"c{index}", "image": f"ghcr.io/acme/app-{index:04d}:v1"}
        for index in range(cap + 40)]

    def unread() -> float:  # counts are published (to the counters) by the flusher
        metrics.publish_pending()
        return metrics.IMAGES_REJECTED.labels(admission.TOO_MANY_IMAGES)._value.get()

    before = unread()
    with caplog.at_level("INFO", logger="webhook.app"):
        answer = app.test_client().post("/observe", data=json.dumps(body), headers=JSON)
    assert answer.status_code == 200 and answer.json["response"]["allowed"] is True
    assert unread() - before == 40
    lines = [r.getMessage() for r in caplog.records if r.name == "webhook.app"]
    assert lines == [f"40 images in team/Pod past the first {cap} not read (counted in "
                     "prewarm_images_rejected_total)"]
    assert len(app.extensions["prewarm"].buffer) == cap
