"""The reconciler: keeps the pre-pull DaemonSet(s) in step with learned-images.

One pass (`reconcile_once`):
1. backfill (images of running Pods in opted-in namespaces), expiry, shard assignment,
   and failing images whose pulls failed on the prepuller pods — one conflict-safe write
   to learned-images, made only if something changed;
2. the desired DaemonSets (a pure function, daemonset.py) applied with server-side apply
   only where the live object differs in what we own: `created | updated | unchanged`;
3. per-image state read back from the prepuller pods (`warm` when every scheduled pod
   finished its pull) into learned-images, again only on change.

`run` repeats the pass under a Lease (one active replica), triggered by a watch on
learned-images and by the resync period.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, NamedTuple

import urllib3
import yaml
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from webhook import daemonset, images, metrics
from webhook.kube import api_client, describe_error, list_items
from webhook.listen import DualStackHTTPServer
from webhook.podcache import PodImages, PodWatch, learnable
from webhook.settings import Settings
from webhook.store import (LearnedImagesStore, LearnedSet, Observation, StoreUnavailable,
                           expire, merge, rfc3339, stamp_last_seen)

logger = logging.getLogger(__name__)

LEARN_LABEL = "prewarm.io/learn=enabled"
# Waiting reasons that keep a pull container from finishing. The pull ones mean the image
# cannot be had; the others (the helper cannot run in that image) would hold back every
# image after it in the shard just the same, so they are handled alike.
FAILURE_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                   "CreateContainerError", "CreateContainerConfigError", "RunContainerError",
                   "CrashLoopBackOff")
FIELD_MANAGER = "prewarm-reconciler"
TIMEOUT = (3, 30)
# Prepuller pods are read this many at a time: one carries an init container (spec,
# status, managedFields) per image of its shard, ~160 kB of JSON and ~0.8 MB decoded
# for 100 images, so a page of 500 would hold ~400 MB at once.
PREPULLER_PAGE = 20


class PrepullerPod(NamedTuple):
    """What a pass needs of one prepuller pod, kept instead of the pod (see
    PREPULLER_PAGE): a pass reads one per node and shard."""

    name: str
    node: str
    terminating: bool  # deletionTimestamp set: its statuses are of the past
    pulled: frozenset[str]  # init containers that finished with exit code 0
    failing: tuple[tuple[str, str], ...]  # (init container, FAILURE_REASON it waits with)

    @classmethod
    def of(cls, pod: dict[str, Any]) -> PrepullerPod:
        metadata = pod.get("metadata") or {}
        pulled, failing = set(), []
        for status in (pod.get("status") or {}).get("initContainerStatuses") or []:
            state = status.get("state") or {}
            terminated = state.get("terminated")
            if terminated and terminated.get("exitCode") == 0:
                pulled.add(status.get("name", ""))
            reason = (state.get("waiting") or {}).get("reason")
            if reason in FAILURE_REASONS:
                failing.append((status.get("name", ""), reason))
        return cls(name=metadata.get("name", "?"),
                   node=(pod.get("spec") or {}).get("nodeName") or "",
                   terminating=bool(metadata.get("deletionTimestamp")),
                   pulled=frozenset(pulled), failing=tuple(failing))


class LeaseMissing(RuntimeError):
    pass


class NotLeader(RuntimeError):
    pass


@dataclass
class PassResult:
    daemonsets: dict[str, str] = field(default_factory=dict)  # name -> created|updated|unchanged|deleted
    backfilled: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    failing: list[str] = field(default_factory=list)
    left_out: dict[str, float] = field(default_factory=dict)  # failing image -> seconds
    failures: dict[str, int] = field(default_factory=dict)  # image -> failures in a row
    refused: list[tuple[str, str]] = field(default_factory=list)  # backfill over a cap
    helper_failing: dict[str, tuple[str, str]] = field(default_factory=dict)  # pod -> (node, reason)
    unlisted: list[str] = field(default_factory=list)  # new namespaces not listed (bytes)

    @property
    def outcome(self) -> str:
        values = set(self.daemonsets.values())
        for word in ("created", "updated", "deleted"):
            if word in values:
                return "updated" if word == "deleted" else word
        return "unchanged"


class Reconciler:
    def __init__(self, settings: Settings, api: client.ApiClient | None = None,
                 *, clock=time.time):
        self.settings, self.clock = settings, clock
        self.api = api or api_client()
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.store = LearnedImagesStore(self.core, namespace=settings.namespace,
                                        name=settings.configmap,
                                        on_write=metrics.API_WRITES.labels("reconciler").inc)
        self.filter = images.ImageFilter(allow=settings.allow, deny=settings.deny)
        # run() points this at the elector: a pass that outlives our lease stops writing
        self.may_write: Callable[[], bool] = lambda: True
        # run() sets watched pod caches for backfill and for the prepuller pods (every
        # status interval); --once lists the pods instead
        self.pod_images: PodImages | None = None
        self.prepuller_cache: PodWatch[PrepullerPod] | None = None
        # image -> pull failures in a row (see failure_delay), as of the last write
        self.failures: dict[str, int] = {}

    # -- reading the cluster -------------------------------------------------------
    def opted_in_namespaces(self) -> list[str]:
        excluded = self.settings.excluded_namespaces
        return [ns["metadata"]["name"] for ns in list_items(
            self.core.list_namespace, label_selector=LEARN_LABEL)
            if ns["metadata"]["name"] not in excluded]

    def backfill_observations(self) -> dict[str, Observation]:
        now = self.clock()
        if self.pod_images is not None and self.pod_images.synced.is_set():
            # continuous mode: the watched cache, no re-list of every pod
            return self.pod_images.observations(set(self.opted_in_namespaces()), now)
        observed: dict[str, Observation] = {}
        for namespace in self.opted_in_namespaces():
            for pod in list_items(self.core.list_namespaced_pod, namespace,
                                  field_selector="status.phase!=Succeeded,"
                                                 "status.phase!=Failed"):
                for image in learnable(pod, self.filter):
                    observed.setdefault(image, Observation()).add(namespace, now)
        return observed

    PREPULLER_SELECTOR = (f"app.kubernetes.io/name=prewarm,"
                          f"app.kubernetes.io/component={daemonset.COMPONENT}")

    def prepuller_summary(self, pod: dict[str, Any]) -> PrepullerPod | None:
        """A pod of this release's shards (daemonset.is_own_shard), summarized."""
        shard = ((pod.get("metadata") or {}).get("labels") or {}).get(
            daemonset.DAEMONSET_LABEL, "")
        return PrepullerPod.of(pod) if daemonset.is_own_shard(shard, self.settings) else None

    def _prepuller_watch(self) -> PodWatch[PrepullerPod]:
        return PodWatch(self.core, self.prepuller_summary, what="prepuller pod",
                        namespace=self.settings.namespace, page_size=PREPULLER_PAGE,
                        label_selector=self.PREPULLER_SELECTOR)

    def watch_prepuller_pods(self) -> PodWatch[PrepullerPod]:
        """A watched cache of the prepuller pods, for prepuller_pods (run it in a
        thread): a pass every status interval then costs the API server nothing."""
        self.prepuller_cache = self._prepuller_watch()
        return self.prepuller_cache

    def prepuller_pods(self) -> list[PrepullerPod]:
        watched = self.prepuller_cache
        if watched is None or not watched.synced.is_set():
            watched = self._prepuller_watch()  # --once, or the cache not listed yet
            watched.relist()
        return [pod for _key, pod in watched.items()]

    def live_daemonsets(self) -> dict[str, dict[str, Any]]:
        """This release's shards only (see daemonset.is_own_shard)."""
        return {ds["metadata"]["name"]: ds for ds in list_items(
            self.apps.list_namespaced_daemon_set, self.settings.namespace,
            label_selector=f"app.kubernetes.io/component={daemonset.COMPONENT}")
            if daemonset.is_own_shard(ds["metadata"]["name"], self.settings)}

    # -- one pass ---------------------------------------------------------------------
    def reconcile_once(self, *, backfill: bool | None = None) -> PassResult:
        """Reads the cluster once (pods of opted-in namespaces if backfilling, prepuller
        pods, live DaemonSets), makes at most one write to learned-images, then applies
        the DaemonSets that differ."""
        result = PassResult()
        now = self.clock()
        observed = self.backfill_observations() if (
            self.settings.backfill if backfill is None else backfill) else {}
        live = self.live_daemonsets()
        prepuller_pods = self.prepuller_pods()
        result.helper_failing = helper_failures(prepuller_pods)
        metrics.HELPER_FAILING.set(len(result.helper_failing))
        if result.helper_failing:
            node, reason = sorted(result.helper_failing.values())[0]
            logger.warning(
                "%d prepuller pods cannot run Prewarm's helper from %s (first: %s on %s): "
                "no image gets warm there; check the image and its pull secrets "
                "(PREWARM_IMAGE_PULL_SECRETS, chart prepuller.imagePullSecrets)",
                len(result.helper_failing), self.settings.helper_image, reason, node)

        def prepare(learned: LearnedSet) -> bool:
            self._check_leader()  # again on every retry after a conflict
            containers = {daemonset.container_name(r.image): r.image
                          for r in learned.records.values()}
            pull_failures = failed_pulls(prepuller_pods, containers)
            changed = bool(learned.moved)  # records added by hand, moved to their keys
            merged = merge(learned, observed, source="backfill", settings=self.settings)
            result.backfilled, result.refused = merged.added, merged.refused
            result.unlisted = merged.unlisted
            changed |= merged.changed
            changed |= bool(stamp_last_seen(learned, now=now))
            result.expired = expire(learned, now=now, ttl=self.settings.image_ttl)
            changed |= bool(result.expired)
            by_image = learned.by_image()
            result.failing, result.left_out = [], {}
            # this pass's counts (a retry after a conflict starts again from ours)
            failures = result.failures = dict(self.failures)
            for image, reason in pull_failures.items():
                record = by_image.get(image)
                if record is None or (record.state.startswith("failing")
                                      and not daemonset.eligible(record, now)):
                    continue  # unknown, or already left out and backing off
                failures[image] = min(failures.get(image, 0) + 1, MAX_FAILURES)
                delay = failure_delay(self.settings.failure_backoff, failures[image])
                record.state = f"failing: {reason}"
                record.extra["retryAt"] = rfc3339(now + delay)
                record.extra.pop("warmNodes", None)
                result.failing.append(image)
                result.left_out[image] = delay
                changed = True
            for image, shard in daemonset.assign_shards(learned, self.settings).items():
                by_image[image].extra["shard"] = shard
                changed = True
            for record in learned.records.values():
                if record.state.startswith("failing") and daemonset.eligible(record, now) \
                        and record.image not in pull_failures:
                    record.state = "pending"  # back in the DaemonSet for another try
                    record.extra.pop("retryAt", None)
                    changed = True
            changed |= apply_warm_states(learned, self.settings, live, prepuller_pods,
                                         containers)
            for image in list(failures):  # warm (pulled everywhere) or gone: start afresh
                record = by_image.get(image)
                if record is None or record.state == "warm":
                    del failures[image]
            return changed

        self._check_leader()
        snapshot = self.store.update(prepare)
        self.failures = result.failures
        if result.backfilled:
            metrics.IMAGES_LEARNED.labels("backfill").inc(len(result.backfilled))
            logger.info("backfill learned %d images", len(result.backfilled))
        if result.refused:
            metrics.IMAGES_REFUSED.inc(len(result.refused))
            logger.warning("backfill could not record %d images: %s (first: %s)",
                           len(result.refused), result.refused[0][1], result.refused[0][0])
        if result.unlisted:
            logger.warning("%d known images run in new namespaces that learned-images has "
                           "no room to list (PREWARM_MAX_BYTES; first: %s)",
                           len(result.unlisted), result.unlisted[0])
        if result.expired:
            logger.info("expired %d images not seen for %.0fs", len(result.expired),
                        self.settings.image_ttl)
        if result.failing:
            logger.warning("images failing to pull, left out of the DaemonSet until a retry: "
                           "%s", ", ".join(f"{image} ({result.left_out[image]:.0f}s)"
                                           for image in result.failing))

        desired = daemonset.desired_daemonsets(snapshot.learned, self.settings, now=now)
        self._check_leader()
        result.daemonsets = self.apply(desired, live)
        metrics.RECONCILES.labels(result.outcome).inc()
        return result

    def _remove_foreign_init_containers(self, applied, manifest: dict[str, Any]) -> None:
        """Server-side apply removes a list item only when no other field manager owns
        part of it: an init container added by hand (kubectl edit or patch), or one of
        ours edited so, stays when we leave it out, is pulled on every node, and makes
        every pass apply again. Such leftovers are removed by a JSON patch, each after a
        test of its name, so that a concurrent change makes the patch fail, not remove
        the wrong container."""
        wanted = {c["name"] for c in manifest["spec"]["template"]["spec"]["initContainers"]}
        live = [c.name for c in applied.spec.template.spec.init_containers or []]
        operations = []
        for index in reversed(range(len(live))):  # from the end: indexes stay valid
            if live[index] not in wanted:
                path = f"/spec/template/spec/initContainers/{index}"
                operations += [{"op": "test", "path": f"{path}/name", "value": live[index]},
                               {"op": "remove", "path": path}]
        if not operations:
            return
        self._check_leader()
        self.apps.patch_namespaced_daemon_set(
            applied.metadata.name, self.settings.namespace, operations,
            field_manager=FIELD_MANAGER, _content_type="application/json-patch+json",
            _request_timeout=TIMEOUT)
        metrics.API_WRITES.labels("reconciler").inc()
        logger.warning("DaemonSet %s: removed init containers Prewarm did not put there, or "
                       "no longer wants, kept by another field manager: %s",
                       applied.metadata.name,
                       ", ".join(name for name in live if name not in wanted))

    def _check_leader(self) -> None:
        if not self.may_write():
            raise NotLeader("leadership lost during the pass; not writing")

    def apply(self, desired: list[dict[str, Any]],
              live: dict[str, dict[str, Any]]) -> dict[str, str]:
        outcomes: dict[str, str] = {}
        # A shard the API server refuses (an admission policy against one of its images,
        # a quota) must not hold back the others, nor the removal of emptied ones: each
        # is applied on its own, and the first refusal fails the pass at its end.
        refused: list[tuple[str, ApiException]] = []
        live = dict(live)
        for manifest in desired:
            name = manifest["metadata"]["name"]
            current = live.pop(name, None)
            if current is not None and owned_equal(current, manifest):
                outcomes[name] = "unchanged"
                continue
            self._check_leader()  # before each write: a pass can outlast the lease
            try:
                applied = self.apps.patch_namespaced_daemon_set(
                    name, self.settings.namespace, manifest, field_manager=FIELD_MANAGER,
                    force=True, _content_type="application/apply-patch+yaml",
                    _request_timeout=TIMEOUT)
                metrics.API_WRITES.labels("reconciler").inc()
                self._remove_foreign_init_containers(applied, manifest)
            except ApiException as error:
                refused.append((name, error))
                continue
            outcomes[name] = "created" if current is None else "updated"
            logger.info("DaemonSet %s %s (%s images)", name, outcomes[name],
                        manifest["metadata"]["annotations"][daemonset.IMAGE_COUNT_ANNOTATION])
        for name, leftover in live.items():
            labels = leftover["metadata"].get("labels") or {}
            if not daemonset.MANAGED_BY.items() <= labels.items() or \
                    name == self.settings.daemonset:
                continue
            self._check_leader()
            self.apps.delete_namespaced_daemon_set(name, self.settings.namespace,
                                                   _request_timeout=TIMEOUT)
            metrics.API_WRITES.labels("reconciler").inc()
            outcomes[name] = "deleted"
            logger.info("DaemonSet %s deleted (shard empty)", name)
        for name, error in refused[1:]:  # the first is the pass's error, reported with it
            logger.error("DaemonSet %s not applied: %s", name, describe_error(error))
        if refused:
            raise refused[0][1]
        return outcomes


def apply_warm_states(learned: LearnedSet, settings: Settings, live: dict[str, dict[str, Any]],
                      pods: list[PrepullerPod], containers: dict[str, str]) -> bool:
    """warm / pending (+ warmNodes) from the prepuller pods' init statuses: an image is
    warm when its pull finished on as many nodes as its DaemonSet schedules to.

    While its DaemonSet rolls out (an image added to or removed from the shard), a warm
    image stays warm: the replaced pods' nodes still hold it, though their new pods have
    not got to its pull container yet."""
    scheduled = {name: (ds.get("status") or {}).get("desiredNumberScheduled", 0)
                 for name, ds in live.items()}
    rolling = {name for name, ds in live.items() if _rolling_out(ds)}
    in_live: dict[str, str] = {}
    for name, ds in live.items():
        for container in ds["spec"]["template"]["spec"].get("initContainers") or []:
            if container["name"].startswith("pull-"):
                in_live[container["image"]] = name
    warm_nodes: dict[str, set[str]] = {}
    for pod in pods:
        for name in pod.pulled:
            image = containers.get(name)
            if image and pod.node:
                warm_nodes.setdefault(image, set()).add(pod.node)
    changed = False
    for record in learned.records.values():
        if record.state.startswith("failing"):
            continue
        if record.state == "warm" and in_live.get(record.image) in rolling:
            continue
        nodes = len(warm_nodes.get(record.image, ()))
        wanted = scheduled.get(in_live.get(record.image, ""), 0)
        state = "warm" if wanted and nodes >= wanted else "pending"
        if record.state != state or record.extra.get("warmNodes", 0) != nodes:
            record.state = state
            record.extra["warmNodes"] = nodes
            changed = True
    return changed


def _rolling_out(ds: dict[str, Any]) -> bool:
    """Whether a DaemonSet's pods are being replaced: its controller has not seen the
    latest spec yet, or not every scheduled pod runs it."""
    status = ds.get("status") or {}
    generation = (ds.get("metadata") or {}).get("generation", 0)
    return status.get("observedGeneration", 0) < generation or \
        status.get("updatedNumberScheduled", 0) < status.get("desiredNumberScheduled", 0)


def _failing_init_containers(pods: list[PrepullerPod]):
    """(pod, container name, reason) for init containers waiting with a FAILURE_REASON,
    in pods not being deleted: a pod stuck terminating (its node gone) keeps the status
    it had, which would mark its image failing again at every retry."""
    for pod in pods:
        if not pod.terminating:
            for name, reason in pod.failing:
                yield pod, name, reason


def failed_pulls(pods: list[PrepullerPod], containers: dict[str, str]) -> dict[str, str]:
    """image -> reason, for pull containers waiting with an image-pull failure."""
    return {containers[name]: reason for _pod, name, reason in _failing_init_containers(pods)
            if name in containers}


def helper_failures(pods: list[PrepullerPod]) -> dict[str, tuple[str, str]]:
    """pod -> (node, reason), for prepuller pods whose first initContainer (the helper
    from Prewarm's own image) waits with a failure: no pull after it can run there."""
    return {pod.name: (pod.node or "(no node)", reason)
            for pod, name, reason in _failing_init_containers(pods)
            if name == daemonset.HELPER_CONTAINER}


def owned_equal(live: dict[str, Any], desired: dict[str, Any]) -> bool:
    """True when the live DaemonSet already carries what we apply: the template hash we
    stamped and the same pull containers (a hand edit of those is corrected)."""
    annotations = live["metadata"].get("annotations") or {}
    if annotations.get(daemonset.HASH_ANNOTATION) != \
            desired["metadata"]["annotations"][daemonset.HASH_ANNOTATION]:
        return False

    def pulls(obj: dict[str, Any]) -> list[tuple[str, str]]:
        return [(c["name"], c["image"]) for c in
                obj["spec"]["template"]["spec"].get("initContainers") or []]

    return pulls(live) == pulls(desired)


# -- leader election ------------------------------------------------------------------

class LeaseElector:
    """Lease-based leader election (coordination.k8s.io/v1), as client-go does it.

    The holder renews every lease_duration/3 from its own thread, so a long reconcile
    pass cannot let the lease lapse under it. A candidate takes over only when it has
    *itself observed* no renewal for lease_duration (measured on its own monotonic
    clock, not by comparing the holder's renewTime with its wall clock, so clock skew
    between nodes cannot cause an early takeover). Updates carry resourceVersion, so two
    candidates cannot both win a race. `is_leader()` is false as soon as our own last
    successful renewal is older than the lease: a leader cut off from the API server
    stops writing before anyone else can take over."""

    def __init__(self, api: client.ApiClient, settings: Settings, identity: str,
                 *, monotonic=time.monotonic):
        self.coordination = client.CoordinationV1Api(api)
        self.settings, self.identity = settings, identity
        self.duration = max(1, int(settings.lease_duration))
        self.monotonic = monotonic
        self._observed: tuple[str | None, Any] | None = None  # (holder, renewTime)
        self._observed_at = 0.0
        self._renewed_at: float | None = None  # last successful renewal of ours
        self._term = 0  # counts the leaderships this elector has begun
        self._stop = threading.Event()

    def is_leader(self) -> bool:
        return self._renewed_at is not None and \
            self.monotonic() - self._renewed_at < self.duration

    def term(self) -> int | None:
        """The number of the leadership held now (1, 2, ... as leadership is lost and
        won back), or None while not leading. A loop that compares it with the last one
        it saw starts a new leadership afresh whatever the timing of on_change: that
        callback runs on the election thread only after is_leader() is already true."""
        if not self.is_leader():
            return None
        # read after is_leader(): try_acquire numbers a term before it starts leading
        return self._term

    def try_acquire(self) -> bool:
        """One attempt to acquire or renew; True if we hold the lease now."""
        from datetime import datetime, timezone

        started = self.monotonic()
        now = datetime.now(timezone.utc)
        name, namespace = self.settings.lease_name, self.settings.namespace
        try:
            lease = self.coordination.read_namespaced_lease(name, namespace,
                                                            _request_timeout=TIMEOUT)
        except ApiException as error:
            if error.status != 404:
                raise
            lease = None
        try:
            if lease is None:
                body = client.V1Lease(
                    metadata=client.V1ObjectMeta(name=name, namespace=namespace, labels={
                        "app.kubernetes.io/name": "prewarm", **daemonset.MANAGED_BY,
                        "app.kubernetes.io/component": "reconciler"}),
                    spec=client.V1LeaseSpec(holder_identity=self.identity,
                                            lease_duration_seconds=self.duration,
                                            acquire_time=now, renew_time=now,
                                            lease_transitions=0))
                self.coordination.create_namespaced_lease(namespace, body,
                                                          _request_timeout=TIMEOUT)
            else:
                if not self._claim(lease, started, now):
                    # another live holder: whatever our last renewal says, we lead no
                    # more (the Lease deleted and taken by a standby, or replaced by
                    # hand); left to lapse, we would write beside it for up to a lease
                    self._renewed_at = None
                    return False
                self.coordination.replace_namespaced_lease(name, namespace, lease,
                                                           _request_timeout=TIMEOUT)
        except ApiException as error:
            if error.status == 409:  # another candidate wrote first: it leads
                self._renewed_at = None
                return False
            if error.status == 403 and lease is None:  # the chart's Role has no create
                raise LeaseMissing(
                    f"Lease {namespace}/{name} is missing and this identity may not create "
                    f"it ({describe_error(error)}): `helm upgrade` restores it (or create "
                    f"it by hand); no replica leads until it exists") from error
            raise
        if not self.is_leader():
            self._term += 1  # before _renewed_at: see term()
        self._renewed_at = started
        return True

    def _claim(self, lease, started: float, now) -> bool:
        """Rewrites a read lease as ours, unless another live holder has it. Expiry is
        judged on our own clock: how long its (holder, renewTime) has not changed."""
        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity
        record = (holder, spec.renew_time)
        if record != self._observed:
            self._observed, self._observed_at = record, started
        expired = started - self._observed_at >= (spec.lease_duration_seconds or self.duration)
        if holder and holder != self.identity and not expired:
            return False
        if holder != self.identity:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.holder_identity = self.identity
        spec.renew_time = now
        spec.lease_duration_seconds = self.duration
        lease.spec = spec
        return True

    def run(self, on_change) -> None:
        """Keeps trying / renewing every lease_duration/3 until stopped; calls
        on_change(leading) when leadership is gained or lost."""
        leading = False
        while not self._stop.is_set():
            try:
                self.try_acquire()
            except Exception as error:  # API unreachable: is_leader() lapses by itself
                logger.warning("leader election: %s", error if isinstance(error, LeaseMissing)
                               else describe_error(error))
            if self.is_leader() != leading:
                leading = not leading
                on_change(leading)
            self._stop.wait(max(0.2, self.duration / 3))

    def stop(self) -> None:
        self._stop.set()

    def release(self) -> None:
        """Gives the lease up on shutdown (as client-go's ReleaseOnCancel does), so a
        standby takes over at once instead of after a full lease duration."""
        if not self.is_leader():
            return
        self._renewed_at = None
        try:
            lease = self.coordination.read_namespaced_lease(
                self.settings.lease_name, self.settings.namespace, _request_timeout=TIMEOUT)
            if lease.spec and lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = None
                lease.spec.lease_duration_seconds = 1
                self.coordination.replace_namespaced_lease(
                    self.settings.lease_name, self.settings.namespace, lease,
                    _request_timeout=TIMEOUT)
                logger.info("released the lease")
        except Exception as error:  # best effort: the lease expires by itself anyway
            logger.warning("could not release the lease: %s", describe_error(error))


# -- the loop ---------------------------------------------------------------------------

MAX_RETRY_DELAY = 60.0
# A failing image is left out for PREWARM_FAILURE_BACKOFF after its first failure, twice
# that after a retry that failed again, and so on up to a day (or the setting, if
# longer): a registry blip costs one backoff, an image that can never be pulled does
# not roll its shard on every node twice each backoff for ever. The leader counts the
# failures in memory (Reconciler.failures), and forgets an image's once it is warm: a
# new leader starts from the first backoff again, and the records keep every byte of
# their room (store.RECONCILER_RESERVE).
MAX_FAILURE_BACKOFF = 86400.0
MAX_FAILURES = 32


def failure_delay(base: float, failures: int) -> float:
    """Seconds a failing image is left out after its `failures`-th failure in a row."""
    return min(max(base, MAX_FAILURE_BACKOFF), base * 2.0 ** (max(failures, 1) - 1))


# A change of learned-images is applied once it has been quiet SETTLE seconds, or
# MAX_SETTLE after the first change: while a team's new workloads are admitted the
# observers write an image a second, and applying each would roll the last shard's pods
# on every node again and again (a rollout restarted kills the pods still pulling).
SETTLE = 2.0
MAX_SETTLE = 10.0


class Schedule:
    """When the leader's next pass is due (monotonic seconds): after a change of
    learned-images (settled, see SETTLE), on a new leadership, every status interval,
    and a full pass (with backfill) every resync period. After a failed pass the next
    waits 2 s, doubling up to MAX_RETRY_DELAY, whatever triggers it: a lasting failure
    (403, an invalid learned-images) must not repeat its LISTs and its warning every few
    seconds."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.last_full = self.last_status = -math.inf  # the first pass is a full one
        self.failures = 0
        self.retry_at = -math.inf
        self.first_change = self.last_change = math.nan  # nan: no change waiting

    def restart(self) -> None:
        """A new leadership starts afresh: a full pass, now."""
        self.last_full, self.retry_at, self.failures = -math.inf, -math.inf, 0

    def backing_off(self, now: float) -> bool:
        return now < self.retry_at

    def due(self, now: float, triggered: bool) -> bool:
        """Whether a pass is due now; `triggered`: learned-images changed since the last
        call (recorded even while backing off, for when the wait is over)."""
        if triggered:
            if math.isnan(self.first_change):
                self.first_change = now
            self.last_change = now
        if self.backing_off(now):
            return False
        return (self.settled(now) or self.full(now)
                or now - self.last_status >= self.settings.status_interval)

    def settled(self, now: float) -> bool:
        """A change is waiting and learned-images has been quiet long enough."""
        return now - self.last_change >= SETTLE or now - self.first_change >= MAX_SETTLE

    def full(self, now: float) -> bool:
        return now - self.last_full >= self.settings.resync_period

    def succeeded(self, now: float, *, full: bool) -> None:
        self.failures, self.retry_at = 0, -math.inf
        self.last_status = now
        self.first_change = self.last_change = math.nan  # this pass read them
        if full:
            self.last_full = now

    def failed(self, now: float) -> float:
        """Records a failure; returns the seconds until the next attempt."""
        self.failures += 1
        delay = min(MAX_RETRY_DELAY, 2.0 * 2 ** min(self.failures - 1, 16))
        self.retry_at = now + delay
        return delay


class _Health(BaseHTTPRequestHandler):
    """/healthz (live), /readyz (ready) and /metrics. Ready is always 200: a standby is
    ready to take over, and a failing pass is retried with backoff, which restarting
    or unreadying the pod would not help; the body says which."""

    def readiness(self) -> dict[str, Any]:
        return {"status": "ok"}

    def do_GET(self):  # noqa: N802
        if self.path == "/metrics":
            body, content_type = metrics.exposition()
        elif self.path == "/healthz":
            body, content_type = b'{"status":"ok"}', "application/json"
        elif self.path == "/readyz":
            body, content_type = json.dumps(self.readiness()).encode(), "application/json"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args):
        pass


def _watch_learned(reconciler: Reconciler, trigger: threading.Event,
                   stop: threading.Event) -> None:
    """Sets `trigger` on every change of learned-images; re-lists after 410 Gone."""
    settings = reconciler.settings
    resource_version = None
    while not stop.is_set():
        try:
            if resource_version is None:
                resource_version = reconciler.store.read().resource_version
                trigger.set()  # whatever changed while we were not watching
            stream = watch.Watch().stream(
                reconciler.core.list_namespaced_config_map, settings.namespace,
                field_selector=f"metadata.name={settings.configmap}",
                resource_version=resource_version, timeout_seconds=300,
                # a half-open connection must not stall the watch forever
                _request_timeout=(TIMEOUT[0], 330))
            for event in stream:
                if stop.is_set():
                    return
                resource_version = event["object"].metadata.resource_version
                trigger.set()
        except ApiException as error:
            if error.status == 410:  # too old: start again from a fresh read
                resource_version = None
                continue
            logger.warning("watch on learned-images failed: %s", describe_error(error))
            stop.wait(5)
        except Exception as error:  # connection errors: retry after a pause
            logger.warning("watch on learned-images failed: %s", describe_error(error))
            resource_version = None
            stop.wait(5)


def attempt(reconciler: Reconciler, schedule: Schedule, *, now: float,
            clock: Callable[[], float] = time.monotonic) -> PassResult | None:
    """One pass of the leader's loop, started at `now`; a failure is logged, counted and
    backed off from the moment it ended."""
    full = schedule.full(now)
    try:
        result = reconciler.reconcile_once(backfill=reconciler.settings.backfill and full)
    except NotLeader as error:  # not a failure: the new leader takes over
        logger.info("%s", error)
        return None
    except Exception as error:
        metrics.RECONCILES.labels("error").inc()
        # from the end of the pass: a slow failure (a hung API server) must not be
        # retried at once
        delay = schedule.failed(clock())
        logger.warning("reconcile pass failed (%d in a row), next attempt in %.0fs: %s",
                       schedule.failures, delay,
                       error if isinstance(error, StoreUnavailable) else describe_error(error))
        return None
    schedule.succeeded(now, full=full)
    if result.outcome != "unchanged" or full:
        logger.info("reconciled: %s", result.daemonsets)
    return result


def run(settings: Settings, *, once: bool = False) -> int:
    reconciler = Reconciler(settings)
    if once:
        try:
            result = reconciler.reconcile_once()
        except (StoreUnavailable, ApiException) as error:
            logger.error("reconcile failed: %s", error if isinstance(error, StoreUnavailable)
                         else describe_error(error))
            return 1
        except (urllib3.exceptions.HTTPError, OSError) as error:  # unreachable, timed out
            logger.error("reconcile failed: cannot reach the API server: %s",
                         describe_error(error))
            return 1
        print(json.dumps({"daemonsets": result.daemonsets, "outcome": result.outcome,
                          "backfilled": len(result.backfilled),
                          "expired": len(result.expired), "failing": result.failing}))
        return 0
    identity = settings.identity or f"{socket.gethostname()}-{os.getpid()}"
    elector = LeaseElector(reconciler.api, settings, identity)
    reconciler.may_write = elector.is_leader
    stop, trigger = threading.Event(), threading.Event()

    def on_change(leading: bool) -> None:  # logs and wakes the loop; the loop sees the term
        logger.info("%s leadership (%s)", "acquired" if leading else "lost", identity)
        if leading:
            trigger.set()
        else:  # the new leader's passes tell; a standby's last figure would go stale
            metrics.HELPER_FAILING.set(0)

    threading.Thread(target=elector.run, args=(on_change,), daemon=True,
                     name="leader-election").start()
    threading.Thread(target=_watch_learned, args=(reconciler, trigger, stop), daemon=True,
                     name="watch-learned-images").start()
    threading.Thread(target=reconciler.watch_prepuller_pods().run, args=(stop,),
                     daemon=True, name="watch-prepuller-pods").start()
    if settings.backfill:
        reconciler.pod_images = PodImages(reconciler.core, reconciler.filter,
                                          skip_namespace=settings.namespace)
        threading.Thread(target=reconciler.pod_images.run, args=(stop,), daemon=True,
                         name="watch-pods").start()
    schedule = Schedule(settings)
    if settings.health_port:
        class Health(_Health):
            def readiness(self) -> dict[str, Any]:
                return {"status": "ok", "leader": elector.is_leader(),
                        "failedPasses": schedule.failures}

        server = DualStackHTTPServer(settings.health_port, Health)
        threading.Thread(target=server.serve_forever, daemon=True, name="health").start()

    def terminate(*_args) -> None:  # a pod is stopped with SIGTERM
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    leading_term = None
    try:
        while True:
            if schedule.backing_off(time.monotonic()):
                stop.wait(1.0)  # a trigger meanwhile stays set, for when the wait is over
            else:
                trigger.wait(1.0)
            term = elector.term()
            if term is None:
                trigger.clear()  # standby: the leader acts on changes
                continue
            now = time.monotonic()
            if term != leading_term:  # a leadership begins: afresh, before its first pass
                leading_term = term
                schedule.restart()
                reconciler.failures = {}  # counted afresh: the last leader's are not ours
            # prepuller pods change state without learned-images changing: a pass is
            # due every status interval even when nothing else happens
            triggered = trigger.is_set()
            if triggered:  # (a set() between is_set() and an unconditional clear() is lost)
                trigger.clear()
            if schedule.due(now, triggered):
                attempt(reconciler, schedule, now=now)
    except KeyboardInterrupt:
        stop.set()
        elector.stop()
        elector.release()
        return 0


def render(settings: Settings) -> str:
    """The DaemonSets the reconciler would apply now, as YAML documents."""
    reconciler = Reconciler(settings)
    reconciler.store.create_missing = False  # a read-only command creates nothing
    learned = reconciler.store.read().learned
    manifests = daemonset.desired_daemonsets(learned, settings, now=time.time())
    return yaml.safe_dump_all(manifests, sort_keys=False)
