"""AdmissionReview handling: a pure function from a decoded review body to a response.

Two error channels, kept apart: a *bad request* (not a review we can answer: wrong shape,
no uid, a kind we do not observe) raises `BadReview`, which the HTTP layer turns into
400 with a JSON error, and which the API server treats under `failurePolicy: Ignore`; a
well-formed review always gets `allowed: true`, because the observer only watches.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
from typing import Any, Literal, NamedTuple, Sequence, TypedDict

import jsonpatch

from webhook import images

API_VERSION = "admission.k8s.io/v1"

Operation = Literal["CREATE", "UPDATE", "DELETE", "CONNECT"]
OPERATIONS = frozenset(("CREATE", "UPDATE", "DELETE", "CONNECT"))


class GroupVersionKind(TypedDict):
    group: str
    version: str
    kind: str


class AdmissionRequest(TypedDict, total=False):
    uid: str
    kind: GroupVersionKind
    namespace: str
    operation: Operation
    object: dict[str, Any]
    dryRun: bool


class AdmissionResponse(TypedDict, total=False):
    uid: str
    allowed: bool
    warnings: list[str]
    patchType: Literal["JSONPatch"]
    patch: str  # base64 of a JSON patch


class AdmissionReview(TypedDict, total=False):
    apiVersion: str
    kind: Literal["AdmissionReview"]
    request: AdmissionRequest
    response: AdmissionResponse


class BadReview(ValueError):
    """The body is not an AdmissionReview this webhook can answer (HTTP 400)."""


# Where each observed kind keeps its pod spec. Keyed by kind rather than resource: with
# matchPolicy Equivalent the API server converts the object to the version we registered,
# and `request.kind` names that version's kind.
POD_SPEC_PATHS: dict[tuple[str, str], tuple[str, ...]] = {
    ("", "Pod"): ("spec",),
    ("", "ReplicationController"): ("spec", "template", "spec"),
    ("apps", "Deployment"): ("spec", "template", "spec"),
    ("apps", "StatefulSet"): ("spec", "template", "spec"),
    ("apps", "DaemonSet"): ("spec", "template", "spec"),
    ("apps", "ReplicaSet"): ("spec", "template", "spec"),
    ("batch", "Job"): ("spec", "template", "spec"),
    ("batch", "CronJob"): ("spec", "jobTemplate", "spec", "template", "spec"),
}
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


# Outcome and Learnable are named tuples, not frozen dataclasses: immutable all the same,
# and built in half the time (a frozen dataclass sets each field through
# object.__setattr__), which counts on a path that runs for every admitted pod.

class Outcome(NamedTuple):
    """What a review decided and what it saw (the HTTP layer records `images`)."""

    response: AdmissionReview
    kind: str = ""
    namespace: str = ""
    images: tuple[str, ...] = ()
    rejected: tuple[tuple[str, str], ...] = ()  # (reference, reason)
    skipped: str = ""  # why nothing was recorded: "dry-run", "excluded-namespace", ...
    filtered: tuple[tuple[str, str], ...] = ()  # (image, reason)


def build_response(*, uid: str, warnings: list[str] | None = None) -> AdmissionReview:
    response: AdmissionResponse = {"uid": uid, "allowed": True}
    if warnings:
        response["warnings"] = warnings
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise BadReview(message)


# The checks below run on every review: each error message is built only once its check
# has failed (an f-string per passing check cost more than the checks).

def parse_request(body: Any) -> AdmissionRequest:
    """Validates the review envelope; returns its request or raises BadReview."""
    _require(isinstance(body, dict), "body must be a JSON object (an AdmissionReview)")
    if body.get("kind") != "AdmissionReview":
        raise BadReview(f"kind must be 'AdmissionReview', got {body.get('kind')!r}")
    if body.get("apiVersion") != API_VERSION:
        raise BadReview(f"apiVersion must be {API_VERSION!r} (admissionReviewVersions: "
                        f"[v1]), got {body.get('apiVersion')!r}")
    request = body.get("request")
    if not isinstance(request, dict):
        raise BadReview("review has no 'request' object" if request is None
                        else "review's 'request' must be an object")
    uid = request.get("uid")
    _require(isinstance(uid, str) and uid != "", "request.uid must be a non-empty string")
    kind = request.get("kind")
    _require(isinstance(kind, dict) and isinstance(kind.get("kind"), str),
             "request.kind must be an object with a string 'kind'")
    _require(isinstance(kind.get("group", ""), str), "request.kind.group must be a string")
    _require(isinstance(request.get("namespace", ""), str),
             "request.namespace must be a string")
    _require(isinstance(request.get("dryRun", False), bool), "request.dryRun must be a boolean")
    operation = request.get("operation")
    if operation not in OPERATIONS:
        # also keeps what a client sends out of the metrics' labels (see review)
        raise BadReview(f"request.operation must be one of CREATE, UPDATE, DELETE, CONNECT, "
                        f"got {operation!r:.80}")
    return request  # type: ignore[return-value]


def spec_path(kind: GroupVersionKind) -> tuple[str, ...]:
    """Where the observed `kind` keeps its pod spec; raises BadReview for another kind."""
    key = (kind.get("group", ""), kind["kind"])
    path = POD_SPEC_PATHS.get(key)
    if path is None:
        name = f"{key[0]}/{key[1]}" if key[0] else key[1]
        raise BadReview(f"kind {name:.80} is not observed (Pods and pod-template workloads "
                        f"only)")
    return path


def pod_spec(path: tuple[str, ...], obj: Any) -> dict[str, Any]:
    """The pod spec at `path` (see spec_path) inside `obj`; raises BadReview if it is not
    there."""
    _require(isinstance(obj, dict), "request.object must be an object")
    node: Any = obj
    for depth, step in enumerate(path):
        node = node.get(step) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            walked = ".".join(("object",) + path[:depth + 1])
            raise BadReview(f"request.{walked} must be an object")
    return node


def container_images(spec: dict[str, Any]) -> tuple[str, ...]:
    """Image strings of every container list, in order, without duplicates. An entry
    without `image` is skipped (templates may leave it to later tooling)."""
    seen: dict[str, None] = {}
    for list_name in CONTAINER_LISTS:
        containers = spec.get(list_name)
        if containers is None:
            continue
        if not isinstance(containers, list):
            raise BadReview(f"spec.{list_name} must be a list")
        for index, container in enumerate(containers):
            if not isinstance(container, dict):
                raise BadReview(f"spec.{list_name}[{index}] must be an object")
            image = container.get("image")
            if image is None:
                continue
            if not isinstance(image, str):
                raise BadReview(f"spec.{list_name}[{index}].image must be a string")
            seen.setdefault(image, None)
    return tuple(seen)


def review(body: Any, *, excluded_namespaces: frozenset[str] = frozenset(),
           image_filter: images.ImageFilter | None = None) -> Outcome:
    """Answers one AdmissionReview. Pure: no I/O, no clock; the caller records the
    returned images. Raises BadReview for a body that is not an answerable review."""
    request = parse_request(body)
    uid, kind = request["uid"], request["kind"]
    namespace = request.get("namespace", "")
    response = build_response(uid=uid)
    operation = request["operation"]
    # kind and operation are checked first: both name the metrics' series (the caller
    # counts by them), so they must come from a fixed set, whatever a client sends
    path = spec_path(kind)
    if operation not in ("CREATE", "UPDATE"):
        return Outcome(response=response, kind=kind["kind"], namespace=namespace,
                       skipped=f"operation {operation}")
    spec = pod_spec(path, request.get("object"))
    found = container_images(spec)
    if request.get("dryRun", False):
        # sideEffects: NoneOnDryRun promises the API server that a dry run changes nothing
        return Outcome(response=response, kind=kind["kind"], namespace=namespace,
                       skipped="dry-run")
    if not namespace or namespace in excluded_namespaces:
        return Outcome(response=response, kind=kind["kind"], namespace=namespace,
                       skipped="excluded-namespace")
    learnable = learnable_images(found, image_filter)
    return Outcome(response=response, kind=kind["kind"], namespace=namespace,
                   images=learnable.images, rejected=learnable.rejected,
                   filtered=learnable.filtered)


class Learnable(NamedTuple):
    images: tuple[str, ...]  # normalized, allowed, without duplicates
    rejected: tuple[tuple[str, str], ...] = ()  # (reference, why it is invalid)
    filtered: tuple[tuple[str, str], ...] = ()  # (image, which pattern kept it out)


# A pod spec names a few images; one object may name thousands, up to the body limit,
# and an invalid reference costs its whole parse every time (up to ~1 ms for 1,000
# characters; failures are not cached): 2,900 such references, a 3 MiB review, took a
# worker 3.2 s, holding the GIL, so that every review it was serving meanwhile outlived
# the API server's timeout. Past this many distinct references, an object's others are
# not parsed, only counted as rejected.
MAX_IMAGES_PER_OBJECT = 256
TOO_MANY_IMAGES = f"more than {MAX_IMAGES_PER_OBJECT} images in one object: not read"


def learnable_images(found: Sequence[str], image_filter: images.ImageFilter | None) -> Learnable:
    """The references of one pod spec that may be learned: normalized, valid, allowed;
    the first MAX_IMAGES_PER_OBJECT of them (`found` holds no duplicates). Shared by the
    observer (reviews) and the reconciler (backfill)."""
    found = tuple(found)
    over = found[MAX_IMAGES_PER_OBJECT:]
    found = found[:MAX_IMAGES_PER_OBJECT]
    if len(found) <= CACHED_LIST_IMAGES and sum(map(len, found)) <= CACHED_LIST_CHARS:
        learnable = _cached_learnable(found, image_filter)
    else:
        learnable = _learnable(found, image_filter)
    if over:
        learnable = learnable._replace(
            rejected=learnable.rejected + tuple((raw, TOO_MANY_IMAGES) for raw in over))
    return learnable


# Pods of one template list the same images, so reviews repeat the same few hundred
# lists: a hit is one lookup instead of a parse and a filter check per image. Keyed by
# the filter object too (a filter is fixed for a process's life). Bounded in entries and
# in the size of each: a review may carry thousands of images (up to the body limit),
# and caching such lists would keep megabytes per distinct review; with these bounds
# the cache holds at most a few MiB per worker, whatever clients send.
CACHED_LISTS = 1024
CACHED_LIST_CHARS = 2048  # some 15 references with registry, path, tag and digest
CACHED_LIST_IMAGES = 32  # and few: each short name costs two strings (it and its result)


def _learnable(found: tuple[str, ...], image_filter: images.ImageFilter | None) -> Learnable:
    accepted: dict[str, None] = {}
    rejected: list[tuple[str, str]] = []
    filtered: list[tuple[str, str]] = []
    for raw in found:
        try:
            reference = images.parse(raw)
        except images.InvalidReference as error:
            rejected.append((raw, error.reason))
            continue
        reason = image_filter.check(reference) if image_filter else None
        if reason is not None:
            filtered.append((str(reference), reason))
            continue
        accepted.setdefault(str(reference), None)
    return Learnable(tuple(accepted), tuple(rejected), tuple(filtered))


_cached_learnable = functools.lru_cache(maxsize=CACHED_LISTS)(_learnable)


# -- the optional mutating endpoint (/mutate) ------------------------------------------

def default_pull_policy(reference: images.Reference) -> str:
    """What the API server defaults imagePullPolicy to: Always for `:latest` (or an
    untagged name, which means latest), IfNotPresent otherwise."""
    return "Always" if reference.tag == "latest" and reference.digest is None else "IfNotPresent"


def relax_pull_policies(spec: dict[str, Any], warm: frozenset[str]) -> dict[str, Any]:
    """A copy of the pod spec where containers whose image is warm on every node and
    whose pull policy is (or defaults to) Always get IfNotPresent: a registry outage can
    then not stop a warm launch. Unchanged containers are left exactly as they were."""
    changed = copy.deepcopy(spec)
    # each distinct image parsed once (a failed parse is not cached, and a pod may name
    # one long invalid reference thousands of times), and no more than the cap of them
    parsed: dict[str, images.Reference | None] = {}
    for list_name in ("initContainers", "containers"):
        for container in changed.get(list_name) or []:
            if not isinstance(container, dict) or not isinstance(container.get("image"), str):
                continue
            image = container["image"]
            if image not in parsed:
                if len(parsed) == MAX_IMAGES_PER_OBJECT:  # the rest stay as they are
                    return changed
                try:
                    parsed[image] = images.parse(image)
                except images.InvalidReference:
                    parsed[image] = None
            reference = parsed[image]
            if reference is None:
                continue
            policy = container.get("imagePullPolicy") or default_pull_policy(reference)
            if policy == "Always" and str(reference) in warm:
                container["imagePullPolicy"] = "IfNotPresent"
    return changed


def mutate(body: Any, *, warm: frozenset[str],
           excluded_namespaces: frozenset[str] = frozenset()) -> AdmissionReview:
    """Answers a review on /mutate: always allowed, with a base64 JSONPatch when (and
    only when) a pull policy changes. Idempotent: a pod already relaxed gets no patch."""
    request = parse_request(body)
    response = build_response(uid=request["uid"])
    kind = request["kind"]
    if (kind.get("group", ""), kind["kind"]) != ("", "Pod") or request["operation"] != "CREATE" \
            or request.get("namespace", "") in excluded_namespaces:
        return response
    obj = request.get("object")
    spec = pod_spec(spec_path(kind), obj)
    container_images(spec)  # validates the container lists (BadReview if malformed)
    relaxed = relax_pull_policies(spec, warm)
    patch = jsonpatch.make_patch({"spec": spec}, {"spec": relaxed}).patch
    if patch:
        response["response"]["patchType"] = "JSONPatch"  # type: ignore[typeddict-unknown-key]
        response["response"]["patch"] = base64.b64encode(  # type: ignore[typeddict-unknown-key]
            json.dumps(patch).encode()).decode()
    return response
