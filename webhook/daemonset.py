"""The desired pre-pull DaemonSets: a pure function of the learned set and the settings.

Each eligible image becomes an initContainer `pull-<hash>` that runs a static no-op
executable. The kubelet pulls the image to start the container, the container exits 0
at once, and the next one starts: after the pod's init phase every image is in the node's
cache. The executable is copied by a first initContainer from Prewarm's own image into an
emptyDir, so images without a shell or `/bin/true` (distroless, scratch) work too.

Sharding: an image keeps the shard it was first placed in (recorded as `shard` in its
learned-images record); new images go to the lowest shard with room, most used first.
Inside a shard the pull order is stable (first seen), so only adding or removing an
image changes a DaemonSet. Adding an image
therefore changes one shard only, and a broken image can hold back at most the images
after it in its own shard (and failing images are left out, see reconciler.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from webhook import images
from webhook.settings import Settings
from webhook.store import LearnedSet, Record, parse_time

COMPONENT = "prepuller"
MANAGED_BY = {"app.kubernetes.io/managed-by": "prewarm"}
DAEMONSET_LABEL = "prewarm.io/daemonset"
HASH_ANNOTATION = "prewarm.io/template-hash"
IMAGE_COUNT_ANNOTATION = "prewarm.io/images"
HELPER_VOLUME, HELPER_DIR = "prewarm-bin", "/prewarm-bin"
HELPER_CONTAINER = "prewarm-helper"  # the first initContainer: copies the no-op helper
HELPER_BINARY = f"{HELPER_DIR}/noop"
# Small enough to fit any LimitRange, non-zero so a ResourceQuota namespace accepts it.
PULL_RESOURCES = {"requests": {"cpu": "1m", "memory": "8Mi"},
                  "limits": {"cpu": "50m", "memory": "32Mi"}}


def container_name(image: str) -> str:
    """`pull-<10 hex>`: a valid DNS-1123 label, stable for the same image."""
    return "pull-" + images.short_hash(image, 10)


def shard_name(settings: Settings, shard: int) -> str:
    return settings.daemonset if shard == 0 else f"{settings.daemonset}-{shard}"


def is_own_shard(name: str, settings: Settings) -> bool:
    """Whether a DaemonSet name is one of this reconciler's shards (`<daemonset>` or
    `<daemonset>-<n>`): another release in the same namespace has shards of its own,
    which this one must neither delete nor count."""
    base, _, number = name.rpartition("-")
    return name == settings.daemonset or (
        base == settings.daemonset and re.fullmatch(r"[1-9][0-9]*", number) is not None)


def selector_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "prewarm", "app.kubernetes.io/component": COMPONENT,
            DAEMONSET_LABEL: name}


def usage(record: Record) -> int:
    """How widely an image is used: namespaces it was seen in."""
    return len(record.namespaces)


def eligible(record: Record, now: float) -> bool:
    """Failing images stay out of the DaemonSet until their retry time (a record without
    a readable retry time is retried now rather than left out forever)."""
    if not record.state.startswith("failing"):
        return True
    try:
        return parse_time(str(record.extra["retryAt"])) <= now
    except (KeyError, ValueError):
        return True


def assign_shards(learned: LearnedSet, settings: Settings) -> dict[str, int]:
    """Image -> shard for every record: kept where valid, new ones placed in the lowest
    shard with room, most used first. Returns only the assignments that changed, for the
    reconciler to persist."""
    size = settings.shard_size
    # no more shards than the images need: a shard number past them (a hand edit, or
    # a larger shard size before) would name a DaemonSet the API server may refuse
    # (its name is a label value, of at most 63 characters), failing every pass
    shards = -(-max(len(learned.records), settings.max_images) // size)
    members: dict[int, list[Record]] = {}
    unplaced: list[Record] = []
    for record in sorted(learned.records.values(), key=placement_key):
        shard = record.extra.get("shard")
        if isinstance(shard, int) and not isinstance(shard, bool) and 0 <= shard < shards \
                and len(members.get(shard, [])) < size:
            members.setdefault(shard, []).append(record)
        else:
            unplaced.append(record)
    changed: dict[str, int] = {}
    shard = 0
    for record in unplaced:
        while len(members.get(shard, [])) >= size:
            shard += 1
        members.setdefault(shard, []).append(record)
        if record.extra.get("shard") != shard:
            changed[record.image] = shard
    return changed


def placement_key(record: Record) -> tuple:
    """Most used first when images are placed in shards, so popular images land in
    shard 0 and are pulled by the first DaemonSet."""
    return (-usage(record), record.first_seen, record.image)


def pull_order_key(record: Record) -> tuple:
    """Order of the pull containers inside a shard: stable (first seen), so an image
    showing up in one more namespace never reorders, and so never rolls, a DaemonSet."""
    return (record.first_seen, record.image)


@dataclass(frozen=True)
class Shard:
    index: int
    name: str
    images: tuple[str, ...]


def plan(learned: LearnedSet, settings: Settings, *, now: float) -> list[Shard]:
    """Shards with their images in pull order. Shard 0 always exists (the chart
    pre-creates it); other shards exist while they hold an eligible image. Records must
    carry their `shard` (see assign_shards) — unassigned ones are placed as it would."""
    pending = assign_shards(learned, settings)
    by_shard: dict[int, list[Record]] = {}
    for record in learned.records.values():
        shard = pending.get(record.image, record.extra.get("shard", 0))
        if eligible(record, now):
            by_shard.setdefault(int(shard), []).append(record)
    by_shard.setdefault(0, [])
    return [Shard(index, shard_name(settings, index),
                  tuple(r.image for r in sorted(by_shard[index], key=pull_order_key)))
            for index in sorted(by_shard)]


def _security_context(settings: Settings, *, read_only: bool = True) -> dict[str, Any]:
    # The restricted Pod Security profile, with an explicit numeric user: many images
    # declare USER root (or nothing), and runAsNonRoot alone would refuse to start them.
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True, "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user, "readOnlyRootFilesystem": read_only,
            "seccompProfile": {"type": "RuntimeDefault"}}


def desired_daemonset(shard: Shard, settings: Settings) -> dict[str, Any]:
    """The DaemonSet for one shard, as a plain manifest (what `render` prints).

    The shards past the first are the reconciler's own: it creates and deletes them, and
    labels them `managed-by: prewarm`. The first is the chart's placeholder, kept on
    `helm uninstall` and adopted back by a new install, which Helm allows only while the
    object's own managed-by label says `Helm`: the reconciler leaves that label to
    whoever created the object (its pods are labelled `prewarm` either way)."""
    labels = {**selector_labels(shard.name), **MANAGED_BY}
    own = labels if shard.index else selector_labels(shard.name)
    mount = {"name": HELPER_VOLUME, "mountPath": HELPER_DIR}
    init_containers: list[dict[str, Any]] = [{
        "name": HELPER_CONTAINER,
        "image": settings.helper_image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["cp", settings.helper_path, HELPER_BINARY],
        "volumeMounts": [mount],
        "resources": PULL_RESOURCES,
        "securityContext": _security_context(settings),
    }]
    for image in shard.images:
        init_containers.append({
            "name": container_name(image),
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "command": [HELPER_BINARY],
            "volumeMounts": [{**mount, "readOnly": True}],
            "resources": PULL_RESOURCES,
            "securityContext": _security_context(settings),
        })
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 0,
        "securityContext": {"runAsNonRoot": True, "runAsUser": settings.run_as_user,
                            "runAsGroup": settings.run_as_user,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": [{"name": HELPER_VOLUME, "emptyDir": {"sizeLimit": "16Mi"}}],
        "initContainers": init_containers,
        "containers": [{
            "name": "pause",
            "image": settings.pause_image,
            "imagePullPolicy": "IfNotPresent",
            "resources": PULL_RESOURCES,
            "securityContext": _security_context(settings),
        }],
    }
    if settings.node_selector:
        pod_spec["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        pod_spec["tolerations"] = list(settings.tolerations)
    if settings.affinity:
        pod_spec["affinity"] = dict(settings.affinity)
    if settings.priority_class:
        pod_spec["priorityClassName"] = settings.priority_class
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in settings.image_pull_secrets]
    max_unavailable: int | str = settings.max_unavailable
    if isinstance(max_unavailable, str) and max_unavailable.isdigit():
        max_unavailable = int(max_unavailable)
    spec = {
        "selector": {"matchLabels": selector_labels(shard.name)},
        "updateStrategy": {"type": "RollingUpdate",
                           "rollingUpdate": {"maxUnavailable": max_unavailable}},
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": shard.name, "namespace": settings.namespace, "labels": own,
                     "annotations": {HASH_ANNOTATION: spec_hash(spec),
                                     IMAGE_COUNT_ANNOTATION: str(len(shard.images))}},
        "spec": spec,
    }


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def desired_daemonsets(learned: LearnedSet, settings: Settings, *,
                       now: float) -> list[dict[str, Any]]:
    return [desired_daemonset(shard, settings) for shard in plan(learned, settings, now=now)]
