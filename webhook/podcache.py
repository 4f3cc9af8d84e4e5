"""Pods kept current by list + watch: informers that keep a summary per pod, not the
object. `PodImages`: the images of every running Pod, for backfill. The reconciler also
watches its prepuller pods this way (reconciler.PrepullerPod).

Listing 20,000 pods costs the API server seconds of work at each resync; a watch costs
it almost nothing between changes. Per pod we keep the tuple of its learnable images
(normalized, allowed), a few hundred bytes, not the object. Pods of every namespace are
kept, so a namespace labelled later is backfilled at the next pass without a re-list.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from webhook import admission, images
from webhook.kube import describe_error, list_pages
from webhook.store import Observation

logger = logging.getLogger(__name__)

T = TypeVar("T")

WATCH_TIMEOUT = (3, 330)  # the server closes a watch after timeout_seconds=300
DONE_PHASES = ("Succeeded", "Failed")


def learnable(pod: dict[str, Any], image_filter: images.ImageFilter) -> tuple[str, ...]:
    """The learnable images of a pod, () for a finished or unreadable one."""
    if (pod.get("status") or {}).get("phase") in DONE_PHASES:
        return ()
    try:
        found = admission.container_images(pod.get("spec") or {})
    except admission.BadReview:
        return ()
    return admission.learnable_images(found, image_filter).images


class WatchExpired(Exception):
    """The watch's resourceVersion is gone (410): only a fresh list can resume."""


def events(lines: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(type, object) per line of a watch response, the objects left as decoded JSON.

    An ERROR event ends the stream: 410 Gone as WatchExpired, anything else as an
    ApiException carrying the server's reason and message. (The client's Watch.stream
    fails on these with KeyError 'raw_object' when asked not to build models.)"""
    for line in lines:
        if not line:
            continue
        event = json.loads(line)
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise WatchExpired(obj.get("message") or "resource version expired")
            raise ApiException(status=obj.get("code") or 0,
                               reason=f"{obj.get('reason')}: {obj.get('message')}")
        yield kind, obj


class PodWatch(Generic[T]):
    """Pods kept current by list + watch, each as `summarize(pod)` (None: not kept).

    `namespace` empty: every namespace; `selector`: the list's and the watch's label
    and field selectors. `page_size`: pods decoded at once when listing (see
    kube.list_pages)."""

    def __init__(self, core: client.CoreV1Api, summarize: Callable[[dict[str, Any]], T | None],
                 *, what: str, namespace: str = "", page_size: int = 500,
                 **selector: str):
        self.core, self.summarize, self.what = core, summarize, what
        self._call: Callable[..., Any] = functools.partial(
            core.list_namespaced_pod, namespace) if namespace \
            else core.list_pod_for_all_namespaces
        self._page_size, self._selector = page_size, selector
        self._pods: dict[tuple[str, str], T] = {}
        self._lock = threading.Lock()
        self.synced = threading.Event()

    def _key(self, pod: dict[str, Any]) -> tuple[str, str]:
        meta = pod.get("metadata") or {}
        return meta.get("namespace", ""), meta.get("name", "")

    def relist(self) -> str:
        """Replaces the cache with a fresh list; returns the list's resourceVersion."""
        pods: dict[tuple[str, str], T] = {}
        version = ""
        for page in list_pages(self._call, page_size=self._page_size, **self._selector):
            for pod in page.get("items") or []:
                summary = self.summarize(pod)
                if summary is not None:
                    pods[self._key(pod)] = summary
            version = (page.get("metadata") or {}).get("resourceVersion", version)
        with self._lock:
            self._pods = pods
        return version

    def apply(self, kind: str, pod: dict[str, Any]) -> None:
        key = self._key(pod)
        summary = None if kind == "DELETED" else self.summarize(pod)
        with self._lock:
            if summary is not None:
                self._pods[key] = summary
            else:
                self._pods.pop(key, None)

    def items(self) -> list[tuple[tuple[str, str], T]]:
        """((namespace, name), summary) of every pod kept, as of now."""
        with self._lock:
            return list(self._pods.items())

    def watch(self, version: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """The pod events after `version` until the server ends the watch (300 s)."""
        response = self._call(
            watch=True, resource_version=version, timeout_seconds=300,
            allow_watch_bookmarks=True, _preload_content=False,
            _request_timeout=WATCH_TIMEOUT, **self._selector)
        try:
            yield from events(iter_resp_lines(response))
        finally:
            response.close()
            response.release_conn()

    def run(self, stop: threading.Event) -> None:
        version: str | None = None
        while not stop.is_set():
            try:
                if version is None:
                    version = self.relist()
                    self.synced.set()
                for kind, obj in self.watch(version):
                    if stop.is_set():
                        return
                    version = (obj.get("metadata") or {}).get("resourceVersion", version)
                    if kind != "BOOKMARK":
                        self.apply(kind, obj)
            except WatchExpired as expired:  # routine after compaction: list again now
                logger.info("%s watch expired (%s); listing pods again", self.what, expired)
                version = None
            except ApiException as error:
                if error.status != 410:
                    logger.warning("%s watch failed: %s", self.what, describe_error(error))
                    stop.wait(5)
                version = None  # too old or broken: start again from a fresh list
            except Exception as error:  # connection errors
                if stop.is_set():
                    return  # the API server went away as we stopped: nothing to say
                logger.warning("%s watch failed: %s", self.what, describe_error(error))
                version = None
                stop.wait(5)


class PodImages(PodWatch[tuple[str, ...]]):
    """The learnable images of every running pod, for backfill."""

    def __init__(self, core: client.CoreV1Api, image_filter: images.ImageFilter, *,
                 skip_namespace: str = ""):
        # Prewarm's own namespace is never learned, and its prepuller pods are the
        # largest in the cluster (an init container per image): the API server leaves
        # them out of the list and the watch rather than this process decoding them.
        selector = {"field_selector": f"metadata.namespace!={skip_namespace}"} \
            if skip_namespace else {}
        super().__init__(core, lambda pod: learnable(pod, image_filter) or None, what="pod",
                         **selector)

    def observations(self, namespaces: set[str], now: float) -> dict[str, Observation]:
        """image -> Observation over the running pods of `namespaces`."""
        observed: dict[str, Observation] = {}
        for (namespace, _name), found in self.items():
            if namespace in namespaces:
                for image in found:
                    observed.setdefault(image, Observation()).add(namespace, now)
        return observed
