"""The flask app: thin HTTP adapter over `admission.review`.

`/observe` parses the body, calls the pure review function and drops the images it
returns into the worker's buffer. Every path returns a JSON body: the review response,
or `{"error": ...}` with 400 for a request that is not an answerable AdmissionReview.

The admission endpoints (`/observe`, `/mutate`) are answered by `AdmissionEndpoints`,
plain WSGI installed in front of flask's own (`app.wsgi_app`, flask's hook for
middleware); the operational ones (`/healthz`, `/readyz`, `/metrics`, errors) are flask
views. The API server waits for an admission answer on every pod creation, and flask's
request machinery (contexts, routing, request and response objects), not the review,
was most of the time spent on one: measured in one process, 137 us for an empty flask
view, 40 us for a whole review as plain WSGI; with cold CPU caches, as between reviews
arriving every few milliseconds, 473 us and 312 us. Served by gunicorn at 200 reviews/s
(12 paired rounds), the median p50 went from 2.03 to 1.26 ms.

JSON in and out is orjson's: the standard library's decoder and encoder were then half
of a review's time (measured in one process, 41.6 us a review with them, 24.0 us with
orjson). orjson takes UTF-8 JSON only, which is what the API server sends: a NaN, a
byte-order mark, UTF-16 or a lone surrogate escape is a 400 like any other bad body.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import ClientDisconnected
from werkzeug.http import parse_options_header
from werkzeug.wsgi import get_content_length, get_input_stream

from webhook import admission, images, metrics
from webhook.kube import KubeconfigError, api_client
from webhook.observer import Flusher, ImageBuffer
from webhook.settings import Settings
from webhook.store import LearnedImagesStore, StoreUnavailable

logger = logging.getLogger(__name__)


@dataclass
class ObserverState:
    settings: Settings
    buffer: ImageBuffer
    flusher: Flusher
    image_filter: images.ImageFilter
    excluded: frozenset[str]


def _store_factory(settings: Settings):
    def build() -> LearnedImagesStore:
        from kubernetes import client

        try:
            api = api_client()
        except KubeconfigError as error:
            raise StoreUnavailable(str(error)) from error
        return LearnedImagesStore(
            client.CoreV1Api(api), namespace=settings.namespace,
            name=settings.configmap,
            on_write=metrics.API_WRITES.labels("observer").inc)
    return build


def _discard(stream, *, limit: int) -> None:
    """Reads and drops a rejected body (up to `limit`), so the client is done sending
    and reads our 400 instead of a connection reset."""
    remaining = limit
    while remaining > 0:
        chunk = stream.read(min(65536, remaining))
        if not chunk:
            return
        remaining -= len(chunk)


LOGGED_REJECTIONS = 5  # invalid references logged per review; all are counted
LOGGED_CHARS = 200


def _quoted(reference: str) -> str:
    """repr() of a reference, cut to LOGGED_CHARS characters (a reference in a review
    may be as long as the body)."""
    if len(reference) <= LOGGED_CHARS:
        return repr(reference)
    return f"{reference[:LOGGED_CHARS]!r}... ({len(reference)} characters)"


def _report_rejected(outcome: admission.Outcome) -> None:
    """Counts a review's rejected references, once per reason (a review may carry
    thousands, each of any length), and logs the first few invalid ones; those past
    admission.MAX_IMAGES_PER_OBJECT, not read, in one line."""
    reasons = collections.Counter(reason for _, reason in outcome.rejected)
    for reason, amount in reasons.items():
        metrics.count(metrics.IMAGES_REJECTED, (reason,), amount)
    unread = reasons.pop(admission.TOO_MANY_IMAGES, 0)  # not known to be invalid
    invalid = sum(reasons.values())
    logged = (rejected for rejected in outcome.rejected
              if rejected[1] != admission.TOO_MANY_IMAGES)
    for reference, reason in itertools.islice(logged, LOGGED_REJECTIONS):
        logger.info("invalid image reference %s in %s/%s: %s", _quoted(reference),
                    outcome.namespace, outcome.kind, reason)
    if invalid > LOGGED_REJECTIONS:
        logger.info("%d more invalid image references in %s/%s (counted in "
                    "prewarm_images_rejected_total)", invalid - LOGGED_REJECTIONS,
                    outcome.namespace, outcome.kind)
    if unread:
        logger.info("%d images in %s/%s past the first %d not read (counted in "
                    "prewarm_images_rejected_total)", unread, outcome.namespace,
                    outcome.kind, admission.MAX_IMAGES_PER_OBJECT)


def _encode(document: Any) -> bytes:
    return orjson.dumps(document)


def _error(status: int, message: str) -> tuple[Response, int]:
    return jsonify({"error": message}), status


class Reply(Exception):
    """An answer other than the review's own: status and JSON document."""

    def __init__(self, status: int, document: dict[str, Any]):
        super().__init__(status)
        self.status, self.document = status, document


REASONS = {200: "OK", 400: "BAD REQUEST", 405: "METHOD NOT ALLOWED"}


class AdmissionEndpoints:
    """WSGI: POSTed AdmissionReviews on `endpoints` (path -> decide(body) -> review
    response) answered here, everything else passed to `app` (see the module's
    docstring for why not a flask view)."""

    def __init__(self, app, endpoints: dict[str, Any], *, max_body_bytes: int):
        self.app, self.endpoints, self.max_body_bytes = app, endpoints, max_body_bytes

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        decide = self.endpoints.get(path)
        if decide is None:
            return self.app(environ, start_response)
        headers = [("Content-Type", "application/json")]
        try:
            method = environ.get("REQUEST_METHOD", "")
            if method != "POST":
                headers.append(("Allow", "POST"))
                raise Reply(405, {"error": f"method {method} not allowed on {path}"})
            status, body = 200, self.answer(self.read_review(environ), decide, path)
        except Reply as reply:
            status, body = reply.status, _encode(reply.document)
        headers.append(("Content-Length", str(len(body))))
        start_response(f"{status} {REASONS[status]}", headers)
        return [body]

    def read_review(self, environ) -> Any:
        """The decoded JSON body; a Reply(400) for size, content type or JSON."""
        limit = self.max_body_bytes
        length = get_content_length(environ)
        # the body as the server framed it (Content-Length or chunked); never past it.
        # gunicorn frames it itself and says so (wsgi.input_terminated): werkzeug would
        # then hand back the same stream after parsing Content-Length once more.
        if environ.get("wsgi.input_terminated"):
            stream = environ["wsgi.input"]
        else:
            stream = get_input_stream(environ, max_content_length=None)
        try:
            if length is not None and length > limit:
                _discard(stream, limit=4 * limit)
                raise self.bad(f"body of {length} bytes is over the limit of {limit} bytes")
            mimetype = parse_options_header(environ.get("CONTENT_TYPE", ""))[0].lower()
            if mimetype != "application/json":
                raise self.bad(f"content type must be application/json, got "
                               f"{mimetype or 'none'!r}")
            raw = stream.read(limit + 1)
            if len(raw) > limit:
                _discard(stream, limit=3 * limit)
                raise self.bad(f"body is over the limit of {limit} bytes")
        except ClientDisconnected:  # gone while we read or discarded
            raise self.bad("the body ended before its Content-Length") from None
        if length is not None and len(raw) < length:  # the client is gone
            raise self.bad(f"the body ended after {len(raw)} of its {length} bytes "
                           "(Content-Length)")
        if not raw or raw.isspace():  # e.g. a POST with neither Content-Length nor chunks
            raise self.bad("the body is empty: an AdmissionReview (JSON) is expected")
        try:
            return orjson.loads(raw)
        except (ValueError, RecursionError) as error:
            raise self.bad(f"body is not valid JSON: {error}"[:300]) from None

    @staticmethod
    def bad(message: str) -> Reply:
        metrics.count(metrics.REVIEWS, ("", "bad_request"))
        return Reply(400, {"error": message})

    def answer(self, body: Any, decide, path: str) -> bytes:
        """`decide(body)`, encoded; a BadReview is a 400, and an unforeseen error still
        answers allowed (never block a pod) when the uid is known."""
        try:
            return _encode(decide(body))
        except admission.BadReview as bad:
            raise self.bad(str(bad)) from None
        except Exception:  # a bug must not turn into a 500 the API server retries on
            logger.exception("unexpected error answering %s", path)
            metrics.count(metrics.REVIEWS, ("", "error"))
            uid = body.get("request", {}).get("uid") if isinstance(body, dict) else None
            if isinstance(uid, str) and uid:
                return _encode(admission.build_response(uid=uid))
            raise Reply(400, {"error": "review could not be processed"}) from None


def create_app(settings: Settings) -> Flask:
    app = Flask("prewarm")
    buffer = ImageBuffer(settings.buffer_max)
    state = ObserverState(
        settings=settings, buffer=buffer,
        flusher=Flusher(buffer, _store_factory(settings), settings),
        image_filter=images.ImageFilter(allow=settings.allow, deny=settings.deny),
        excluded=settings.excluded_namespaces)
    app.extensions["prewarm"] = state

    def observe_review(body: Any) -> admission.AdmissionReview:
        outcome = admission.review(body, excluded_namespaces=state.excluded,
                                   image_filter=state.image_filter)
        if outcome.images:
            dropped = buffer.add(outcome.images, outcome.namespace, time.time())
            metrics.count(metrics.IMAGES_OBSERVED, (), len(outcome.images))
            if dropped:
                metrics.count(metrics.IMAGES_DROPPED, (), dropped)
        if outcome.rejected:  # most reviews have none
            _report_rejected(outcome)
        if outcome.filtered:
            metrics.count(metrics.IMAGES_FILTERED, (), len(outcome.filtered))
        metrics.count(metrics.REVIEWS, (outcome.kind, outcome.skipped or "observed"))
        return outcome.response

    def mutate_review(body: Any) -> admission.AdmissionReview:
        reply = admission.mutate(body, warm=state.flusher.warm_images(),
                                 excluded_namespaces=state.excluded)
        metrics.count(metrics.REVIEWS, ("Pod", "mutated" if "patch" in reply["response"]
                                            else "mutate_unchanged"))
        return reply

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz():
        # Ready as soon as the process serves: the API server being unreachable must not
        # take the observer out of the Service (reviews are still answered and buffered).
        return jsonify({"status": "ok", "buffered": len(buffer),
                        "lastFlushError": state.flusher.last_error})

    @app.get("/metrics")
    def prometheus():
        body, content_type = metrics.exposition()
        return Response(body, content_type=content_type)

    @app.errorhandler(404)
    def not_found(_exc):
        return _error(404, f"no such endpoint: {request.path}")

    @app.errorhandler(405)
    def not_allowed(_exc):
        return _error(405, f"method {request.method} not allowed on {request.path}")

    # /mutate is optional (chart: mutate.enabled): Always -> IfNotPresent for warm images
    app.wsgi_app = AdmissionEndpoints(  # type: ignore[method-assign]
        app.wsgi_app, {"/observe": observe_review, "/mutate": mutate_review},
        max_body_bytes=settings.max_body_bytes)
    return app
