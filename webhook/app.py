"""The flask app: thin HTTP adapter over `admission.review`.

`/observe` parses the body, calls the pure review function and drops the images it
returns into the worker's buffer. Every path returns a JSON body: the review response,
or `{"error": ...}` with 400 for a request that is not an answerable AdmissionReview.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, jsonify, request

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


def _json(document: Any) -> Response:
    return Response(json.dumps(document, separators=(",", ":")), mimetype="application/json")


def _read_review(settings: Settings) -> tuple[Any, tuple[Response, int] | None]:
    """The decoded JSON body, or the 400 to answer (size, content type, JSON)."""
    length = request.content_length
    if length is not None and length > settings.max_body_bytes:
        metrics.REVIEWS.labels("", "bad_request").inc()
        _discard(request.stream, limit=4 * settings.max_body_bytes)
        return None, _error(400, f"body of {length} bytes is over the limit of "
                                 f"{settings.max_body_bytes} bytes")
    if request.mimetype != "application/json":
        metrics.REVIEWS.labels("", "bad_request").inc()
        return None, _error(400, f"content type must be application/json, got "
                                 f"{request.mimetype or 'none'!r}")
    raw = request.stream.read(settings.max_body_bytes + 1)
    if len(raw) > settings.max_body_bytes:
        metrics.REVIEWS.labels("", "bad_request").inc()
        _discard(request.stream, limit=3 * settings.max_body_bytes)
        return None, _error(400, f"body is over the limit of {settings.max_body_bytes} bytes")
    try:
        return json.loads(raw), None
    except (ValueError, RecursionError) as error:
        metrics.REVIEWS.labels("", "bad_request").inc()
        return None, _error(400, f"body is not valid JSON: {error}"[:300])


def _error(status: int, message: str) -> tuple[Response, int]:
    return jsonify({"error": message}), status


def create_app(settings: Settings) -> Flask:
    app = Flask("prewarm")
    buffer = ImageBuffer(settings.buffer_max)
    state = ObserverState(
        settings=settings, buffer=buffer,
        flusher=Flusher(buffer, _store_factory(settings), settings),
        image_filter=images.ImageFilter(allow=settings.allow, deny=settings.deny),
        excluded=settings.excluded_namespaces)
    app.extensions["prewarm"] = state

    def answer(decide) -> Response | tuple[Response, int]:
        """Body checks, then `decide(body)`; a BadReview is a 400, and an unforeseen
        error still answers allowed (never block a pod) when the uid is known."""
        body, error = _read_review(settings)
        if error is not None:
            return error
        try:
            return _json(decide(body))
        except admission.BadReview as bad:
            metrics.REVIEWS.labels("", "bad_request").inc()
            return _error(400, str(bad))
        except Exception:  # a bug must not turn into a 500 the API server retries on
            logger.exception("unexpected error answering %s", request.path)
            metrics.REVIEWS.labels("", "error").inc()
            uid = body.get("request", {}).get("uid") if isinstance(body, dict) else None
            if isinstance(uid, str) and uid:
                return _json(admission.build_response(uid=uid))
            return _error(400, "review could not be processed")

    def observe_review(body: Any) -> admission.AdmissionReview:
        outcome = admission.review(body, excluded_namespaces=state.excluded,
                                   image_filter=state.image_filter)
        if outcome.images:
            dropped = buffer.add(outcome.images, outcome.namespace, time.time())
            metrics.IMAGES_OBSERVED.inc(len(outcome.images))
            if dropped:
                metrics.IMAGES_DROPPED.inc(dropped)
        for reference, reason in outcome.rejected:
            metrics.IMAGES_REJECTED.labels(reason).inc()
            logger.info("invalid image reference %r in %s/%s: %s", reference,
                        outcome.namespace, outcome.kind, reason)
        if outcome.filtered:
            metrics.IMAGES_FILTERED.inc(len(outcome.filtered))
        metrics.REVIEWS.labels(outcome.kind, outcome.skipped or "observed").inc()
        return outcome.response

    def mutate_review(body: Any) -> admission.AdmissionReview:
        reply = admission.mutate(body, warm=state.flusher.warm_images(),
                                 excluded_namespaces=state.excluded)
        metrics.REVIEWS.labels("Pod", "mutated" if "patch" in reply["response"]
                               else "mutate_unchanged").inc()
        return reply

    @app.post("/observe")
    def observe():
        return answer(observe_review)

    @app.post("/mutate")
    def mutate():
        """Optional (chart: mutate.enabled): Always -> IfNotPresent for warm images."""
        return answer(mutate_review)

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

    return app
